"""pyproject.toml's dependency floors against what the code uses, offline.

A floor below the release that added a feature we rely on lets an install pass and the feature
fail at run time (a Ray cluster that ignores RAY_AUTH_MODE, a prefect.yaml key a deploy silently
drops). Each row names the feature, where we use it (checked, so a row cannot outlive its use) and
the first release that has it. `make test-min` installs the floors and runs the fast tier.

requirements.lock (`make lock`) is what every install installs, unresolved: here it is checked
against pyproject.toml, so that a requirement changed without `make lock` fails the fast tier.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
# torch is installed by the Makefile (TORCH_SPEC) and comes with the image's base; not locked.
UNLOCKED = {"torch"}

# (package, first release with the feature, the feature, file that uses it, text that shows it)
FEATURE_FLOORS = [
    ("ray", "2.52.0", "token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN)",
     "tasks/jobs.py", "RAY_AUTH_MODE=token"),
    ("prefect", "3.6.6", "deployment concurrency_limit.grace_period_seconds",
     "infra/prefect.yaml", "grace_period_seconds:"),
]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out: dict[str, Requirement] = {}
    for line in reqs:
        req = Requirement(line)
        out.setdefault(canonicalize_name(req.name), req)  # the main list comes first
    return out


def _floor(req: Requirement) -> Version | None:
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(floors) if floors else None


@pytest.mark.parametrize(("package", "first", "feature", "path", "evidence"), FEATURE_FLOORS,
                         ids=[row[0] for row in FEATURE_FLOORS])
def test_floor_covers_the_features_the_code_uses(package, first, feature, path, evidence):
    assert evidence in (REPO / path).read_text(), (
        f"{path} no longer shows {evidence!r}: drop or update this row")
    floor = _floor(_requirements()[package])
    assert floor is not None and floor >= Version(first), (
        f"pyproject.toml allows {package} {floor}, but {feature} ({path}) needs {package}>={first}")


def _lock() -> dict[str, list[tuple[Version, str]]]:
    """requirements.lock as {name: [(version, marker), ...]} (a universal lock may hold one
    package at several versions, each under its own marker), and the names pyproject.toml
    pulled in directly, per uv's `# via` annotations."""
    pins: dict[str, list[tuple[Version, str]]] = {}
    for line in LOCK.read_text().splitlines():
        if not line or line[0] in "# -":
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)(?:\s*;\s*(.+))?", line.strip())
        assert m, f"requirements.lock: not a pin: {line!r}; regenerate it with make lock"
        pins.setdefault(canonicalize_name(m[1]), []).append((Version(m[2]), m[3] or ""))
    return pins


def _locked_directly() -> set[str]:
    """The packages uv's annotations say pyproject.toml asked for."""
    direct, name = set(), None
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"([A-Za-z0-9._-]+)==", line):
            name = canonicalize_name(m[1])
        elif name and "diffusion-pipeline (pyproject.toml)" in line:
            direct.add(name)
    return direct


def test_the_lock_satisfies_every_requirement():
    pins = _lock()
    for name, req in _requirements().items():
        if name in UNLOCKED:
            assert name not in pins, f"requirements.lock pins {name}; make lock leaves it out"
            continue
        assert name in pins or req.marker is not None, (
            f"pyproject.toml requires {req}, requirements.lock has no {name}: run make lock")
        for version, marker in pins.get(name, []):
            assert req.specifier.contains(version, prereleases=True), (
                f"pyproject.toml requires {req}, requirements.lock pins {name}=={version}"
                + (f" ({marker})" if marker else "") + ": run make lock")


def test_the_lock_holds_no_dropped_requirement():
    stale = _locked_directly() - set(_requirements())
    assert not stale, (f"requirements.lock still pins {sorted(stale)} for pyproject.toml, "
                       "which no longer asks for them: run make lock")


def test_the_makefile_installs_the_lock_unresolved_and_a_torch_pyproject_allows():
    makefile = (REPO / "Makefile").read_text()
    torch_spec = re.search(r"^TORCH_SPEC \?= *(\S+)$", makefile, re.M)[1]
    pinned = Requirement(torch_spec)
    assert [s.operator for s in pinned.specifier] == ["=="], torch_spec
    assert _requirements()["torch"].specifier.contains(next(iter(pinned.specifier)).version)
    recipe = makefile.split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "--no-deps -r $(LOCK)" in recipe and "-c $(LOCK)" in recipe, recipe
    assert "infra/lock-excludes.txt" in makefile
    excluded = {canonicalize_name(line.strip()) for line in
                (REPO / "infra/lock-excludes.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert excluded == UNLOCKED


def test_the_image_installs_within_the_lock():
    """infra/docker/Dockerfile: the package and its Ray extras at the lock's versions (pip
    resolves, but every package it may pick is pinned), checked by pip check; its Ray release is
    the lock's. torch stays the base image's CUDA build."""
    text = re.sub(r"\\\n", " ", (REPO / "infra/docker/Dockerfile").read_text())
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    copies = " ".join(ln for ln in code if ln.startswith("COPY "))
    assert "requirements.lock" in copies.split(), copies
    (install,) = [ln for ln in code if ln.startswith("RUN ") and "pip install ." in ln]
    assert re.search(r"pip install \..* -c requirements\.lock( |$)", install), install
    assert "pip check" in install
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M)[1]
    assert [str(v) for v, _ in _lock()["ray"]] == [ray_version], (
        "ARG RAY_VERSION in infra/docker/Dockerfile must be requirements.lock's ray")

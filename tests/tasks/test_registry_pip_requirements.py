"""The registered model's pip requirements: the five packages it imports pinned, and everything
they need pinned as constraints, so a serving host installs what the model was built with."""

from __future__ import annotations

from importlib.metadata import distribution, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tasks.registry.pyfunc import _pip_requirements

TOP = ("mlflow", "torch", "numpy", "pandas", "safetensors")


def _installed(name: str) -> str:
    return version(name).split("+")[0]


def test_the_model_pins_its_packages_and_constrains_all_they_need(tmp_path):
    reqs = _pip_requirements(tmp_path)
    assert [r for r in reqs if not r.startswith("-c ")] == [f"{p}=={_installed(p)}" for p in TOP]
    (constraint,) = [r for r in reqs if r.startswith("-c ")]
    lines = Path(constraint.removeprefix("-c ")).read_text().split()
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines), "one pin per package"
    assert {canonicalize_name(p) for p in TOP} <= set(pins)
    # mlflow's server and store, and torch's own dependencies, are pinned too
    assert {"flask", "sqlalchemy", "sympy", "filelock"} <= set(pins)
    for name, pinned in pins.items():
        assert pinned == _installed(name) and "+" not in pinned
        # closed: whatever a pinned package needs here is pinned as well
        for line in distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                assert canonicalize_name(req.name) in pins, f"{name} needs {req.name}"

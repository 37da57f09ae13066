"""Which code this process runs: the project's version and a digest of its Python sources.

A Ray Job runs whatever the cluster's image holds, which need not be what the submitting
checkout holds. The job's request records both (:func:`code_identity`), the job's key covers
them, and ``diffusion-pipeline job-run`` refuses a request made by other code
(:func:`check_same_code`): a job never runs one version's stage on another version's request.

The digest covers the ``.py`` files of the three packages (``diffusion``, ``tasks``, ``flows``),
by path relative to their parent and content, as imported: the same in a checkout (editable
install) and in an image that installed the wheel. Documentation, tests and benchmarks are left
out; they change no job's output.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from tasks.errors import CodeMismatch

PACKAGES = ("diffusion", "tasks", "flows")
_HERE = Path(__file__).resolve().parent.parent  # the directory holding the three packages


@functools.cache
def code_digest() -> str:
    """sha256 over the packages' sources (sorted relative paths and contents), hex."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((_HERE / package).rglob("*.py")):
            rel = path.relative_to(_HERE).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


@functools.cache
def project_version() -> str:
    """The installed distribution's version (``unknown`` where it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusion-pipeline")
    except PackageNotFoundError:
        return "unknown"


def code_identity() -> dict[str, str]:
    """``{"version": ..., "digest": ...}`` of this process's code."""
    return {"version": project_version(), "digest": code_digest()}


def describe(code: dict | None) -> str:
    """``diffusion-pipeline 0.1.0 (code 1a2b3c4d5e6f)`` for messages."""
    if not code:
        return "an unrecorded version"
    return f"diffusion-pipeline {code.get('version')} (code {str(code.get('digest'))[:12]})"


def check_same_code(requested: dict | None, *, where: str) -> None:
    """Raise :class:`CodeMismatch` unless ``requested`` (a request's ``code``) is this code."""
    here = code_identity()
    if requested and requested.get("digest") == here["digest"]:
        return
    raise CodeMismatch(
        f"{where} was submitted by {describe(requested)} but this node runs {describe(here)}; "
        "install the same release on the cluster's image and on the submitting side "
        "(infra/Dockerfile), then rerun")

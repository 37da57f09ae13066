"""Lineage: where a registered version came from (dataset version, config fingerprint,
checkpoint, training run, code version, Prefect flow run), recorded as tags on the version.

The flow run's id is the caller's to pass (``prefect.flow_run_id`` in ``lineage``:
:func:`flows.registry.register_task` does); tasks/ never asks Prefect."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks.errors import RegistryError

REQUIRED_LINEAGE = ("dataset.version", "config.sha256", "checkpoint.uri")
REPO_DIR = Path(__file__).resolve().parents[2]  # tasks/registry/lineage.py → the checkout


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), else the package version."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_DIR, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"diffusion-pipeline=={version('diffusion-pipeline')}"
    except Exception:
        return "unknown"


def lineage_from(train_summary: dict, config_sha256: str) -> dict[str, str]:
    """Lineage tags from ``TrainResult.summary()`` and the pipeline config's fingerprint."""
    ds = train_summary.get("dataset") or {}
    out = {"dataset.name": ds.get("name"), "dataset.version": ds.get("version"),
           "config.sha256": config_sha256, "checkpoint.uri": train_summary.get("checkpoint_uri"),
           "training.run_name": train_summary.get("run_name"),
           "training.mlflow_run_id": train_summary.get("mlflow_run_id")}
    return {k: str(v) for k, v in out.items() if v is not None}


def lineage_tags(evaluation: dict, lineage: dict[str, str]) -> dict[str, str]:
    """A new version's lineage tags: the code version, the evaluated dataset, then ``lineage``
    (which wins; inside a flow run it holds ``prefect.flow_run_id``); refused unless it holds
    every tag of ``REQUIRED_LINEAGE``."""
    tags: dict[str, str] = {"code.version": code_version()}
    ds = evaluation.get("dataset") or {}
    if ds.get("version"):
        tags["dataset.version"] = str(ds["version"])
    if ds.get("name"):
        tags["dataset.name"] = str(ds["name"])
    tags |= {str(k): str(v) for k, v in lineage.items() if v is not None}
    missing = [k for k in REQUIRED_LINEAGE if not tags.get(k)]
    if missing:
        raise RegistryError(f"lineage lacks {', '.join(missing)}; pass them in lineage= "
                            "(tasks.registry.lineage_from builds them from the training result)")
    return tags

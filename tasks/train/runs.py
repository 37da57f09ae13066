"""A training run on storage, ``<root>/runs/<run_name>/``, and how it ended.

Ray's Result only carries the metrics of the last *checkpoint*, so rank 0 writes how each
attempt ended (finished, diverged) to ``<run>/_status.json``; the driver reads it, and a run
counts as finished when that file says so and a checkpoint of its final step is still there.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from diffusion.pipeline import DiffusionConfig
from tasks.datasets import open_dataset
from tasks.errors import RunNotFound, TrainConfigError
from tasks.storage import Location, atomic_write_bytes, call, exists, read_json
from tasks.train.config import EXECUTION_KEYS, TrainConfig, default_run_name, run_identity

if TYPE_CHECKING:  # the driver's types; workers import this module for write_status
    from tasks.datasets import DataConfig
    from tasks.runtime import RuntimeConfig

STATUS_FILE = "_status.json"


def write_status(run_dir: str, options: dict, metrics: dict) -> None:
    """Record how this attempt ended in ``<run_dir>/_status.json`` (rank 0 only calls it)."""
    loc = Location.of(run_dir, options).child(STATUS_FILE)
    atomic_write_bytes(loc, json.dumps(metrics, indent=2).encode())


def finished_run(data: DataConfig, model: Any, diffusion: DiffusionConfig, train: TrainConfig,
                 runtime: RuntimeConfig) -> dict:
    """The finished training run this config names (``train.run_name`` or the default name
    derived from the dataset version and the config), without starting Ray:
    ``{"run_name", "checkpoint_uri", "metrics", "dataset"}``. The checkpoint is the newest
    ``checkpoint_*`` whose step is the run's final step. Raises :class:`RunNotFound`."""
    root = runtime.root_location()
    ref, manifest = open_dataset(root, data.name, data.version)
    identity = run_identity(model, diffusion, train)
    run_name = train.run_name or default_run_name(manifest, identity)
    check_same_model(root.child("runs", run_name), identity)
    found = find_finished(root, run_name, train.steps)
    if isinstance(found, str):
        raise RunNotFound(
            f"training run {run_name} (for dataset {ref.name}@{ref.version} and this config) "
            f"{found}; run `diffusion-pipeline train` with the same config first, or pass the "
            "model explicitly")
    return found | {"run_name": run_name, "dataset": ref.to_dict()}


def check_same_model(run_dir: Location, identity: dict) -> None:
    """TrainConfigError if run ``run_dir`` holds checkpoints of another model: its recorded
    model, diffusion or train settings differ from ``identity`` (:func:`run_identity`) in more
    than what may change between attempts of one run (``train.steps``, which a longer run
    raises, and the execution settings). Without this a reused ``train.run_name`` crash-looped
    restoring weights of another shape, or its finished checkpoint was reused as this config's
    model."""
    from tasks.checkpoints import STATE_FILE

    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1]
                       for p in call(run_dir, run_dir.fs.ls, run_dir.path, detail=False))
    except FileNotFoundError:
        return
    for name in reversed([n for n in names if n.startswith("checkpoint_")]):
        state_loc = run_dir.child(name, STATE_FILE)
        if exists(state_loc):
            state = read_json(state_loc)  # run_identity: since it was recorded; else the config
            recorded = state.get("run_identity") or state.get("config") or {}
            break
    else:
        return
    diffs = [f"{key}={_short(was)} (this config: {_short(now)})"
             for key, was, now in _differences(recorded, identity)]
    if diffs:
        raise TrainConfigError(
            f"training run {run_dir.describe().rsplit('/', 1)[-1]} holds a different model: "
            f"it was trained with {'; '.join(diffs[:3])}"
            + (f" and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            + ". A run name holds one model: set another train.run_name, or leave it unset "
            "(the default name follows the config)")


def _differences(recorded: dict, identity: dict) -> list[tuple[str, Any, Any]]:
    out = []
    for section in ("model", "diffusion", "train"):
        was, now = recorded.get(section) or {}, identity.get(section) or {}
        for key in sorted(set(was) | set(now)):
            if section == "train" and (key in EXECUTION_KEYS or key == "steps"):
                continue
            if section in recorded and was.get(key) != now.get(key):
                out.append((f"{section}.{key}", was.get(key), now.get(key)))
    return out


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def find_finished(root, run_name: str, steps: int) -> dict | str:
    """``{"checkpoint_uri", "metrics"}`` of run ``run_name`` if it finished at ``steps`` or
    later, else the reason it does not count as finished."""
    from tasks.checkpoints import STATE_FILE

    run_dir = root.child("runs", run_name)
    status_loc = run_dir.child(STATUS_FILE)
    status = read_json(status_loc) if exists(status_loc) else {}
    if status.get("status") != "finished":
        state = f"is {status['status']}" if status else "does not exist"
        return f"{state} under {root.child('runs').describe()}"
    if status.get("step", 0) < steps:
        return f"finished at step {status.get('step')}, before train.steps={steps}"
    found = []
    for path in call(run_dir, run_dir.fs.ls, run_dir.path, detail=False):
        name = path.rstrip("/").split("/")[-1]
        state_loc = run_dir.child(name, STATE_FILE)
        if (name.startswith("checkpoint_") and exists(state_loc)
                and read_json(state_loc).get("step") == status["step"]):
            found.append(name)
    if not found:
        return (f"finished at step {status['step']} but no checkpoint of that step is left in "
                f"{run_dir.describe()}")
    return {"checkpoint_uri": run_dir.child(max(found)).url, "metrics": status}

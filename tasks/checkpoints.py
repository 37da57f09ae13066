"""Training checkpoints: safetensors + JSON, verified on load, never pickle.

A checkpoint is a directory::

    model/model.safetensors   the EMA weights, loadable on their own (diffusion.serialization)
    model/config.json         {"unet": ..., "diffusion": ..., "class_names": ...} + digest
    training.safetensors      raw weights ("model.*"), optimizer tensors ("opt.<param>.<key>"),
                              RNG states ("rng.*"), the EMA shadow ("ema.*")
    state.json                written last: step, optimizer hyper-parameters, LR-scheduler
                              state, the resolved config, the dataset version, and the SHA-256
                              of every other file

:func:`load_training_checkpoint` checks every digest before any tensor is parsed and raises
:class:`CheckpointError` naming the file, so a truncated or tampered checkpoint is refused and
the caller can fall back to an older one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from diffusion.ema import unwrap
from diffusion.serialization import save_model
from tasks.errors import CheckpointError

STATE_FILE = "state.json"
TRAINING_FILE = "training.safetensors"
MODEL_DIR = "model"
FORMAT = "diffusion-pipeline/train-checkpoint"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    ema,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    generator: torch.Generator,
    step: int,
    model_config: dict,
    extra: dict,
) -> Path:
    """Write a checkpoint into ``directory`` (``state.json`` last)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)  # no DDP "module." prefixes in what is saved
    raw = {f"model.{k}": v for k, v in model.state_dict().items()}
    shadow = {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    rng = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["rng.cuda"] = torch.cuda.get_rng_state()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in
               {**raw, **shadow, **opt_tensors, **rng}.items()}
    safetensors.torch.save_file(tensors, str(d / TRAINING_FILE))
    with ema.swapped(model) as m:
        save_model(d / MODEL_DIR, m.state_dict(), model_config)
    files = [TRAINING_FILE, f"{MODEL_DIR}/model.safetensors", f"{MODEL_DIR}/config.json"]
    state = {
        "format": FORMAT,
        "step": int(step),
        "created_at": datetime.now(UTC).isoformat(),
        "optimizer": opt_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "ema": {"num_updates": getattr(ema, "num_updates", None)},
        "sha256": {f: _sha256(d / f) for f in files},
        **extra,
    }
    tmp = d / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, d / STATE_FILE)
    return d


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


@dataclass
class TrainingCheckpoint:
    step: int
    state: dict
    tensors: dict[str, torch.Tensor]

    def restore(self, *, model, ema, optimizer, lr_scheduler, generator) -> None:
        t = self.tensors
        unwrap(model).load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        opt_tensors = {k: v for k, v in t.items() if k.startswith("opt.")}
        optimizer.load_state_dict(_optimizer_state(opt_tensors, self.state["optimizer"]))
        lr_scheduler.load_state_dict(self.state["lr_scheduler"])
        torch.set_rng_state(t["rng.torch"])
        generator.set_state(t["rng.generator"])
        if "rng.cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["rng.cuda"])


def read_state(directory: str | os.PathLike) -> dict:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {STATE_FILE}: the checkpoint is incomplete")
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is damaged") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint (format {state.get('format')})")
    return state


def verify(directory: str | os.PathLike) -> dict:
    """The checkpoint's state.json, after checking every file against its recorded SHA-256."""
    d = Path(directory)
    state = read_state(d)
    for rel, digest in state["sha256"].items():
        f = d / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
        actual = _sha256(f)
        if actual != digest:
            raise CheckpointError(
                f"{f}: SHA-256 mismatch (recorded {digest[:12]}…, actual {actual[:12]}…); the "
                "file is truncated or was modified"
            )
    return state


def load_training_checkpoint(directory: str | os.PathLike) -> TrainingCheckpoint:
    d = Path(directory)
    state = verify(d)
    try:
        tensors = safetensors.torch.load_file(str(d / TRAINING_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{d / TRAINING_FILE} is not readable safetensors: {e}") from e
    return TrainingCheckpoint(step=int(state["step"]), state=state, tensors=tensors)

"""The training stage: Ray Train's TorchTrainer on a committed dataset version.

The driver opens the dataset through its manifest, validates the config against it (before any
worker starts), builds a Ray Data pipeline over the train split (uint8 pixels → [B, C, H, W]
tensors), and runs :func:`train_loop_per_worker` on ``train.num_workers`` workers with DDP.
The run lives at ``<root>/runs/<run_name>/`` (Ray Train's storage path and name): starting the
same run name again resumes from its latest checkpoint (Ray Train V2 restores the run snapshot),
and worker failures are retried from the last checkpoint (``FailureConfig``).

The loop counts optimizer steps, not epochs, and ends at exactly ``train.steps``. Every
``train.checkpoint_every`` steps rank 0 writes a checkpoint (:mod:`tasks.checkpoints`) and all
ranks report it. A non-finite loss stops every rank at the same step (the check is on the
all-reduced gradient norm); the run then ends with status ``diverged`` and the driver raises
:class:`TrainingDiverged` naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from diffusion.pipeline import DiffusionConfig
from diffusion.training import OPTIM_BOUNDS, OptimConfig, check_optim_value
from tasks.datasets import DataConfig, open_dataset, part_files
from tasks.errors import (
    CheckpointError,
    LeaseBusy,
    RunNotFound,
    TrainConfigError,
    TrainingBusy,
    TrainingDiverged,
)
from tasks.pixels import to_arrays
from tasks.runtime import RuntimeConfig, ensure_ray
from tasks.storage import call, exists, protocol_of, read_json, storage_options

STATUS_FILE = "_status.json"
# The training run's lease (tasks.lease), held by the driver for the whole job: refreshed every
# LEASE_STALE_S / 4 s; a second driver waits up to LEASE_WAIT_S (past the stale age, so a run
# restarted after a crash elsewhere takes over), then fails naming the holder.
LEASE_STALE_S = 120.0
LEASE_WAIT_S = 180.0
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")




class TrainConfig(BaseModel):
    """The ``train`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The optimiser's keys (diffusion.training.OptimConfig's, same names) are range-checked by
    # its own OPTIM_BOUNDS (_optim_bounds below), so the two can never disagree.
    steps: int = Field(800, description="Optimizer steps in total (not epochs).")
    batch_size: int = Field(128, ge=1, description="Global batch, split evenly over workers.")
    lr: float = 2e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    label_dropout: float = Field(0.1, description="Null-label share (guidance).")
    hflip: bool = Field(False, description="Random horizontal flips.")
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per worker.")
    cpu_threads: int | None = Field(
        None, ge=1, description="Torch threads per CPU worker. Default: the node's cores divided "
        "by the workers on that node, as a plain PyTorch process would use.")
    gpus_per_worker: float = Field(1.0, gt=0)
    bf16: Literal["auto", "on", "off"] = Field("auto", description="auto: on with GPUs.")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = Field(False, description="torch.compile the model.")
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(50, ge=1)
    sample_every: int = Field(0, ge=0, description="Log a sample grid every N steps (0: off).")
    max_failures: int = Field(3, ge=0, description="Worker-group restarts before giving up.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes (SPREAD: one per node if possible).")
    seed: int = 0
    run_name: str | None = Field(
        None, description="Names the run; the same name resumes it. Default: derived from the "
        "dataset version and the config, so an unchanged rerun resumes (or finds it done).")

    @field_validator(*OPTIM_BOUNDS)
    @classmethod
    def _optim_bounds(cls, v, info: ValidationInfo):
        return check_optim_value(info.field_name, v)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v):
        if v is not None and not RUN_NAME_RE.match(v):
            raise ValueError(f"train.run_name {v!r} must be 1-128 letters, digits, '.', '_', '-'")
        return v


def optim_config(train: TrainConfig, diffusion: DiffusionConfig) -> OptimConfig:
    """The optimiser settings: ``train``'s keys that OptimConfig has, and ``diffusion``'s loss."""
    shared = {f.name for f in dataclasses.fields(OptimConfig)} & set(TrainConfig.model_fields)
    return OptimConfig(**{k: getattr(train, k) for k in shared}, loss=diffusion.loss_config())


# --------------------------------------------------------------------------------------------
# Validation against the dataset (driver, before any worker starts)
# --------------------------------------------------------------------------------------------


def check_config(train: TrainConfig, diffusion: DiffusionConfig) -> None:
    """The checks that need no dataset (the retrain flow runs them before any work)."""
    if train.warmup_steps > train.steps:
        raise TrainConfigError(
            f"train.warmup_steps={train.warmup_steps} exceeds train.steps={train.steps}")
    if train.batch_size % train.num_workers:
        raise TrainConfigError(
            f"train.batch_size={train.batch_size} is not divisible by train.num_workers="
            f"{train.num_workers}; each worker takes an equal share")
    try:
        optim_config(train, diffusion)
    except ValueError as e:
        raise TrainConfigError(f"invalid train/diffusion config: {e}") from None


def validate(model: Any, train: TrainConfig, manifest: dict,
             diffusion: DiffusionConfig | None = None) -> None:
    """Raise TrainConfigError (naming the field) for anything a worker would trip over."""
    check_config(train, diffusion or DiffusionConfig())
    c, h, w = manifest["shape"]
    if model.resolution != h:
        raise TrainConfigError(
            f"model.resolution={model.resolution} does not match the dataset "
            f"{manifest['name']}@{manifest['version']} ({h}x{w}); set model.resolution={h}")
    if model.in_channels != c:
        raise TrainConfigError(
            f"model.in_channels={model.in_channels} does not match the dataset's {c} channel(s);"
            f" set model.in_channels={c}")
    n_classes = manifest["num_classes"]
    if model.num_classes is not None and model.num_classes != n_classes:
        raise TrainConfigError(
            f"model.num_classes={model.num_classes} but the dataset has {n_classes} classes "
            f"({', '.join(manifest['class_names'][:10]) or 'unlabelled'}); set "
            f"model.num_classes={n_classes or 'null'}")
    rows = manifest["splits"]["train"]["rows"]
    if train.batch_size > rows:
        raise TrainConfigError(
            f"train.batch_size={train.batch_size} is larger than the dataset's train split "
            f"({rows} rows); lower train.batch_size")


# How a run is executed and observed, not what it computes: left out of the default run name,
# so changing them resumes the same run instead of starting a new one.
EXECUTION_KEYS = frozenset({
    "run_name", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
    "max_failures", "placement_strategy", "cpus_per_worker", "gpus_per_worker", "cpu_threads",
})


def default_run_name(manifest: dict, job: dict) -> str:
    """``<dataset>-<version[:8]>-<digest of model, diffusion and train minus EXECUTION_KEYS>``."""
    identity = {"model": job["model"], "diffusion": job["diffusion"],
                "train": {k: v for k, v in job["train"].items() if k not in EXECUTION_KEYS}}
    payload = json.dumps(identity, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{manifest['name']}-{manifest['version'][:8]}-{digest}"


# --------------------------------------------------------------------------------------------
# Data: the train split as uint8 arrays for iter_torch_batches
# --------------------------------------------------------------------------------------------


def _pyarrow_fs(root):
    if root.is_local:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(root.fs))


def build_dataset(root, manifest: dict, *, materialize_below_bytes: int = 512 * 2**20):
    import ray

    # Our loop prints one progress line per logging interval; Ray Data's bars would repeat
    # per epoch. The dataset copies the context when it is created.
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        return _build_dataset(root, manifest, materialize_below_bytes)
    finally:
        ctx.enable_progress_bars = saved


def _build_dataset(root, manifest: dict, materialize_below_bytes: int):
    import ray

    paths = part_files(root, manifest, "train")
    ds = ray.data.read_parquet(paths, filesystem=_pyarrow_fs(root)).select_columns(
        ["label", "pixels"])
    ds = ds.map_batches(to_arrays, batch_format="pyarrow", fn_kwargs={"shape": manifest["shape"]})
    size = sum(f["bytes"] for f in manifest["splits"]["train"]["files"])
    if size * 4 < materialize_below_bytes:  # small: decode once, iterate from the object store
        ds = ds.materialize()
    return ds


# --------------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------------


def _batches(shard, per_worker: int, seed: int, in_memory: bool = False):
    """Endless batches of ``per_worker`` rows from this worker's shard.

    Streaming (large datasets): every epoch is a new pass of Ray Data with a local shuffle
    buffer. ``in_memory`` (the dataset was materialized because it is small): the first epoch
    streams as usual and keeps the rows; later epochs are random permutations of them, without
    restarting Ray Data's execution (a 40-55 ms stall per epoch, see
    benchmarks/results/train_throughput.md) and with a full rather than a buffer-local shuffle.
    """
    import torch

    epoch, kept = 0, []
    while True:
        n = 0
        for b in shard.iter_torch_batches(batch_size=per_worker, drop_last=not in_memory,
                                          local_shuffle_buffer_size=max(4 * per_worker, 256),
                                          local_shuffle_seed=seed + epoch):
            if in_memory:
                kept.append(b)
                if len(b["x"]) < per_worker:  # the shard's tail: kept for later epochs only
                    continue
            n += 1
            yield b
        if n == 0:
            raise RuntimeError(
                f"this worker's shard yields no batch of {per_worker}; lower train.batch_size")
        epoch += 1
        if in_memory:
            break
    data = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}
    del kept
    rows = len(data["x"])
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows, generator=gen)
        for i in range(0, rows - per_worker + 1, per_worker):
            idx = order[i:i + per_worker]
            yield {k: v[idx] for k, v in data.items()}


def _fault(spec: str | None, step: int, rank: int, marker_dir: str) -> str | None:
    """Test hook: 'kill@N' SIGKILLs rank 0 once at step N; 'nan@N' poisons the loss at step N."""
    if not spec:
        return None
    kind, at = spec.split("@")
    if int(at) != step:
        return None
    if kind == "nan":
        return "nan"
    if kind == "kill" and rank == 0:
        marker = os.path.join(marker_dir, f".fault-kill-{at}")
        if not os.path.exists(marker):
            os.makedirs(marker_dir, exist_ok=True)
            open(marker, "w").close()
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    return None


def _restore(checkpoint, run_dir: str, options: dict, echo) -> Any:
    """The newest checkpoint of this run that passes verification, or None.

    Candidates are Ray's latest reported checkpoint and every ``checkpoint_*`` directory in the
    run's storage folder: Ray's controller collects reports every ~2 s, so a checkpoint written
    just before a crash can be on storage yet unknown to Ray. A damaged candidate is refused
    (with the reason) and the next older one is tried.
    """
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from tasks.checkpoints import STATE_FILE, load_training_checkpoint
    from tasks.storage import Location

    loc = Location.of(run_dir, options)
    fs = _pyarrow_fs(loc) or pafs.LocalFileSystem()
    try:
        infos = fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError:
        infos = []
    candidates = {i.path for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    if checkpoint is not None and isinstance(fs, pafs.LocalFileSystem) == (
            checkpoint.filesystem is None or isinstance(checkpoint.filesystem,
                                                         pafs.LocalFileSystem)):
        candidates.add(checkpoint.path)

    def step_of(path: str) -> int:
        try:
            with fs.open_input_stream(f"{path}/{STATE_FILE}") as f:
                return int(json.loads(f.read())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    ordered = sorted(candidates, key=lambda p: (step_of(p), p), reverse=True)
    for p in ordered:
        try:
            with Checkpoint(p, filesystem=fs).as_directory() as d:
                ck = load_training_checkpoint(d)
        except (CheckpointError, OSError) as e:
            echo(f"refusing checkpoint {p}: {e}")
            continue
        echo(f"restoring checkpoint {p} (step {ck.step})")
        return ck
    if ordered:
        echo("no usable checkpoint; starting from step 0")
    return None


def train_loop_per_worker(cfg: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from diffusion.ema import EMA
    from diffusion.training import make_lr_scheduler, make_optimizer, train_step
    from diffusion.unet import UNet, UNetConfig
    from tasks.checkpoints import save_training_checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = TrainConfig.model_validate(cfg["train"])
    diff = DiffusionConfig.from_dict(cfg["diffusion"])
    model_cfg = UNetConfig.from_dict(cfg["model"])
    optim = optim_config(train, diff)
    schedule = diff.build_schedule()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    autocast = torch.bfloat16 if (train.bf16 == "on" or (train.bf16 == "auto" and on_gpu)) \
        else None
    channels_last = train.channels_last == "on" or (train.channels_last == "auto" and on_gpu)

    def echo(msg: str) -> None:
        if rank == 0:
            print(f"[train {cfg['run_name']}] {msg}", flush=True)

    def final(metrics: dict) -> None:
        """Tell the driver how this attempt ended: Ray's Result only carries the metrics of
        the last *checkpoint*, so the outcome goes to <run>/_status.json (rank 0)."""
        if rank == 0:
            from tasks.storage import Location, atomic_write_bytes

            loc = Location.of(cfg["run_dir"], cfg["storage_options"]).child(STATUS_FILE)
            atomic_write_bytes(loc, json.dumps(metrics, indent=2).encode())

    if not on_gpu:
        # Ray starts workers with OMP_NUM_THREADS=1, where a plain PyTorch process would use
        # every core (benchmarks/results/train_throughput.md: 1 thread is ×0.78 of 2 on a 2-core
        # machine). Share the node's cores among the workers on it unless told otherwise.
        torch.set_num_threads(train.cpu_threads or max(
            1, len(os.sched_getaffinity(0)) // ray.train.get_context().get_local_world_size()))
    torch.manual_seed(train.seed)
    model = UNet(model_cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, decay=train.ema_decay)
    opt = make_optimizer(model, optim)
    sched = make_lr_scheduler(opt, optim)
    gen = torch.Generator(device=device).manual_seed(train.seed * 7919 + rank)
    start = 0
    ck = _restore(ray.train.get_checkpoint(), cfg["run_dir"], cfg["storage_options"], echo)
    if ck is not None:
        ck.restore(model=model, ema=ema, optimizer=opt, lr_scheduler=sched, generator=gen)
        start = ck.step
        echo(f"resumed at step {start}")
    if start >= train.steps:
        echo(f"already at step {start} of {train.steps}; nothing to train")
        final({"step": start, "status": "finished", "resumed_from": start})
        return
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    nodes = 1
    if world > 1:
        import torch.distributed as dist

        ids: list = [None] * world
        dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
        nodes = len(set(ids))
        echo(f"{world} workers on {nodes} node(s)")
    net = torch.compile(ddp_model) if train.compile else ddp_model
    null_class = model_cfg.num_classes
    per_worker = train.batch_size // world
    batches = _batches(ray.train.get_dataset_shard("train"), per_worker, train.seed + 31 * start,
                       in_memory=cfg.get("in_memory", False))
    marker_dir = cfg.get("fault_dir") or tempfile.gettempdir()

    from tasks.tracking import RunLogger

    tracker = RunLogger(cfg.get("mlflow_uri"), cfg.get("mlflow_run_id"), echo) if rank == 0 \
        else RunLogger(None, None, echo)
    T = schedule.T
    window = {"loss": 0.0, "n": 0, "grad": 0.0, "q": np.zeros(4), "qn": np.zeros(4)}
    t_window = time.perf_counter()
    last_good = start
    for step in range(start, train.steps):
        b = next(batches)
        x = b["x"].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if train.hflip:
            flip = torch.rand(x.shape[0], device=device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = None
        if null_class is not None:
            labels = b["label"].to(device)
            labels = torch.where(labels < 0, torch.full_like(labels, null_class), labels)
        if _fault(cfg.get("fault"), step + 1, rank, marker_dir) == "nan":
            x = x * float("nan")
        try:
            out = train_step(net, opt, sched, x, labels, schedule, optim, ema=ema,
                             null_class=null_class, generator=gen, autocast_dtype=autocast)
        except FloatingPointError as e:
            echo(f"non-finite loss at step {step + 1}: {e}")
            final({"step": step + 1, "status": "diverged", "error": str(e),
                   "last_good_step": last_good, "resumed_from": start})
            return
        window["loss"] += out["loss"]
        window["grad"] += out["grad_norm"]
        window["n"] += 1
        q = (out["t"] * 4 // T).clamp_(0, 3).cpu().numpy()
        per = out["per_sample"].float().cpu().numpy()
        np.add.at(window["q"], q, per)
        np.add.at(window["qn"], q, 1)
        done = step + 1
        is_ckpt = done % train.checkpoint_every == 0 or done == train.steps
        if done % train.log_every == 0 or is_ckpt:
            dt = time.perf_counter() - t_window
            n = max(window["n"], 1)
            metrics = {
                "step": done,
                "status": "running" if done < train.steps else "finished",
                "resumed_from": start,
                "nodes": nodes,
                "loss": window["loss"] / n,
                "grad_norm": window["grad"] / n,
                "lr": sched.get_last_lr()[0],
                "images_per_s": window["n"] * train.batch_size / max(dt, 1e-9),
                **{f"loss_q{i + 1}": float(window["q"][i] / window["qn"][i])
                   for i in range(4) if window["qn"][i]},
            }
            echo(f"step {done}/{train.steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                 f"{metrics['images_per_s']:.0f} img/s")
            tracker.metrics(metrics, done)
            if is_ckpt:
                with tempfile.TemporaryDirectory() as d:
                    checkpoint = None
                    if rank == 0:
                        save_training_checkpoint(
                            d, model=model, ema=ema, optimizer=opt, lr_scheduler=sched,
                            generator=gen, step=done,
                            model_config={"unet": cfg["model"], "diffusion": cfg["diffusion"],
                                          "class_names": cfg["class_names"]},
                            extra={"config": cfg["pipeline"], "dataset": cfg["dataset"],
                                   "run_name": cfg["run_name"]},
                        )
                        checkpoint = ray.train.Checkpoint.from_directory(d)
                    ray.train.report(metrics, checkpoint=checkpoint)
                last_good = done
            else:
                ray.train.report(metrics)
            if rank == 0 and train.sample_every and (done % train.sample_every == 0
                                                     or done == train.steps):
                _log_grid(model, ema, model_cfg, schedule, diff.prediction, done, tracker)
            if done == train.steps:
                final(metrics)
            window = {"loss": 0.0, "n": 0, "grad": 0.0, "q": np.zeros(4), "qn": np.zeros(4)}
            t_window = time.perf_counter()


def _log_grid(model, ema, model_cfg, schedule, prediction, step, tracker) -> None:
    """A grid of EMA samples (DDIM 20; one row per class for conditional models)."""
    import torch

    from diffusion import SampleNoise, SamplerConfig
    from diffusion.pipeline import sample_images
    from tasks.images import save_grid_png

    inner = getattr(model, "module", model)
    n_cls = model_cfg.num_classes
    labels = torch.arange(n_cls).repeat_interleave(8) if n_cls else None
    n = len(labels) if labels is not None else 64
    with ema.swapped(inner) as m:
        m.eval()
        dev = next(m.parameters()).device
        images = sample_images(
            m, schedule, (model_cfg.in_channels, model_cfg.resolution, model_cfg.resolution),
            SampleNoise(0, range(n), device=dev), SamplerConfig("ddim", steps=20),
            prediction=prediction, labels=labels, null_label=n_cls)
        m.train()
    with tempfile.TemporaryDirectory() as d:
        path = save_grid_png(images.numpy(), os.path.join(d, f"step{step:07d}.png"), nrow=8,
                             scale=4)
        tracker.artifact(str(path), "samples")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_name: str
    checkpoint_uri: str | None
    metrics: dict
    dataset: dict
    seconds: float
    mlflow_run_id: str | None = None
    mlflow_uri: str | None = None
    reused: bool = False  # the run had already finished: nothing was trained

    def summary(self) -> dict:
        return {"run_name": self.run_name, "checkpoint_uri": self.checkpoint_uri,
                "metrics": self.metrics, "dataset": self.dataset,
                "seconds": round(self.seconds, 1), "mlflow_run_id": self.mlflow_run_id,
                "mlflow_uri": self.mlflow_uri, "reused": self.reused}


def _identity(model: Any, diffusion: DiffusionConfig, train: TrainConfig) -> dict:
    return {"model": model.to_dict(), "diffusion": diffusion.to_dict(),
            "train": train.model_dump(mode="json")}


def finished_run(data: DataConfig, model: Any, diffusion: DiffusionConfig, train: TrainConfig,
                 runtime: RuntimeConfig) -> dict:
    """The finished training run this config names (``train.run_name`` or the default name
    derived from the dataset version and the config), without starting Ray:
    ``{"run_name", "checkpoint_uri", "metrics", "dataset"}``. The checkpoint is the newest
    ``checkpoint_*`` whose step is the run's final step. Raises :class:`RunNotFound`."""
    root = runtime.root_location()
    ref, manifest = open_dataset(root, data.name, data.version)
    run_name = train.run_name or default_run_name(manifest, _identity(model, diffusion, train))
    found = _finished(root, run_name, train.steps)
    if isinstance(found, str):
        raise RunNotFound(
            f"training run {run_name} (for dataset {ref.name}@{ref.version} and this config) "
            f"{found}; run `diffusion-pipeline train` with the same config first, or pass the "
            "model explicitly")
    return found | {"run_name": run_name, "dataset": ref.to_dict()}


def _finished(root, run_name: str, steps: int) -> dict | str:
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


def run_training(
    data: DataConfig,
    model: Any,
    diffusion: DiffusionConfig,
    train: TrainConfig,
    runtime: RuntimeConfig,
    *,
    pipeline: dict | None = None,
    echo=print,
    fault: str | None = None,
) -> TrainResult:
    """Train on the latest (or ``data.version``) committed version of ``data.name``."""
    t0 = time.perf_counter()
    root = runtime.root_location()
    ref, manifest = open_dataset(root, data.name, data.version)
    validate(model, train, manifest, diffusion)
    job = _identity(model, diffusion, train)
    run_name = train.run_name or default_run_name(manifest, job)
    job |= {
        "run_name": run_name,
        "class_names": manifest["class_names"],
        "dataset": ref.to_dict(),
        "pipeline": pipeline or {},
        "fault": fault,
    }
    runs = root.child("runs")
    job["run_dir"] = runs.child(run_name).url
    job["storage_options"] = storage_options(runs.url, runtime)
    job["fault_dir"] = runs.child(run_name).path if root.is_local else None
    echo(f"dataset {ref.name}@{ref.version}: {manifest['splits']['train']['rows']} train rows; "
         f"run {run_name} → {runs.describe()}/{run_name}")

    from tasks import tracking

    uri = tracking.tracking_uri(runtime, root)
    done = _finished(root, run_name, train.steps)
    if isinstance(done, dict):  # an unchanged rerun: no Ray, no new MLflow run
        echo(f"run {run_name} already finished at step {done['metrics']['step']}; nothing to "
             f"train (checkpoint {done['checkpoint_uri']})")
        return TrainResult(run_name, done["checkpoint_uri"], done["metrics"], ref.to_dict(),
                           time.perf_counter() - t0, tracking.find_run(uri, run_name), uri,
                           reused=True)
    from tasks.lease import Lease

    # one driver per run: a second one (an overlapping schedule, a manual run) would resume from
    # the same checkpoint and write the same checkpoint names. A holder that crashed on this
    # host is recognised at once; elsewhere its lease goes stale after LEASE_STALE_S.
    try:
        with Lease(runs.child(run_name).url, "_training", stale_s=LEASE_STALE_S,
                   wait_s=LEASE_WAIT_S, options=job["storage_options"]):
            done = _finished(root, run_name, train.steps)
            if isinstance(done, dict):  # it finished while this process waited for the lease
                echo(f"run {run_name} was finished meanwhile at step {done['metrics']['step']}")
                return TrainResult(run_name, done["checkpoint_uri"], done["metrics"],
                                   ref.to_dict(), time.perf_counter() - t0,
                                   tracking.find_run(uri, run_name), uri, reused=True)
            return _fit(job, run_name, ref, manifest, root, runs, uri, train, runtime,
                        pipeline, echo, t0)
    except LeaseBusy as e:  # only taking the lease raises it
        raise TrainingBusy(f"training run {run_name} is being trained by another process: "
                           f"{e}") from None


def _fit(job: dict, run_name: str, ref, manifest: dict, root, runs, uri: str,
         train: TrainConfig, runtime: RuntimeConfig, pipeline: dict | None, echo,
         t0: float) -> TrainResult:
    """The Ray Train job of :func:`run_training`, under the run's lease."""
    from tasks import tracking

    run_id = tracking.ensure_run(
        uri, root, run_name,
        params=tracking.flatten({k: v for k, v in (pipeline or job).items()
                                 if k in ("data", "model", "diffusion", "train")}),
        tags={"dataset.name": ref.name, "dataset.version": ref.version,
              "dataset.manifest": ref.manifest_uri,
              "config.sha256": hashlib.sha256(json.dumps(job["train"] | job["model"],
                                              sort_keys=True).encode()).hexdigest()})
    tracking.log_json(uri, run_id, manifest, "dataset/_manifest.json")
    job |= {"mlflow_uri": uri, "mlflow_run_id": run_id}
    echo(f"MLflow run {run_id} at {uri}")

    ensure_ray(runtime, echo=echo)
    import ray.train
    from ray.data.dataset import MaterializedDataset
    from ray.train.torch import TorchTrainer

    ds = build_dataset(root, manifest)
    job["in_memory"] = isinstance(ds, MaterializedDataset)
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(
            num_workers=train.num_workers, use_gpu=train.use_gpu,
            resources_per_worker=resources, placement_strategy=train.placement_strategy),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=runs.path,  # a path within storage_filesystem (no scheme)
            storage_filesystem=_pyarrow_fs(root),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets={"train": ds},
    )
    status_loc = runs.child(run_name).child(STATUS_FILE)
    if exists(status_loc):
        call(status_loc, status_loc.fs.rm, status_loc.path)
    try:
        result = trainer.fit()
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    metrics = read_json(status_loc) if exists(status_loc) else dict(result.metrics or {})
    tracking.finish_run(uri, run_id, "FINISHED" if metrics.get("status") == "finished"
                        else "FAILED")
    ckpt_uri = None
    if result.checkpoint is not None:
        p = result.checkpoint.path
        ckpt_uri = p if root.is_local else f"{protocol_of(runs.url)}://{p}"
    if metrics.get("status") == "diverged":
        raise TrainingDiverged(
            f"training run {run_name} diverged at step {metrics['step']} ({metrics['error']}); "
            f"the last good checkpoint is step {metrics['last_good_step']}"
            + (f" at {ckpt_uri}" if ckpt_uri else " (none was written)")
            + "; lower train.lr or check the data")
    if metrics.get("status") != "finished":
        raise RuntimeError(f"training run {run_name} ended without finishing: {metrics}")
    echo(f"run {run_name} finished at step {metrics['step']}; checkpoint {ckpt_uri}")
    return TrainResult(run_name, ckpt_uri, metrics, ref.to_dict(), time.perf_counter() - t0,
                       run_id, uri)

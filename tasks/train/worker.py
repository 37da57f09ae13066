"""Ray Train's per-worker loop, :func:`train_loop_per_worker`, run on every worker with DDP.

The loop counts optimizer steps, not epochs, and ends at exactly ``train.steps``. Every
``train.checkpoint_every`` steps rank 0 saves a checkpoint locally (:mod:`tasks.checkpoints`),
checks that the run's driver still holds the training lease (else every rank stops, uploading
nothing), and all ranks report it, which uploads it; MLflow logging comes after the upload. A
non-finite loss stops every rank at the same step (the check is on the all-reduced gradient
norm); the attempt then ends with status ``diverged`` in the run's status file
(:mod:`tasks.train.runs`), keeping the last good checkpoint.

TorchTrainer ships the loop to the workers by reference, so every worker imports this module:
it imports neither Prefect nor MLflow nor the driver (:mod:`tasks.train.driver`); Ray and the
model's modules are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from diffusion.pipeline import DiffusionConfig
from diffusion.training import OptimConfig
from tasks.faults import training_faults
from tasks.train.config import TrainConfig, optim_config
from tasks.train.data import _batches
from tasks.train.grid import log_sample_grid
from tasks.train.order import seed_step
from tasks.train.restore import _restore
from tasks.train.runs import write_status
from tasks.train.window import Window


def train_loop_per_worker(cfg: dict) -> None:
    """This worker's part of the run: ``cfg`` is the driver's job (``train_loop_config``, JSON).
    Build the model, resume from the run's newest usable checkpoint, train to ``train.steps``."""
    import ray.train

    from tasks.runtime import WORKER_QUIET_LOGGERS, quiet_loggers

    quiet_loggers(WORKER_QUIET_LOGGERS)  # Ray Train's "Reporting training result N: ..." lines
    w = _worker(cfg)
    _share_cpu_cores(w)
    s = _build(w)
    start = _resume(w, s)
    if start >= w.train.steps:
        w.echo(f"already at step {start} of {w.train.steps}; nothing to train")
        w.final({"step": start, "status": "finished", "resumed_from": start})
        return
    net, nodes = _distribute(w, s.model)
    per_worker = w.train.batch_size // w.world
    batches = _batches(ray.train.get_dataset_shard("train"), per_worker, seed=w.train.seed,
                       start=start, rank=w.rank, world=w.world,
                       in_memory=cfg.get("in_memory", False), rows=cfg["train_rows"])
    marker_dir = cfg.get("fault_dir") or tempfile.gettempdir()

    from tasks.tracking import RunLogger

    tracker = RunLogger(cfg.get("mlflow_uri"), cfg.get("mlflow_run_id"), w.echo) \
        if w.rank == 0 else RunLogger(None, None, w.echo)
    _train(w, s, net, batches, start, nodes, tracker, marker_dir)


# --------------------------------------------------------------------------------------------
# Setup: this worker, its model, the resume point, DDP
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Worker:
    """This worker's part in the run, fixed for the attempt: rank, configs, device, precision."""

    cfg: dict
    rank: int
    world: int
    train: TrainConfig
    diff: DiffusionConfig
    model_cfg: Any  # diffusion.unet.UNetConfig
    optim: OptimConfig
    schedule: Any
    device: Any
    autocast: Any  # torch.bfloat16, or None for full precision
    channels_last: bool

    def echo(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[train {self.cfg['run_name']}] {msg}", flush=True)

    def final(self, metrics: dict) -> None:
        """Tell the driver how this attempt ended: Ray's Result only carries the metrics of
        the last *checkpoint*, so the outcome goes to <run>/_status.json (rank 0)."""
        if self.rank == 0:
            write_status(self.cfg["run_dir"], self.cfg["storage_options"], metrics)


def _worker(cfg: dict) -> _Worker:
    """Read the job: this worker's rank, the configs, the schedule, the device's precision."""
    import ray.train
    import ray.train.torch
    import torch

    from diffusion.unet import UNetConfig

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
    return _Worker(cfg, rank, world, train, diff, model_cfg, optim, schedule, device, autocast,
                   channels_last)


def _share_cpu_cores(w: _Worker) -> None:
    """Ray starts workers with OMP_NUM_THREADS=1, where a plain PyTorch process would use
    every core (benchmarks/results/train_throughput.md: 1 thread is ×0.78 of 2 on a 2-core
    machine). Share the node's cores among the workers on it unless told otherwise."""
    import ray.train
    import torch

    if w.device.type == "cuda":
        return
    torch.set_num_threads(w.train.cpu_threads or max(
        1, len(os.sched_getaffinity(0)) // ray.train.get_context().get_local_world_size()))


@dataclass(frozen=True)
class _State:
    """What the loop trains and checkpoints: the model, its EMA, the optimizer, the learning
    rate schedule and this rank's generator (noise, t, label dropout, flips; re-seeded at
    every step by :func:`tasks.train.order.seed_step`, so its saved state is never needed)."""

    model: Any
    ema: Any
    opt: Any
    sched: Any
    gen: Any


def _build(w: _Worker) -> _State:
    """A fresh model from ``train.seed`` (the same on every rank) and its training state."""
    import torch

    from diffusion.ema import EMA
    from diffusion.training import make_lr_scheduler, make_optimizer
    from diffusion.unet import UNet

    torch.manual_seed(w.train.seed)
    model = UNet(w.model_cfg).to(w.device)
    if w.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, decay=w.train.ema_decay)
    opt = make_optimizer(model, w.optim)
    sched = make_lr_scheduler(opt, w.optim)
    gen = torch.Generator(device=w.device).manual_seed(w.train.seed * 7919 + w.rank)
    return _State(model, ema, opt, sched, gen)


def _resume(w: _Worker, s: _State) -> int:
    """The step to start at: the newest usable checkpoint's, restored into ``s``; else 0."""
    import ray.train

    ck = _restore(ray.train.get_checkpoint(), w.cfg["run_dir"], w.cfg["storage_options"],
                  w.echo)
    if ck is None:
        return 0
    ck.restore(model=s.model, ema=s.ema, optimizer=s.opt, lr_scheduler=s.sched, generator=s.gen)
    w.echo(f"resumed at step {ck.step}")
    return ck.step


def _distribute(w: _Worker, model) -> tuple[Any, int]:
    """The model wrapped for DDP (and compiled with ``train.compile``), and the number of
    nodes the workers run on."""
    import ray
    import ray.train.torch
    import torch

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    nodes = 1
    if w.world > 1:
        import torch.distributed as dist

        ids: list = [None] * w.world
        dist.all_gather_object(ids, ray.get_runtime_context().get_node_id())
        nodes = len(set(ids))
        w.echo(f"{w.world} workers on {nodes} node(s)")
    net = torch.compile(ddp_model) if w.train.compile else ddp_model
    return net, nodes


# --------------------------------------------------------------------------------------------
# The loop: one step, the logging window, the checkpoint
# --------------------------------------------------------------------------------------------


def _train(w: _Worker, s: _State, net, batches, start: int, nodes: int, tracker,
           marker_dir: str) -> None:
    """Steps ``start + 1`` .. ``train.steps``; every ``log_every`` steps (and at checkpoints)
    report the window's metrics, and write the outcome at the end."""
    from diffusion.training import train_step

    train = w.train
    window = Window(w.schedule.T)
    last_good = start
    fault_at = training_faults(w.cfg, w.rank, marker_dir)  # the tests' faults; else identity
    for step in range(start, train.steps):
        seed_step(s.gen, train.seed, w.rank, step)  # step's noise: from (seed, rank, step) alone
        x, labels = _inputs(w, next(batches), s.gen)
        x = fault_at(step + 1, x)
        try:
            out = train_step(net, s.opt, s.sched, x, labels, w.schedule, w.optim, ema=s.ema,
                             null_class=w.model_cfg.num_classes, generator=s.gen,
                             autocast_dtype=w.autocast)
        except FloatingPointError as e:
            w.echo(f"non-finite loss at step {step + 1}: {e}")
            w.final({"step": step + 1, "status": "diverged", "error": str(e),
                     "last_good_step": last_good, "resumed_from": start})
            return
        window.add(out)
        done = step + 1
        is_ckpt = done % train.checkpoint_every == 0 or done == train.steps
        if done % train.log_every == 0 or is_ckpt:
            metrics = window.metrics(done, steps=train.steps, start=start, nodes=nodes,
                                     lr=s.sched.get_last_lr()[0], batch_size=train.batch_size,
                                     world_size=w.world)
            w.echo(f"step {done}/{train.steps} loss {metrics['loss']:.4f} "
                   f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.0f} img/s")
            lost = _report(w, s, metrics, done, checkpoint=is_ckpt)
            if lost:
                w.echo(f"stopping at step {done} without writing its checkpoint: {lost}")
                if "now held by" not in lost:  # still ours, only not fresh: say why it stopped
                    w.final({"step": done, "status": "lease_lost", "error": lost,
                             "last_good_step": last_good, "resumed_from": start})
                return
            # MLflow after the upload: its calls (and retries) never sit between the lease's
            # fence and the checkpoint write
            tracker.metrics(metrics, done)
            if is_ckpt:
                last_good = done
            if w.rank == 0 and train.sample_every and (done % train.sample_every == 0
                                                       or done == train.steps):
                log_sample_grid(s.model, s.ema, w.model_cfg, w.schedule, w.diff.prediction,
                                done, tracker)
            if done == train.steps:
                w.final(metrics)
            window.reset()


def _lease_lost(w: _Worker) -> str | None:
    """Why this run's driver no longer holds the training lease, or None (rank 0 asks the
    store, every rank gets the answer): no checkpoint is written without it, so two drivers of
    one run can never both write checkpoints (:func:`tasks.lease.check_held`)."""
    lease = w.cfg.get("lease")
    if not lease:
        return None
    reason = None
    if w.rank == 0:
        from tasks.lease import check_held
        from tasks.storage import StorageError

        try:
            reason = check_held(lease["dir"], lease["name"], lease["token"],
                                stale_s=lease["stale_s"], options=w.cfg["storage_options"])
        except StorageError as e:
            reason = f"the training lease could not be checked: {e}"
    if w.world > 1:
        import torch.distributed as dist

        box = [reason]
        dist.broadcast_object_list(box, src=0)
        reason = box[0]
    return reason


def _inputs(w: _Worker, b: dict, gen) -> tuple[Any, Any]:
    """One batch on the device: x₀ in [-1, 1] (flipped at random with ``train.hflip``) and the
    labels, unlabelled rows (-1) as the null class; labels are None for unconditional models."""
    import torch

    x = b["x"].to(w.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    if w.train.hflip:
        flip = torch.rand(x.shape[0], device=w.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if w.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = None
    null_class = w.model_cfg.num_classes
    if null_class is not None:
        labels = b["label"].to(w.device)
        labels = torch.where(labels < 0, torch.full_like(labels, null_class), labels)
    return x, labels


def _report(w: _Worker, s: _State, metrics: dict, done: int, *, checkpoint: bool) -> str | None:
    """Every rank reports the window's metrics. At a checkpoint step rank 0 first saves the
    checkpoint (with the run's config and dataset) to a local temporary directory; then every
    rank checks the training lease (:func:`_lease_lost`) and, still held, reports, which
    uploads the checkpoint to the run's storage. The fence is the last thing before the upload
    (only Ray's barrier that names the checkpoint directory sits between them), so the upload
    starts within the lease's margin (``LEASE_STALE_S / 2``, :mod:`tasks.lease`) and must finish
    within it. Returns why the lease was lost (then nothing is reported or uploaded), else None."""
    import ray.train

    from tasks.checkpoints import save_training_checkpoint

    if not checkpoint:
        ray.train.report(metrics)
        return None
    cfg = w.cfg
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if w.rank == 0:
            save_training_checkpoint(
                d, model=s.model, ema=s.ema, optimizer=s.opt, lr_scheduler=s.sched,
                generator=s.gen, step=done,
                model_config={"unet": cfg["model"], "diffusion": cfg["diffusion"],
                              "class_names": cfg["class_names"]},
                extra={"config": cfg["pipeline"], "dataset": cfg["dataset"],
                       "run_name": cfg["run_name"],
                       "run_identity": {k: cfg[k] for k in ("model", "diffusion", "train")}},
            )
            ckpt = ray.train.Checkpoint.from_directory(d)
        if lost := _lease_lost(w):
            return lost
        ray.train.report(metrics, checkpoint=ckpt)
    return None

r"""Training-stage benchmark: Ray Train stage vs a plain PyTorch loop, same model, same batch.

    .venv/bin/python benchmarks/train_throughput.py 2>&1 \
        | tee benchmarks/results/train_throughput.log

In one process, with the pipeline's default model (``tasks.digits.DIGITS_UNET``, 0.76M
parameters, class-conditional) and batch size:

  (a) **plain**: a PyTorch loop over the 1,632 training digits held in memory as a uint8
      tensor; random batches, scaled to [-1, 1] exactly as the worker does, and one
      ``diffusion.training.train_step`` per step (AdamW, warmup + cosine, clipping, label
      dropout, EMA: the optimizer, schedule and EMA of the stage). It runs once per torch
      thread count in ``--plain-threads`` (default: the thread count measured inside a Ray Train
      worker of the stage's scaling config, and every core);
  (b) **stage**: ``tasks.train.run_training`` (Ray Train ``TorchTrainer``, one worker, the
      Parquet dataset written by ``tasks.preprocess``), a fresh run name each time.

*Steady-state* images/s: the median over windows of ``--log-every`` steps, from the start of
step ``--log-every`` + 1 to the start of the last step (the mean over that span is reported
too), timed inside each loop. For (b) that is inside the Ray Train worker, where a wrapper
around the stage's unchanged ``train_loop_per_worker`` timestamps each step's batch request,
``train_step``, ``ray.train.report`` and MLflow metric call (``perf_counter`` is one clock for
every process on Linux). The stage's own "[train <run>] ... X img/s" lines are kept too
(*logged*). Everything else (Ray start-up, timed once; dataset materialisation, worker-group
start, the first window, the final checkpoint and shutdown) is reported as start-up. The runs
are interleaved (A A' B, A A' B, ...). Before each run the script waits for the machine to go
quiet, and during it measures the machine's busy time from /proc/stat minus its own process
tree. Disturbed repetitions are marked and left out of the medians. The script starts its own
local Ray (``address="local"``) so that it never joins another Ray on a shared machine.

``--gpu`` also runs the GPU path once when CUDA is available (a 32x32 RGB, ~38M-parameter
UNet of the DDPM CIFAR-10 shape, bf16): it measures the GPU's bf16 matrix-multiply rate, counts
the UNet's training FLOPs per image with ``torch.utils.flop_counter.FlopCounterMode``, runs
a plain GPU loop and the stage with ``train.use_gpu=true``, and reports images/s and the model
FLOP utilisation (MFU). Without CUDA it records that it skipped. ``--gpu-only`` skips the CPU
comparison. Writes ``<tag>.json`` and ``<tag>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _machine
from _machine import CpuMeter, cpu_during, cpu_snapshot, git_revision, settle, wait_quiet
from preprocess_images import ensure_images

from flows.config import load_config
from tasks.preprocess import preprocess
from tasks.runtime import RuntimeConfig, ensure_ray, ray_init_kwargs

GOAL = 0.95
DRIVER_THREADS = None  # torch's thread count in this process before the script changed it

# The GPU model: the DDPM CIFAR-10 UNet shape (Ho et al. 2020: 128 channels, ×(1, 2, 2, 2),
# two residual blocks per level, attention at 16×16), class-conditional.
GPU_MODEL_SETS = [
    "model.resolution=32", "model.in_channels=3", "model.base_channels=128",
    "model.channel_mult=[1,2,2,2]", "model.num_res_blocks=2", "model.attention_resolutions=[16]",
    "model.num_classes=10", "model.dropout=0.1",
]
# --gpu-test-on-cpu: the same code path with a model small enough for a CPU (plumbing check).
GPU_TEST_MODEL_SETS = [
    "model.resolution=32", "model.in_channels=3", "model.base_channels=16",
    "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[16]",
    "model.num_classes=10",
]


# --------------------------------------------------------------------------------------------
# The worker's progress lines, as Ray forwards them to this process's stdout
# --------------------------------------------------------------------------------------------

LINE_RE = re.compile(r"\[train (?P<run>[^\]\s]+)\] step (?P<step>\d+)/(?P<total>\d+) "
                     r"loss (?P<loss>\S+) lr \S+ (?P<ips>[0-9.]+) img/s")


class Tap:
    """A tee on ``sys.stdout`` that keeps the training loop's progress lines with their arrival
    time (Ray's log thread looks ``sys.stdout`` up on every write)."""

    def __init__(self, stream) -> None:
        self.stream, self.buf, self.lock = stream, "", threading.Lock()
        self.seen: dict[tuple[str, int], dict] = {}

    def write(self, s: str) -> int:
        now = time.perf_counter()
        self.stream.write(s)
        with self.lock:
            self.buf += s
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                m = LINE_RE.search(line)
                if m:  # Ray may print a line twice (stdout and log file): keep the first
                    self.seen.setdefault((m["run"], int(m["step"])), {
                        "step": int(m["step"]), "total": int(m["total"]),
                        "loss": float(m["loss"]), "images_per_s": float(m["ips"]), "t": now})
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def lines(self, run: str) -> list[dict]:
        with self.lock:
            return sorted((v for (r, _), v in self.seen.items() if r == run),
                          key=lambda v: v["step"])


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def start_ray(runtime: RuntimeConfig) -> float:
    """Start Ray as ``ensure_ray`` does, but a *new* local instance: a bare ``ray.init()``
    joins any cluster that ``ray start`` (or a test's cluster) left in /tmp/ray on this machine,
    and a benchmark must neither measure nor disturb someone else's Ray. An explicit address
    (``runtime.ray_address``, ``RAY_ADDRESS``) is honoured. Returns the seconds it took."""
    import ray

    if ray.is_initialized():
        return 0.0
    if runtime.ray_address or os.environ.get("RAY_ADDRESS"):
        return ensure_ray(runtime)
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=runtime.ray_num_cpus, **ray_init_kwargs(local=True))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Phase marks of the stage: timestamps around two of its calls (no change to what they do)
# --------------------------------------------------------------------------------------------

MARKS: dict[str, float] = {}


def instrument() -> None:
    import ray.train.torch

    import tasks.train.driver as drv

    build = drv.build_dataset
    fit = ray.train.torch.TorchTrainer.fit

    def timed_build(*a, **k):
        MARKS["dataset_start"] = time.perf_counter()
        try:
            return build(*a, **k)
        finally:
            MARKS["dataset_end"] = time.perf_counter()

    def timed_fit(self, *a, **k):
        MARKS["fit_start"] = time.perf_counter()
        try:
            return fit(self, *a, **k)
        finally:
            MARKS["fit_end"] = time.perf_counter()

    drv.build_dataset = timed_build  # the driver calls it by its own global name
    ray.train.torch.TorchTrainer.fit = timed_fit


# --------------------------------------------------------------------------------------------
# Step clock inside the worker: the stage's own loop, observed
# --------------------------------------------------------------------------------------------


def _timed_loop(cfg: dict) -> None:
    """``tasks.train.train_loop_per_worker`` unchanged, with timestamps: the start of every step
    (the call for its batch), the wait for that batch, ``train_step`` and every
    ``ray.train.report``. ``perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for all
    processes of the machine, so the driver can place these times in its own timeline. Costs
    about a microsecond per step. Rank 0 writes them to ``<tmp>/bench-train-steps/<run>.json``."""
    import ray.train
    import torch

    import diffusion.training as dtr
    import tasks.train.worker as tt

    rec: dict = {"loop_start": time.perf_counter(), "pid": os.getpid(), "code": tt.__file__,
                 "torch_threads": torch.get_num_threads(),
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                 "step_start": [], "data_s": [], "train_step_s": [], "report": []}
    real_loop, real_step, real_report, real_batches = (
        tt.train_loop_per_worker, dtr.train_step, ray.train.report, tt._batches)
    try:
        import tasks.tracking as trk
    except ImportError:  # a stage without MLflow tracking
        trk = None
    real_metrics = trk.RunLogger.metrics if trk else None

    def timer(fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                rec[key].append([t0, time.perf_counter() - t0])
        return timed

    rec["mlflow"] = []
    warmup, steps = cfg["train"]["log_every"], cfg["train"]["steps"]

    def batches(*a, **k):
        it = real_batches(*a, **k)
        while True:
            t0 = time.perf_counter()
            if len(rec["step_start"]) in (warmup, steps - 1):  # the steady span's two ends
                rec.setdefault("cpu_snapshots", []).append(cpu_snapshot())
                rec["torch_threads"] = torch.get_num_threads()  # as the loop left it
            b = next(it)
            rec["step_start"].append(t0)
            rec["data_s"].append(time.perf_counter() - t0)
            yield b

    def train_step(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_step(*a, **k)
        finally:
            rec["train_step_s"].append(time.perf_counter() - t0)

    dtr.train_step, tt._batches = train_step, batches
    ray.train.report = timer(real_report, "report")
    if trk:
        trk.RunLogger.metrics = timer(real_metrics, "mlflow")
    try:
        real_loop(cfg)
    finally:
        rec["loop_end"] = time.perf_counter()
        dtr.train_step, ray.train.report, tt._batches = real_step, real_report, real_batches
        if trk:
            trk.RunLogger.metrics = real_metrics
        if ray.train.get_context().get_world_rank() == 0:
            d = Path(tempfile.gettempdir()) / "bench-train-steps"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{cfg['run_name']}.json").write_text(json.dumps(rec))


def step_stats(rec: dict, batch: int, warmup: int) -> dict:
    """Steady rate and the mean step split from per-step timestamps: the steady span runs from
    the start of step ``warmup`` + 1 to the start of the last step (every step in it whole,
    windows' reports included)."""
    starts = rec["step_start"]
    n = len(starts)
    if n < warmup + 3:
        raise RuntimeError(f"{n} steps are too few for a warm-up of {warmup}; raise --steps")
    k0, k1 = warmup, n - 1
    span = starts[k1] - starts[k0]
    steps = k1 - k0

    def within(key: str) -> list[float]:
        return [e[1] for e in rec.get(key, []) if starts[k0] <= e[0] < starts[k1]]

    data = rec["data_s"][k0:k1]
    train = rec["train_step_s"][k0:k1]
    period = span / steps
    # Windows of ``warmup`` steps over the span: each holds its share of the periodic costs
    # (epoch ends, reports), and their median drops windows hit by other jobs on the machine.
    edges = list(range(k0, k1 + 1, warmup))
    wins = [warmup * batch / (starts[b] - starts[a]) for a, b in pairwise(edges)]
    out = {
        "median_window_images_per_s": statistics.median(wins) if wins else steps * batch / span,
        "window_images_per_s": [round(w, 1) for w in wins],
        "step_periods_ms": [round(1e3 * (b - a), 1) for a, b in pairwise(starts)],
        "data_wait_ms": [round(1e3 * d, 2) for d in rec["data_s"]],
        "mean_images_per_s": steps * batch / span,
        "steady_steps": steps,
        "steady_seconds": span,
        "first_window_seconds": starts[k0] - starts[0],
        "step_ms": 1e3 * period,
        "data_ms": 1e3 * sum(data) / steps,
        "data_max_ms": 1e3 * max(data),
        "data_stalls_over_5ms": sum(1 for d in data if d > 0.005),
        "train_step_ms": 1e3 * sum(train) / steps,
        "report_ms": 1e3 * sum(within("report")) / steps,
        "reports_in_span": len(within("report")),
        "mlflow_ms": 1e3 * sum(within("mlflow")) / steps,
        "mlflow_calls": [round(1e3 * e[1], 1) for e in rec.get("mlflow", [])],
        "report_calls": [round(1e3 * e[1], 1) for e in rec.get("report", [])],
    }
    out["other_ms"] = (out["step_ms"] - out["data_ms"] - out["train_step_ms"] - out["report_ms"]
                       - out["mlflow_ms"])
    snaps = rec.get("cpu_snapshots") or []
    if len(snaps) == 2:
        out["steady_cpu"] = cpu_during(*snaps)
    out["first_window_excess_seconds"] = (out["first_window_seconds"]
                                          - warmup * batch / out["mean_images_per_s"])
    out["steady_images_per_s"] = out["median_window_images_per_s"]  # the headline figure
    return out


# --------------------------------------------------------------------------------------------
# Inside a Ray Train worker: what torch gets there
# --------------------------------------------------------------------------------------------


def _probe_loop(cfg: dict) -> None:
    import torch

    info = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cuda": torch.cuda.is_available(),
    }
    Path(cfg["out"]).write_text(json.dumps(info))


def probe_worker(cfg, storage: Path) -> dict:
    """One TorchTrainer with the stage's scaling config whose loop records torch's settings."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": t.gpus_per_worker} if t.use_gpu else {})
    out = storage / "probe.json"
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    TorchTrainer(
        _probe_loop, train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f"probe-{os.getpid()}-{time.time_ns()}",
                                       storage_path=str(storage)),
    ).fit()
    info = json.loads(out.read_text())
    info["seconds"] = time.perf_counter() - t0
    info["resources_per_worker"] = resources
    return info


# --------------------------------------------------------------------------------------------
# The stage's own log: images/s per window as its progress lines say
# --------------------------------------------------------------------------------------------


def logged_rate(windows: list[dict], batch: int) -> float | None:
    """Images/s over every logged window but the first, from the loop's own "X img/s" (its
    windows leave out the time of ``ray.train.report``, so this can exceed the true rate)."""
    rest = windows[1:]
    if not rest:
        return None
    return (sum(w["steps"] for w in rest) * batch
            / sum(w["steps"] * batch / w["images_per_s"] for w in rest))


# --------------------------------------------------------------------------------------------
# (a) the plain loop
# --------------------------------------------------------------------------------------------


def plain_run(cfg, x_u8, labels, threads: int | None, *, device: str = "cpu",
              autocast=None, channels_last: bool = False, max_seconds: float = 1e9) -> dict:
    """``train.steps`` steps of ``diffusion.training.train_loop`` on the in-memory images (fewer
    if they take longer than ``max_seconds``: then the run is marked ``truncated``). Its
    ``train_step`` is timed by a wrapper, as in the stage (:func:`_timed_loop`): the batch draw
    is the time from the step's start to the call."""
    import torch

    import diffusion.training as dtr
    from diffusion.ema import EMA
    from diffusion.unet import UNet
    from tasks.train import optim_config

    if threads:
        torch.set_num_threads(threads)
    t, batch = cfg.train, cfg.train.batch_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    torch.manual_seed(t.seed)
    model = UNet(cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim = optim_config(t, cfg.diffusion)
    schedule = cfg.diffusion.build_schedule()
    ema = EMA(model, decay=t.ema_decay)
    gen = torch.Generator(device=device).manual_seed(t.seed * 7919)
    rec: dict = {"step_start": [], "data_s": [], "train_step_s": [], "report": []}
    real_step, start = dtr.train_step, [0.0]  # start[0]: the running step's start

    def timed_step(*a, **k):  # the batch is drawn: train_step begins
        t2 = time.perf_counter()
        rec["step_start"].append(start[0])
        rec["data_s"].append(t2 - start[0])
        try:
            return real_step(*a, **k)
        finally:
            rec["train_step_s"].append(time.perf_counter() - t2)

    sync()
    t_ready = time.perf_counter()
    truncated = False
    dtr.train_step, start[0] = timed_step, time.perf_counter()
    try:
        for out in dtr.train_loop(model, x_u8, labels, schedule, optim, batch_size=batch,
                                  generator=gen, ema=ema, null_class=cfg.model.num_classes,
                                  autocast_dtype=autocast, channels_last=channels_last):
            if out["step"] < t.steps and time.perf_counter() - t_ready > max_seconds:
                truncated = True
                break
            if out["step"] in (t.log_every, t.steps - 1):
                rec.setdefault("cpu_snapshots", []).append(cpu_snapshot())
            start[0] = time.perf_counter()
    finally:
        dtr.train_step = real_step
    sync()
    total = time.perf_counter() - t0
    n = len(rec["step_start"])
    s = step_stats(rec, batch, t.log_every if n >= t.log_every + 3 else max(1, n // 3))
    if truncated:
        print(f"  plain loop stopped after {n} of {t.steps} steps ({max_seconds:.0f} s): the "
              "machine is busy; this repetition counts as disturbed")
    return {
        "kind": "plain", "device": device, "threads": torch.get_num_threads(),
        "steps": n, "truncated": truncated, "batch_size": batch, "seconds": total,
        "build_seconds": t_ready - t0, **s,
        "startup_seconds": total - n * batch / s["mean_images_per_s"],
        "final_loss": out["loss"],
    }


# --------------------------------------------------------------------------------------------
# (b) the stage
# --------------------------------------------------------------------------------------------


def stage_run(sets: list[str], root: str, run_name: str, tap: Tap) -> dict:
    """One ``run_training`` with a fresh run name, its loop timed from inside the worker."""
    import tasks.train.driver as tt

    cfg = load_config(sets=[*sets, f"train.run_name={run_name}"], root=root)
    t, batch = cfg.train, cfg.train.batch_size
    rec_path = Path(tempfile.gettempdir()) / "bench-train-steps" / f"{run_name}.json"
    rec_path.unlink(missing_ok=True)
    MARKS.clear()
    real = tt.train_loop_per_worker
    tt.train_loop_per_worker = _timed_loop  # run_training looks the name up when it is called
    t0 = time.perf_counter()
    try:
        res = tt.run_training(cfg.data, cfg.model, cfg.diffusion, t, cfg.runtime,
                              pipeline=cfg.to_json_dict(),
                              echo=lambda m: print(f"  [stage] {m}"))
    finally:
        tt.train_loop_per_worker = real
    t_end = time.perf_counter()
    if res.metrics.get("resumed_from") != 0 or res.metrics.get("step") != t.steps:
        raise RuntimeError(f"run {run_name} did not train {t.steps} steps from 0: {res.metrics}")
    rec = json.loads(rec_path.read_text())
    s = step_stats(rec, batch, t.log_every)

    deadline = time.perf_counter() + 5  # the last progress lines may still be on their way
    while (not tap.lines(run_name) or tap.lines(run_name)[-1]["step"] < t.steps) \
            and time.perf_counter() < deadline:
        time.sleep(0.1)
    prev, windows = 0, []
    for ln in tap.lines(run_name):
        windows.append({**ln, "steps": ln["step"] - prev, "t": ln["t"] - t0})
        prev = ln["step"]
    out = {"kind": "stage", "run_name": run_name, "steps": t.steps, "batch_size": batch,
           "seconds": res.seconds, "wall_seconds": t_end - t0,
           "torch_threads": rec["torch_threads"], "OMP_NUM_THREADS": rec["OMP_NUM_THREADS"],
           "worker_code": rec["code"],
           **s, "startup_seconds": res.seconds - t.steps * batch / s["mean_images_per_s"],
           "logged_windows": windows, "logged_images_per_s": logged_rate(windows, batch),
           "reports": rec["report"], "final_metrics": res.metrics}
    starts = rec["step_start"]
    if {"dataset_start", "dataset_end", "fit_start", "fit_end"} <= MARKS.keys():
        out["phases"] = {  # seconds; they add up to res.seconds
            "before_dataset_s": MARKS["dataset_start"] - t0,
            "dataset_s": MARKS["dataset_end"] - MARKS["dataset_start"],
            "trainer_setup_s": MARKS["fit_start"] - MARKS["dataset_end"],
            "worker_group_start_s": rec["loop_start"] - MARKS["fit_start"],
            "loop_setup_s": starts[0] - rec["loop_start"],
            "first_window_s": s["first_window_seconds"],
            "steady_s": s["steady_seconds"],
            "last_step_and_final_checkpoint_s": rec["loop_end"] - starts[-1],
            "shutdown_s": MARKS["fit_end"] - rec["loop_end"],
            "after_fit_s": t0 + res.seconds - MARKS["fit_end"],
        }
    return out



# --------------------------------------------------------------------------------------------
# GPU path
# --------------------------------------------------------------------------------------------


def matmul_rate(device: str, dtype, sizes: tuple[int, ...], seconds: float = 0.5) -> dict:
    """Best measured FLOP/s of an n×n @ n×n product, over ``sizes``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    per = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        iters = max(5, int(seconds / max(time.perf_counter() - t0, 1e-6)))
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        per[n] = 2 * n**3 * iters / (time.perf_counter() - t0)
        del a, b
    best = max(per, key=per.get)
    return {"flops_per_s": per[best], "best_n": best,
            "by_n": {str(k): v for k, v in per.items()}, "dtype": str(dtype)}


def count_flops(model_cfg, diffusion, device: str, autocast, channels_last: bool,
                batch: int = 16) -> dict:
    """FLOPs per image of one training forward + backward (FlopCounterMode: matmuls,
    convolutions, attention; element-wise work is not counted, as usual for MFU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion.losses import LossConfig, training_loss
    from diffusion.unet import UNet

    model = UNet(model_cfg).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    c, r = model_cfg.in_channels, model_cfg.resolution
    x = torch.randn(batch, c, r, r, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = (torch.randint(0, model_cfg.num_classes, (batch,), device=device)
              if model_cfg.num_classes else None)
    schedule = diffusion.build_schedule()
    t = torch.randint(0, schedule.T, (batch,), device=device)
    with FlopCounterMode(display=False) as fwd, torch.autocast(
            device, dtype=autocast, enabled=autocast is not None):
        loss = training_loss(model, x, schedule, LossConfig(prediction=diffusion.prediction),
                             t=t, labels=labels).mean()
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return {"forward_per_image": f / batch, "backward_per_image": b / batch,
            "train_per_image": (f + b) / batch, "parameters": model.num_parameters()}


def load_split_tensor(root: str, name: str, device: str):
    """The preprocessed train split as in-memory uint8 [N, C, H, W] and int64 labels."""
    import pyarrow.parquet as pq
    import torch

    from tasks.datasets import open_dataset, part_files
    from tasks.pixels import to_arrays
    from tasks.runtime import RuntimeConfig

    loc = RuntimeConfig(root=root).root_location()
    _, manifest = open_dataset(loc, name)
    xs, ys = [], []
    for p in part_files(loc, manifest, "train"):
        with loc.fs.open(p, "rb") as f:
            a = to_arrays(pq.read_table(f, columns=["label", "pixels"]), manifest["shape"])
        xs.append(a["x"])
        ys.append(a["label"])
    y = np.concatenate(ys)
    y = np.where(y < 0, 0, y)
    return (torch.from_numpy(np.concatenate(xs)).to(device), torch.from_numpy(y).to(device))


def gpu_section(args, tap: Tap, wait: dict) -> dict:
    import torch

    test = args.gpu_test_on_cpu
    if not torch.cuda.is_available() and not test:
        print("gpu: CUDA is not available here; skipping the GPU path")
        return {"skipped": "CUDA not available"}
    device = "cpu" if test else "cuda"
    info = {"device": device, "test_on_cpu": test}
    if not test:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    print(f"gpu: {info}")
    mm = matmul_rate(device, torch.bfloat16, (256, 512) if test else (4096, 8192, 16384))
    info["matmul_bf16"] = mm
    print(f"gpu: bf16 matmul {mm['flops_per_s'] / 1e12:.1f} TFLOP/s (best at n={mm['best_n']}; "
          + ", ".join(f"n={k}: {v / 1e12:.1f}" for k, v in mm["by_n"].items()) + ")")

    steps, log_every = (30, 10) if test else (args.gpu_steps, args.gpu_log_every)
    n_images = 600 if test else args.gpu_images
    images = Path(args.gpu_images_dir if not test else tempfile.mkdtemp(prefix="bench-gpu-img-"))
    images_meta = ensure_images(images, n_images)
    name = f"bench-gpu32-{n_images}"
    sets = [
        f"data.name={name}", f"data.source={images}", "data.resolution=32", "data.channels=3",
        *(GPU_TEST_MODEL_SETS if test else GPU_MODEL_SETS),
        f"train.use_gpu={'false' if test else 'true'}", "train.bf16='on'",  # quoted: YAML
        "train.channels_last='auto'" if not test else "train.channels_last='off'",
        f"train.steps={steps}", f"train.batch_size={args.gpu_batch_size}",
        f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
        f"train.warmup_steps={min(10, steps)}", *args.gpu_set,
    ]
    cfg = load_config(sets=[*sets, "train.run_name=unused"], root=args.root)
    info["ray_init_seconds"] = start_ray(cfg.runtime)
    t0 = time.perf_counter()
    pre = preprocess(cfg.data, cfg.runtime, echo=lambda m: print(f"  [preprocess] {m}"))
    info["dataset"] = {"name": name, "images": images_meta, "version": pre.manifest["version"],
                       "train_rows": pre.manifest["splits"]["train"]["rows"],
                       "reused": pre.reused, "seconds": time.perf_counter() - t0}
    channels_last = not test
    flops = count_flops(cfg.model, cfg.diffusion, device, torch.bfloat16, channels_last)
    info["flops"] = flops
    print(f"gpu: UNet {flops['parameters'] / 1e6:.1f}M parameters; training FLOPs per image "
          f"{flops['train_per_image'] / 1e9:.2f} G (forward {flops['forward_per_image'] / 1e9:.2f}"
          f" G)")
    x, y = load_split_tensor(args.root, name, device)
    print(f"gpu: plain loop, {steps} steps of {args.gpu_batch_size} on {device} (bf16) ...")
    a = timed(plain_run, cfg, x, y, None, device=device, autocast=torch.bfloat16,
              channels_last=channels_last, **wait)
    del x, y
    print(f"  plain {a['steady_images_per_s']:,.0f} img/s steady; start-up "
          f"{a['startup_seconds']:.1f} s")
    run_name = f"bench-gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"gpu: stage, run {run_name} ...")
    b = timed(stage_run, sets, args.root, run_name, tap, **wait)
    print(f"  stage {b['steady_images_per_s']:,.0f} img/s steady; start-up "
          f"{b['startup_seconds']:.1f} s")
    shutil.rmtree(Path(args.root) / "runs" / run_name, ignore_errors=True)
    rate, per_image = mm["flops_per_s"], flops["train_per_image"]
    for r in (a, b):
        r["mfu"] = r["steady_images_per_s"] * per_image / rate
        r["achieved_flops_per_s"] = r["steady_images_per_s"] * per_image
    info.update(plain=a, stage=b, ratio=b["steady_images_per_s"] / a["steady_images_per_s"],
                config=cfg.to_json_dict(), steps=steps, batch_size=args.gpu_batch_size)
    print(f"gpu: stage {b['steady_images_per_s']:,.0f} img/s, MFU {b['mfu']:.1%}; plain "
          f"{a['steady_images_per_s']:,.0f} img/s, MFU {a['mfu']:.1%}; stage/plain "
          f"×{info['ratio']:.3f}")
    return info


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def timed(fn, *a, threshold: float, max_wait: float, **k) -> dict:
    """Wait for a quiet machine, run ``fn``, add CPU accounting to its result."""
    quiet = wait_quiet(threshold, max_wait)
    with CpuMeter() as m:
        r = fn(*a, **k)
    cpu = m.cpu["driver"] + m.cpu["children"]
    r.update(cpu=m.cpu, cpu_children=m.children, cpu_s=cpu, cores_used=cpu / m.wall,
             foreign_load=m.foreign_load, clean=m.foreign_load <= threshold
             and not r.get("truncated"),
             quiet_before=quiet)
    return r


def environment() -> dict:
    import pyarrow
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ray_cpus": ray.cluster_resources().get("CPU") if ray.is_initialized() else None,
        "driver_torch_threads_default": DRIVER_THREADS,
        "driver_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_1m_5m_15m": list(os.getloadavg()),
        "git": git_revision(),
        "versions": {"torch": torch.__version__, "ray": ray.__version__,
                     "pyarrow": pyarrow.__version__, "numpy": np.__version__},
    }


def _f(x: float | None, nd: int = 0) -> str:
    return "" if x is None else f"{x:,.{nd}f}"


def describe(r: dict) -> str:
    c = r.get("steady_cpu", {})
    return (f"{r['steady_images_per_s']:,.0f} img/s steady (windows "
            f"{', '.join(f'{w:.0f}' for w in r['window_images_per_s'])}; mean "
            f"{r['mean_images_per_s']:,.0f}); step {r['step_ms']:.1f} ms = batch "
            f"{r['data_ms']:.2f} + train_step {r['train_step_ms']:.1f} + report "
            f"{r['report_ms']:.2f} + mlflow {r['mlflow_ms']:.2f} + other {r['other_ms']:.2f}; "
            f"start-up "
            f"{r['startup_seconds']:.2f} s of {r['seconds']:.1f} s; {r['cores_used']:.2f} cores, "
            f"other load {r['foreign_load']:.2f}; steady span: loop process "
            f"{c.get('process_cores', 0):.2f} cores, machine {c.get('machine_cores', 0):.2f}, "
            f"busiest threads {c.get('busiest_threads')}")


SPLIT = ("step_ms", "data_ms", "train_step_ms", "report_ms", "mlflow_ms", "other_ms")
PHASES = ("before_dataset_s", "dataset_s", "trainer_setup_s", "worker_group_start_s",
          "loop_setup_s", "first_window_s", "steady_s", "last_step_and_final_checkpoint_s",
          "shutdown_s", "after_fit_s")


def render(result: dict) -> str:
    env, s, thr = result["environment"], result.get("summary"), result["quiet_threshold"]
    lines = [
        "# Training-stage benchmark: Ray Train stage vs a plain PyTorch loop",
        "",
        f"Command: `{result['command']}` (from the repository root; console log in "
        f"`{result['tag']}.log`)  ",
        f"Machine: {env['cpu_count']} CPUs (Ray sees {_f(env['ray_cpus']) or '-'}), "
        f"{env['platform']}, "
        f"Python {env['python']}; git {env['git']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}  ")
    if s is None:
        lines.append("")
    else:
        probe, st = result["worker_probe"], result["settings"]
        lines += [
            f"Model: `DIGITS_UNET` ({result['parameters'] / 1e6:.2f}M parameters), batch "
            f"{st['batch_size']}, {st['steps']} steps per run (the first {st['log_every']} are "
            f"warm-up); data: {result['dataset']['train_rows']} train digits (8×8, 1 channel); "
            f"stage overrides: `{' '.join(st['sets']) or '(none)'}`  ",
            f"Inside a Ray Train worker (resources {probe['resources_per_worker']}): torch "
            f"threads **{probe['torch_threads']}**, OMP_NUM_THREADS="
            f"{probe['OMP_NUM_THREADS']}, CPU affinity {probe['cpu_affinity']} cores; "
            f"this process's torch default: {env['driver_torch_threads_default']} threads  ",
            f"Ray start-up (a new local Ray, once, in no figure below): "
            f"{result['ray_init_seconds']:.2f} s",
            "",
            "*Steady* = the median, over windows of "
            f"{st['log_every']} steps from the start of step {st['log_every'] + 1} to the start "
            "of the last step, of images/s timed inside the loop (for the stage: inside the "
            "Ray Train worker, around the stage's unchanged loop; every cost of a step counts, "
            "epoch ends and reports included); the median drops windows hit by other jobs. "
            "*Mean* = the same span as a whole. *Logged* = what the stage's own progress "
            "lines say for the same windows. Step split (ms): *batch* = waiting for the batch "
            "(`iter_torch_batches`; plain: indexing + scaling), *train_step* = "
            "`diffusion.training.train_step`, *report* = `ray.train.report` per step, *MLflow* = "
            "the loop's metric logging (`RunLogger.metrics`) per step, *other* = "
            "the rest of the loop body (span means). *Start-up* = wall time − steps × batch / mean "
            "(stage: `res.seconds`). *Cores* = CPU time of this process and those it started / "
            "wall; *other load* = cores the machine was busy with other work (/proc/stat minus "
            f"ours; > {thr}: †, left out of medians).",
            "",
            "| rep | run | threads | steady img/s | mean img/s | step ms | batch | train_step | "
            "report | MLflow | other | start-up s | wall s | cores | other load | stage / this |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def row(rep, label, r, ratio):
            mark = "" if rep["clean"] else " †"
            return (f"| {rep['index']}{mark} | {label} | {r.get('threads', r.get('torch_threads'))}"
                    f" | {_f(r['steady_images_per_s'])} | {_f(r['mean_images_per_s'])} | "
                    + " | ".join(f"{r[k]:.2f}" for k in SPLIT)
                    + f" | {r['startup_seconds']:.2f} | {r['seconds']:.1f} | "
                    f"{r['cores_used']:.2f} | {r['foreign_load']:.2f} | {ratio} |")

        for rep in result["reps"]:
            b = rep["stage"]
            for p in rep["plain"]:
                ratio = f"×{b['steady_images_per_s'] / p['steady_images_per_s']:.3f}"
                lines.append(row(rep, "plain", p, ratio))
            lines.append(row(rep, f"stage (logged {_f(b['logged_images_per_s'])})", b, ""))
        lines += ["", f"Medians over {s['median_over']}:", "",
                  "| plain threads | plain img/s | stage img/s | stage / plain | goal |",
                  "|---:|---:|---:|---:|---|"]
        for k, v in s["by_threads"].items():
            verdict = "met" if v["ratio"] >= GOAL else "**missed**"
            lines.append(f"| {k} | {_f(v['plain_ips'])} | {_f(s['stage_ips'])} | "
                         f"**×{v['ratio']:.3f}** | ≥ ×{GOAL}: {verdict} |")
        lines += ["", "Median step split (ms):", "",
                  "| run | step | batch | train_step | report | MLflow | other |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k, v in s["split"].items():
            lines.append(f"| {k} | " + " | ".join(f"{v[x]:.2f}" for x in SPLIT) + " |")
        ph = s["stage_phases"]
        if ph:
            lines += [
                "",
                f"Stage timeline (median seconds; `res.seconds` {s['stage_seconds']:.2f}, of "
                f"which start-up {s['stage_startup_s']:.2f}; plain loop start-up "
                f"{s['plain_startup_s']:.2f}):",
                "",
                "| before dataset | dataset (read + materialise) | trainer set-up | worker group "
                "start | loop set-up | first window | steady | last step + final checkpoint | "
                "shutdown | after fit |",
                "|" + "---:|" * len(PHASES),
                "| " + " | ".join(f"{ph[k]:.2f}" for k in PHASES) + " |",
            ]
        lines.append("")
    g = result.get("gpu")
    lines += ["## GPU path", ""]
    if not g:
        lines.append("Not requested (`--gpu`).")
    elif g.get("skipped"):
        lines.append(f"Skipped: {g['skipped']}.")
    else:
        a, b, fl, mm = g["plain"], g["stage"], g["flops"], g["matmul_bf16"]
        lines += [
            f"{g.get('name', g['device'])}" + (" (**test run on the CPU**, tiny model)"
                                                if g["test_on_cpu"] else "")
            + f"; bf16 matmul {mm['flops_per_s'] / 1e12:.1f} TFLOP/s (n={mm['best_n']}). UNet "
            f"{fl['parameters'] / 1e6:.1f}M parameters, 32×32×3, training FLOPs per image "
            f"{fl['train_per_image'] / 1e9:.2f} G (FlopCounterMode, forward + backward); batch "
            f"{g['batch_size']}, {g['steps']} steps, bf16 autocast; dataset "
            f"{g['dataset']['train_rows']} train rows.",
            "",
            "| run | steady img/s | achieved TFLOP/s | MFU | step ms | batch | train_step | "
            "report | MLflow | other | start-up s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for label, r in (("plain loop", a), ("stage (train.use_gpu=true)", b)):
            lines.append(f"| {label} | {_f(r['steady_images_per_s'])} | "
                         f"{r['achieved_flops_per_s'] / 1e12:.1f} | {r['mfu']:.1%} | "
                         + " | ".join(f"{r[k]:.2f}" for k in SPLIT)
                         + f" | {r['startup_seconds']:.1f} |")
        lines += ["", f"Stage / plain: ×{g['ratio']:.3f}."]
    lines.append("")
    return "\n".join(lines)


def summarize(reps: list[dict]) -> dict:
    clean = [r for r in reps if r["clean"]]
    chosen = clean or reps
    over = (f"the {len(clean)} repetition(s) run on a quiet machine" if clean else
            f"all {len(reps)} repetitions (none ran on a quiet machine)")
    if clean and len(clean) < len(reps):
        over += f" ({len(reps) - len(clean)} disturbed one(s) left out)"
    med = statistics.median
    stage_ips = med(r["stage"]["steady_images_per_s"] for r in chosen)
    by_threads, split = {}, {}
    for i, p in enumerate(chosen[0]["plain"]):
        plain = med(r["plain"][i]["steady_images_per_s"] for r in chosen)
        ratios = [r["stage"]["steady_images_per_s"] / r["plain"][i]["steady_images_per_s"]
                  for r in chosen]
        by_threads[str(p["threads"])] = {
            "plain_ips": plain, "ratio": med(ratios),
            "ratios": [round(x, 4) for x in ratios], "ratio_of_medians": stage_ips / plain}
        split[f"plain, {p['threads']} thread(s)"] = {
            k: med(r["plain"][i][k] for r in chosen) for k in SPLIT}
    split[f"stage, {chosen[0]['stage']['torch_threads']} thread(s)"] = {
        k: med(r["stage"][k] for r in chosen) for k in SPLIT}
    phases = [r["stage"]["phases"] for r in chosen if r["stage"].get("phases")]
    return {
        "median_over": over, "clean_reps": len(clean), "reps": len(reps),
        "stage_ips": stage_ips, "by_threads": by_threads, "goal": GOAL, "split": split,
        "stage_logged_ips": med(r["stage"]["logged_images_per_s"] or 0 for r in chosen),
        "stage_seconds": med(r["stage"]["seconds"] for r in chosen),
        "stage_startup_s": med(r["stage"]["startup_seconds"] for r in chosen),
        "plain_startup_s": med(p["startup_seconds"] for r in chosen for p in r["plain"]),
        "stage_phases": {k: med(p[k] for p in phases) for k in PHASES} if phases else {},
    }


def main() -> None:
    global DRIVER_THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=25, help="window length in steps")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--plain-threads", type=int, nargs="*", default=None,
                    help="torch thread counts of the plain loop (default: the Ray Train "
                    "worker's, measured, and every core)")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="extra section.key=value overrides for the stage, e.g. "
                    "train.cpus_per_worker=2 (repeatable)")
    ap.add_argument("--root", default="/tmp/bench-train-root", help="pipeline root (scratch)")
    ap.add_argument("--out", default="benchmarks/results", help="where the results go")
    ap.add_argument("--tag", default=None, help="result file stem (default train_throughput, "
                    "train_throughput_gpu with --gpu-only)")
    ap.add_argument("--note", default="", help="a line for the report header")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="before each run wait until other processes use fewer cores than "
                    "this; repetitions during which they used more are left out of medians")
    ap.add_argument("--max-wait", type=float, default=30,
                    help="longest wait for a quiet machine before a run, seconds")
    ap.add_argument("--max-run-seconds", type=float, default=120,
                    help="stop a plain run after this long (a busy machine can slow a loop "
                    "on every core many times over); it then counts as disturbed")
    ap.add_argument("--gpu", action="store_true",
                    help="also run the GPU path (skipped, and recorded so, without CUDA)")
    ap.add_argument("--gpu-only", action="store_true", help="the GPU path alone")
    ap.add_argument("--gpu-steps", type=int, default=500)
    ap.add_argument("--gpu-log-every", type=int, default=50)
    ap.add_argument("--gpu-batch-size", type=int, default=128)
    ap.add_argument("--gpu-images", type=int, default=20_000,
                    help="generated 64x64 PNGs preprocessed to 32x32 RGB for the GPU run")
    ap.add_argument("--gpu-images-dir", default="/tmp/bench-preprocess-images",
                    help="cache of those PNGs (shared with preprocess_images.py)")
    ap.add_argument("--gpu-set", action="append", default=[],
                    help="extra overrides for the GPU stage run (repeatable)")
    ap.add_argument("--gpu-test-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tag = args.tag or ("train_throughput_gpu" if args.gpu_only else "train_throughput")

    import torch

    DRIVER_THREADS = torch.get_num_threads()
    exe = os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else "python"
    command = " ".join([exe, "benchmarks/train_throughput.py", *sys.argv[1:]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.root).mkdir(parents=True, exist_ok=True)
    wait = {"threshold": args.quiet_threshold, "max_wait": args.max_wait}
    tap = Tap(sys.stdout)
    sys.stdout = tap

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    instrument()
    # _timed_loop, shipped to the Ray Train worker by value (it is in __main__), calls
    # cpu_snapshot: ship _machine's functions by value too, so workers never import benchmarks/.
    ray.cloudpickle.register_pickle_by_value(_machine)
    quiet = wait_quiet(**wait)
    result: dict = {"command": command, "tag": args.tag, "note": args.note,
                    "quiet_threshold": args.quiet_threshold, "quiet_before_ray_init": quiet}

    if not args.gpu_only:
        sets = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
                f"train.log_every={args.log_every}", f"train.checkpoint_every={args.steps}",
                f"train.warmup_steps={min(10, args.steps)}", *args.sets]
        cfg = load_config(sets=[*sets, "train.run_name=unused"], root=args.root)
        ray_init_s = start_ray(cfg.runtime)
        print(f"ray: started in {ray_init_s:.2f} s, {ray.cluster_resources().get('CPU')} CPUs, "
              f"{ray.get_runtime_context().gcs_address}; idle after {settle():.0f} s more")
        pre = preprocess(cfg.data, cfg.runtime, echo=lambda m: print(f"  [preprocess] {m}"))
        probe = probe_worker(cfg, Path(args.root) / "probe")
        print(f"worker probe ({probe['seconds']:.1f} s): torch threads {probe['torch_threads']}, "
              f"OMP_NUM_THREADS={probe['OMP_NUM_THREADS']}, affinity {probe['cpu_affinity']} "
              f"(this process: {DRIVER_THREADS} threads)")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = args.plain_threads or sorted({probe["torch_threads"], cores})

        import torch

        from diffusion.unet import UNet
        from tasks.digits import digits_splits

        x_np, y_np = digits_splits(cfg.data.val_fraction)["train"]
        assert len(x_np) == pre.manifest["splits"]["train"]["rows"], "splits differ"
        x_u8, labels = torch.from_numpy(x_np), torch.from_numpy(y_np)
        # Untimed: first-use costs of this process (oneDNN kernel creation per thread count);
        # the worker pays its own in its start-up.
        warm = load_config(sets=[*sets, "train.steps=8", "train.log_every=2",
                                 "train.warmup_steps=2", "train.run_name=unused"], root=args.root)
        for th in threads:
            w = plain_run(warm, x_u8, labels, th)
            print(f"plain warm-up, {th} thread(s): {w['seconds']:.1f} s")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        reps = []
        for i in range(args.repeats):
            plain = []
            for th in threads:
                print(f"rep {i}: plain loop, {th} thread(s) ...")
                settle(10)
                a = timed(plain_run, cfg, x_u8, labels, th, max_seconds=args.max_run_seconds,
                          **wait)
                print(f"  plain@{th}: {describe(a)}")
                plain.append(a)
            run_name = f"bench-{stamp}-{i}"
            print(f"rep {i}: stage, run {run_name} ...")
            torch.set_num_threads(DRIVER_THREADS)
            settle(10)
            b = timed(stage_run, sets, args.root, run_name, tap, **wait)
            shutil.rmtree(Path(args.root) / "runs" / run_name, ignore_errors=True)
            print(f"  stage: {describe(b)}; logged {_f(b['logged_images_per_s'])} img/s; torch "
                  f"threads {b['torch_threads']}; phases "
                  + ", ".join(f"{k} {v:.2f}" for k, v in b.get("phases", {}).items()))
            print("  stage / plain: " + ", ".join(
                f"@{p['threads']} ×{b['steady_images_per_s'] / p['steady_images_per_s']:.3f}"
                for p in plain))
            reps.append({"index": i, "plain": plain, "stage": b,
                         "clean": all(r["clean"] for r in (*plain, b))})
        result.update(
            settings={"steps": args.steps, "batch_size": args.batch_size,
                      "log_every": args.log_every, "repeats": args.repeats, "sets": args.sets,
                      "plain_threads": threads, "root": args.root},
            config=cfg.to_json_dict(), parameters=UNet(cfg.model).num_parameters(),
            dataset={"version": pre.manifest["version"], "reused": pre.reused,
                     "train_rows": pre.manifest["splits"]["train"]["rows"]},
            ray_init_seconds=ray_init_s, worker_probe=probe, reps=reps, summary=summarize(reps))
    if args.gpu or args.gpu_only or args.gpu_test_on_cpu:
        result["gpu"] = gpu_section(args, tap, wait)
    result["environment"] = environment()
    md = render(result)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{args.tag}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.md')}")


if __name__ == "__main__":
    main()

r"""Generation-stage benchmark: the Ray Data generation job vs a plain in-process sampler loop.

    .venv/bin/python benchmarks/generate_throughput.py 2>&1 \
        | tee benchmarks/results/generate_throughput.log

In one process, same model, sampler, steps, guidance, labels, seed and batch size:

  (a) **plain**: ``tasks.generate.resolve_job`` then ``tasks.generate.sample_indices`` (the
      function the stage's actors run) shard by shard over the same N samples, in this process,
      on the CPU, at each torch thread count of ``--plain-threads`` (default: the thread count
      measured inside the stage's Sampler actor, and every core);
  (b) **stage**: ``tasks.generate.generate`` with ``num_actors=1`` (Ray Data ``from_items(shards)
      → map_batches(Sampler actor)``) and ``cpus_per_actor`` = every core (``--cpus-per-actor``;
      the actor runs torch on that many threads), a fresh output directory each time.

The model is the pipeline's default digits UNet (``tasks.digits.DIGITS_UNET``, 0.76M parameters,
class-conditional, 8×8), briefly trained on the embedded digits (its output convolution starts
at zero, so untrained weights would predict ε ≡ 0) and saved in the checkpoint layout; the
sampler is a registered digits model's default: DPM-Solver++(2M), 20 steps, guidance 1.5,
labels uniform over the classes; batch 256.

*Steady state* leaves out the first shard of every run. Plain: shard times in the loop. Stage:
the times at which the driver's loop in ``generate`` receives each shard's row (the moment
``generate`` calls ``maybe_die`` for it), so Ray Data's scheduling, the Parquet write and the
row's trip back all count; a wrapper around the stage's unchanged ``Sampler`` also timestamps
each call inside the actor (``perf_counter`` is one clock for every process on Linux) and
records the actor's torch threads and CPU time. The headline is the median per-shard images/s
(it drops shards that other jobs slowed); the mean over the span is reported too. *Start-up*
= wall time − N / steady mean rate, with the stage's timeline (model load in the driver, Ray
Data + actor start, model load in the actor, first shard, ...). Ray's own start-up is timed
once, and a first (cold) stage run of ``--warmup-shards`` shards, the first Ray Data execution
of the process, is reported apart. Runs are interleaved (A A' B, A A' B, ...); before each one
the script waits for a quiet machine, and during it measures the machine's busy time from
/proc/stat minus its own process tree; disturbed repetitions are marked and left out of the
medians. Each repetition also checks that the plain loop's uint8 images and labels equal the
stage's output (``tasks.generate.read_samples``).

``--gpu`` also runs the GPU variant once when CUDA is available: the ~38M-parameter 32×32 RGB
UNet of ``train_throughput.py``'s GPU path (its ``GPU_MODEL_SETS``), random weights, bf16
autocast, DDIM 50 steps, batch 256, plain loop and stage (``gpus_per_actor=1``). Without CUDA
it records that it skipped. ``--gpu-only`` skips the CPU comparison. Writes ``<tag>.json`` and
``<tag>.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_throughput as tb  # GPU model shape, Ray start, timed(), environment()
from _machine import settle, wait_quiet

from flows.config import load_config
from tasks.generate import GenerateConfig, read_samples, resolve_job, sample_indices
from tasks.runtime import RuntimeConfig

GOAL = 0.95
DRIVER_THREADS = None  # torch's thread count in this process before the script changed it
ACTOR_RECORDS = Path(tempfile.gettempdir()) / "bench-generate-actors"


# --------------------------------------------------------------------------------------------
# The model: the pipeline's default digits UNet, briefly trained, in the checkpoint layout
# --------------------------------------------------------------------------------------------


def digits_model(root: Path, steps: int, threads: int | None) -> tuple[str, dict]:
    """A checkpoint directory (``<dir>/model/``) of ``DIGITS_UNET`` after ``steps`` training
    steps (batch 128, the stage's optimizer defaults) on the digits train split; reused when
    present. Untimed."""
    import torch

    from diffusion.pipeline import DiffusionConfig
    from diffusion.serialization import save_model
    from diffusion.training import train_loop
    from diffusion.unet import UNet
    from tasks.digits import CLASS_NAMES, DIGITS_UNET, digits_splits
    from tasks.train import TrainConfig, optim_config

    path = root / "models" / f"digits-{steps}-steps"
    info_file = path / "bench-info.json"
    if info_file.is_file() and (path / "model" / "config.json").is_file():
        return str(path), json.loads(info_file.read_text()) | {"reused": True}
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    diff, train = DiffusionConfig(), TrainConfig(steps=steps, warmup_steps=min(20, steps))
    optim = optim_config(train, diff)
    torch.manual_seed(0)
    model = UNet(DIGITS_UNET)
    x_np, y_np = digits_splits()["train"]
    loss = float("nan")
    for out in train_loop(model, torch.from_numpy(x_np), torch.from_numpy(y_np),
                          diff.build_schedule(), optim, batch_size=train.batch_size,
                          generator=torch.Generator().manual_seed(1),
                          null_class=DIGITS_UNET.num_classes):
        loss = out["loss"]
    save_model(path / "model", model.state_dict(),
               {"unet": DIGITS_UNET.to_dict(), "diffusion": diff.to_dict(),
                "class_names": CLASS_NAMES})
    info = {"path": str(path), "train_steps": steps, "batch_size": train.batch_size,
            "final_loss": loss, "train_seconds": time.perf_counter() - t0,
            "parameters": model.num_parameters()}
    info_file.write_text(json.dumps(info, indent=2))
    return str(path), info | {"reused": False}


def random_model(root: Path, unet_cfg, name: str) -> tuple[str, dict]:
    """A checkpoint directory of ``unet_cfg`` with random weights; the zero-initialised output
    convolution gets small random weights too, so that every sample depends on every layer."""
    import torch

    from diffusion.pipeline import DiffusionConfig
    from diffusion.serialization import save_model
    from diffusion.unet import UNet

    path = root / "models" / name
    torch.manual_seed(0)
    model = UNet(unet_cfg)
    with torch.no_grad():
        torch.nn.init.normal_(model.conv_out.weight, std=0.02)
    save_model(path / "model", model.state_dict(),
               {"unet": unet_cfg.to_dict(), "diffusion": DiffusionConfig().to_dict(),
                "class_names": [str(i) for i in range(unet_cfg.num_classes or 0)]})
    return str(path), {"path": str(path), "parameters": model.num_parameters(),
                       "weights": "random (output convolution N(0, 0.02))"}


# --------------------------------------------------------------------------------------------
# Inside the actor: the stage's Sampler, unchanged, with a clock around it
# --------------------------------------------------------------------------------------------


class _TimedSampler:
    """Stands in for ``Sampler`` in ``tasks.generate.driver`` (``generate`` looks the name up
    when it is called); in the actor it builds the real ``tasks.generate.worker.Sampler`` and
    timestamps its construction and every call, with the process's CPU time and torch's thread
    settings. Written to ``<tmp>/bench-generate-actors/<key>-<pid>.json`` after each call (a
    few hundred bytes; the actor may be ended without notice). Shipped to the actor by value
    (it lives in ``__main__``), so it uses nothing from ``benchmarks/``."""

    def __init__(self, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        import torch

        import tasks.generate.worker as tg

        self.inner = tg.Sampler(**kwargs)
        key = hashlib.sha256(kwargs["output"].encode()).hexdigest()[:16]
        self.path = ACTOR_RECORDS / f"{key}-{os.getpid()}.json"
        self.rec = {
            "pid": os.getpid(), "output": kwargs["output"], "code": tg.__file__,
            "init_start": t0,
            "init_end": time.perf_counter(), "init_cpu_s": time.process_time() - c0,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu_affinity": (len(os.sched_getaffinity(0))
                             if hasattr(os, "sched_getaffinity") else None),
            "device": str(self.inner.device), "bf16": self.inner.job.bf16,
            "calls": []}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rec))
        tmp.replace(self.path)

    def __call__(self, batch: dict) -> dict:
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner(batch)
        self.rec["calls"].append({
            "start": t0, "end": time.perf_counter(), "cpu_s": time.process_time() - c0,
            "shards": [int(k) for k in out["shard"]], "rows": [int(n) for n in out["rows"]],
            "seconds": [float(s) for s in out["seconds"]]})
        self._save()
        return out


def actor_records(since: float, until: float) -> list[dict]:
    """The records of the actors constructed between two moments (one stage run)."""
    recs = []
    for p in sorted(ACTOR_RECORDS.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if since <= rec["init_start"] <= until:
            recs.append(rec)
    return recs


MARKS: dict[str, list[float]] = {}


@contextmanager
def instrumented():
    """Timestamps in the driver around three names ``generate`` looks up when it runs:
    ``ensure_ray`` (the end of the driver's set-up), ``maybe_die`` (called once per received
    shard row) and ``Sampler`` (replaced by ``_TimedSampler``), in ``tasks.generate.driver``.
    Nothing else changes."""
    import tasks.generate.driver as tg

    real = tg.ensure_ray, tg.maybe_die, tg.Sampler
    MARKS.clear()
    MARKS.update(ensure_ray=[], rows=[])

    def ensure_ray(*a, **k):
        MARKS["ensure_ray"].append(time.perf_counter())
        return real[0](*a, **k)

    def maybe_die(*a, **k):
        MARKS["rows"].append(time.perf_counter())
        return real[1](*a, **k)

    tg.ensure_ray, tg.maybe_die, tg.Sampler = ensure_ray, maybe_die, _TimedSampler
    try:
        yield
    finally:
        tg.ensure_ray, tg.maybe_die, tg.Sampler = real


# --------------------------------------------------------------------------------------------
# Steady state from shard times
# --------------------------------------------------------------------------------------------


def steady(rows: list[int], ends: list[float], start: float) -> dict:
    """Per-shard images/s after the first shard: shard k (k >= 1) took ``ends[k] - ends[k-1]``
    (``start``: when the run began, for the first shard's time)."""
    if len(ends) < 3:
        raise RuntimeError(f"{len(ends)} shards are too few for a steady state; use more samples "
                           "or smaller shards (at least 3, better 6 or more)")
    per = [r / (b - a) for r, (a, b) in zip(rows[1:], pairwise(ends), strict=True)]
    span = ends[-1] - ends[0]
    return {
        "steady_images_per_s": statistics.median(per),  # the headline figure
        "mean_images_per_s": sum(rows[1:]) / span,
        "shard_images_per_s": [round(x, 2) for x in per],
        "shard_seconds": [round(b - a, 3) for a, b in pairwise([start, *ends])],
        "steady_shards": len(per), "steady_seconds": span,
        "first_shard_seconds": ends[0] - start,
    }


# --------------------------------------------------------------------------------------------
# (a) the plain loop, (b) the stage
# --------------------------------------------------------------------------------------------


def plain_run(cfg: GenerateConfig, runtime: RuntimeConfig, threads: int | None, *,
              device: str = "cpu", max_seconds: float = 1e9) -> dict:
    """``resolve_job`` (loads the model) then ``sample_indices`` shard by shard, in this
    process, at the job's precision (``generate.bf16`` resolved). Stops after the shard that
    passes ``max_seconds`` (then ``truncated``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    job, model = resolve_job(cfg, runtime, echo=lambda m: None)
    model = model.eval().to(device)
    t_ready = time.perf_counter()
    images, labels, rows, ends = [], [], [], []
    truncated = False
    for _k, start, end in job.shards():
        if ends and ends[-1] - t_ready > max_seconds:
            truncated = True
            break
        x, y = sample_indices(model, job, np.arange(start, end), cfg.batch_size,
                              torch.device(device))
        ends.append(time.perf_counter())
        images.append(x)
        labels.append(y)
        rows.append(end - start)
    total = time.perf_counter() - t0
    s = steady(rows, ends, t_ready)
    if truncated:
        print(f"  plain loop stopped after {len(rows)} of {len(job.shards())} shards "
              f"({max_seconds:.0f} s): the machine is busy; this repetition counts as disturbed")
    out = {"kind": "plain", "device": device, "threads": torch.get_num_threads(),
           "samples": sum(rows), "shards": len(rows), "truncated": truncated,
           "seconds": total, "resolve_seconds": t_ready - t0, **s,
           "startup_seconds": total - sum(rows) / s["mean_images_per_s"],
           "_images": np.concatenate(images),
           "_labels": None if labels[0] is None else np.concatenate(labels)}
    out["first_shard_excess_seconds"] = (s["first_shard_seconds"]
                                         - rows[0] / s["mean_images_per_s"])
    return out


def stage_run(cfg: GenerateConfig, runtime: RuntimeConfig) -> dict:
    """One ``generate`` into ``cfg.output`` (must not exist), timed from the driver's loop and
    inside the actor."""
    from tasks.generate import generate

    t0 = time.perf_counter()
    with instrumented():
        res = generate(cfg, runtime, echo=lambda m: print(f"  [stage] {m}"))
    t_end = time.perf_counter()
    if res.reused or res.shards_written != len(res.manifest["shards"]):
        raise RuntimeError(f"{cfg.output}: the job was not run from scratch: {res.summary()}")
    arrivals, marks = list(MARKS["rows"]), dict(MARKS)
    recs = actor_records(t0, t_end)
    if len(recs) != 1:
        raise RuntimeError(f"expected one Sampler actor record, found {len(recs)} (are the "
                           f"actors recording to {ACTOR_RECORDS}?)")
    actor = recs[0]
    calls = actor["calls"]
    if any(len(c["rows"]) != 1 for c in calls) or len(calls) != len(arrivals):
        raise RuntimeError("expected one shard per Sampler call and one driver row per shard")
    rows = [c["rows"][0] for c in calls]
    # The headline clock: shard k is complete on storage when the actor's call k returns.
    s = steady(rows, [c["end"] for c in calls], t0)
    d = steady(rows, arrivals, t0)  # when the driver's loop receives each shard's row
    busy = [c["rows"][0] / (c["end"] - c["start"]) for c in calls[1:]]
    gaps = [b["start"] - a["end"] for a, b in pairwise(calls)]
    steady_cpu = sum(c["cpu_s"] for c in calls[1:])
    steady_wall = sum(c["end"] - c["start"] for c in calls[1:])
    n = res.manifest["num_samples"]
    out = {
        "kind": "stage", "samples": n, "shards": len(calls),
        "seconds": t_end - t0, "res_seconds": res.seconds, "job_id": res.manifest["job_id"],
        "output": res.output, **s,
        "startup_seconds": (t_end - t0) - n / s["mean_images_per_s"],
        "actor": {key: v for key, v in actor.items() if key != "calls"},
        "torch_threads": actor["torch_threads"], "OMP_NUM_THREADS": actor["OMP_NUM_THREADS"],
        "actor_calls": calls,
        # inside the actor, busy time only: the Sampler call (sampling + Parquet write)
        "actor_busy_images_per_s": statistics.median(busy),
        "actor_sampler_seconds": [c["seconds"][0] for c in calls],
        "actor_idle_between_shards_ms": [round(1e3 * g, 2) for g in gaps],
        "actor_steady_cores": steady_cpu / steady_wall if steady_wall else None,
        # the driver's view: its loop receives shard k's row this long after the shard is written
        "driver_steady_images_per_s": d["steady_images_per_s"],
        "driver_mean_images_per_s": d["mean_images_per_s"],
        "driver_row_arrivals_s": [round(t - t0, 3) for t in arrivals],
        "delivery_after_shard_ms": [round(1e3 * (t - c["end"]), 2)
                                    for t, c in zip(arrivals, calls, strict=True)],
    }
    if marks["ensure_ray"]:
        out["phases"] = {  # seconds; they add up to the wall time
            "driver_setup_s": marks["ensure_ray"][0] - t0,
            "ray_data_and_actor_start_s": actor["init_start"] - marks["ensure_ray"][0],
            "actor_imports_and_model_load_s": actor["init_end"] - actor["init_start"],
            "actor_wait_first_shard_s": calls[0]["start"] - actor["init_end"],
            "first_shard_s": calls[0]["end"] - calls[0]["start"],
            "steady_s": calls[-1]["end"] - calls[0]["end"],
            "after_last_shard_s": t_end - calls[-1]["end"],
        }
    return out


def compare(plain: dict, stage_x: np.ndarray, stage_y: np.ndarray) -> dict:
    """Whether the plain loop's uint8 images and labels equal the stage's output."""
    x = plain["_images"]
    if x.shape != stage_x[:len(x)].shape:
        return {"equal": False, "reason": f"shapes {x.shape} vs {stage_x.shape}"}
    sx = stage_x[:len(x)]
    diff = np.abs(x.astype(np.int16) - sx.astype(np.int16))
    y = plain["_labels"]
    labels_equal = (y is None and bool((stage_y == -1).all())) or (
        y is not None and np.array_equal(y, stage_y[:len(y)]))
    return {"equal": bool(not diff.any() and labels_equal), "labels_equal": bool(labels_equal),
            "samples": len(x), "pixels_differing": int((diff > 0).sum()),
            "images_differing": int(diff.reshape(len(x), -1).any(axis=1).sum()),
            "max_abs_diff": int(diff.max()), "truncated": len(x) < len(stage_x)}


def public(r: dict) -> dict:
    return {k: v for k, v in r.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# GPU path
# --------------------------------------------------------------------------------------------


def gpu_section(args, root: Path, wait: dict) -> dict:
    import torch

    test = args.gpu_test_on_cpu
    if not torch.cuda.is_available() and not test:
        print("gpu: CUDA is not available here; skipping the GPU path")
        return {"skipped": "CUDA not available"}
    device = "cpu" if test else "cuda"
    info: dict = {"device": device, "test_on_cpu": test}
    if not test:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    print(f"gpu: {info}")
    sets = tb.GPU_TEST_MODEL_SETS if test else tb.GPU_MODEL_SETS
    unet = load_config(sets=sets).model
    path, minfo = random_model(root, unet, "gpu-test-tiny" if test else "gpu-cifar-shape")
    info["model"] = minfo | {"sets": sets}
    # test on the CPU: the plumbing only (tiny model, few samples and steps)
    n, shard, batch, steps = ((96, 32, 16, 4) if test else
                              (args.gpu_num_samples, args.gpu_shard_size, args.gpu_batch_size,
                               args.gpu_steps))
    runtime = RuntimeConfig(root=str(root))
    info["ray_init_seconds"] = tb.start_ray(runtime)
    gen = GenerateConfig(model=path, num_samples=n, sampler=args.gpu_sampler, steps=steps,
                         guidance_scale=args.gpu_guidance, batch_size=batch, shard_size=shard,
                         num_actors=1, gpus_per_actor=0 if test else 1, bf16="on")
    info["settings"] = gen.model_dump(mode="json")
    print(f"gpu: plain loop, {n} samples of {unet.in_channels}×{unet.resolution}² "
          f"({minfo['parameters'] / 1e6:.1f}M parameters), {args.gpu_sampler}:{steps}, batch "
          f"{batch}, bf16, on {device} ...")
    a = tb.timed(plain_run, gen, runtime, None, device=device, **wait)  # bf16: gen says on
    print(f"  plain: {describe(a)}")
    if device == "cuda":
        torch.cuda.empty_cache()
    out_dir = root / "out" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    print("gpu: stage ...")
    b = tb.timed(stage_run, gen.model_copy(update={"output": str(out_dir)}), runtime, **wait)
    print(f"  stage: {describe(b)}")
    x, y, _ = read_samples(str(out_dir), runtime)
    info["equal"] = compare(a, x, y)
    shutil.rmtree(out_dir, ignore_errors=True)
    info.update(plain=public(a), stage=public(b),
                ratio=b["steady_images_per_s"] / a["steady_images_per_s"],
                ratio_of_means=b["mean_images_per_s"] / a["mean_images_per_s"])
    print(f"gpu: stage {b['steady_images_per_s']:,.1f} img/s, plain "
          f"{a['steady_images_per_s']:,.1f} img/s, stage/plain ×{info['ratio']:.3f}; outputs "
          f"equal: {info['equal']['equal']}")
    return info


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(x: float | None, nd: int = 1) -> str:
    return "" if x is None else f"{x:,.{nd}f}"


def describe(r: dict) -> str:
    txt = (f"{r['steady_images_per_s']:,.2f} img/s steady (median of "
           f"{r['steady_shards']} shards; mean {r['mean_images_per_s']:,.2f}); start-up "
           f"{r['startup_seconds']:.2f} s of {r['seconds']:.1f} s; {r['cores_used']:.2f} cores, "
           f"other load {r['foreign_load']:.2f}")
    if r["kind"] == "stage":
        txt += (f"; actor: {r['torch_threads']} torch thread(s), "
                f"{_f(r['actor_steady_cores'], 2)} cores, {r['actor_busy_images_per_s']:,.2f} "
                f"img/s while busy, idle between shards "
                f"{statistics.median(r['actor_idle_between_shards_ms']):.1f} ms; driver's loop: "
                f"{r['driver_steady_images_per_s']:,.2f} img/s (mean "
                f"{r['driver_mean_images_per_s']:,.2f}), rows arrive "
                f"{statistics.median(r['delivery_after_shard_ms']):.0f} ms after their shard "
                "is written (median)")
    return txt


PHASES = ("driver_setup_s", "ray_data_and_actor_start_s", "actor_imports_and_model_load_s",
          "actor_wait_first_shard_s", "first_shard_s", "steady_s", "after_last_shard_s")


def summarize(reps: list[dict]) -> dict:
    clean = [r for r in reps if r["clean"]]
    chosen = clean or reps
    over = (f"the {len(clean)} repetition(s) run on a quiet machine" if clean else
            f"all {len(reps)} repetitions (none ran on a quiet machine)")
    if clean and len(clean) < len(reps):
        over += f" ({len(reps) - len(clean)} disturbed one(s) left out)"
    med = statistics.median
    st = [r["stage"] for r in chosen]
    stage_ips = med(b["steady_images_per_s"] for b in st)
    stage_mean = med(b["mean_images_per_s"] for b in st)
    by_threads = {}
    for i, p in enumerate(chosen[0]["plain"]):
        ratios = [r["stage"]["steady_images_per_s"] / r["plain"][i]["steady_images_per_s"]
                  for r in chosen]
        mean_ratios = [r["stage"]["mean_images_per_s"] / r["plain"][i]["mean_images_per_s"]
                       for r in chosen]
        by_threads[str(p["threads"])] = {
            "plain_ips": med(r["plain"][i]["steady_images_per_s"] for r in chosen),
            "plain_mean_ips": med(r["plain"][i]["mean_images_per_s"] for r in chosen),
            "plain_startup_s": med(r["plain"][i]["startup_seconds"] for r in chosen),
            "ratio": med(ratios), "ratios": [round(x, 4) for x in ratios],
            "mean_ratio": med(mean_ratios), "mean_ratios": [round(x, 4) for x in mean_ratios],
            "outputs_equal": all(r["equal"][i]["equal"] for r in reps)}
    phases = [b["phases"] for b in st if b.get("phases")]
    return {
        "median_over": over, "clean_reps": len(clean), "reps": len(reps), "goal": GOAL,
        "stage_ips": stage_ips, "stage_mean_ips": stage_mean, "by_threads": by_threads,
        "stage_actor_busy_ips": med(b["actor_busy_images_per_s"] for b in st),
        "stage_driver_ips": med(b["driver_steady_images_per_s"] for b in st),
        "stage_driver_mean_ips": med(b["driver_mean_images_per_s"] for b in st),
        "stage_actor_cores": med(b["actor_steady_cores"] or 0 for b in st),
        "stage_idle_between_shards_ms": med(g for b in st
                                            for g in b["actor_idle_between_shards_ms"]),
        "stage_delivery_ms": med(d for b in st for d in b["delivery_after_shard_ms"]),
        "stage_delivery_ms_by_shard": [b["delivery_after_shard_ms"] for b in st],
        "stage_seconds": med(b["seconds"] for b in st),
        "stage_startup_s": med(b["startup_seconds"] for b in st),
        "stage_phases": {k: med(p[k] for p in phases) for k in PHASES} if phases else {},
    }


def render(result: dict) -> str:
    env, s, thr = result["environment"], result.get("summary"), result["quiet_threshold"]
    lines = [
        "# Generation-stage benchmark: Ray Data generation job vs a plain in-process sampler "
        "loop",
        "",
        f"Command: `{result['command']}` (from the repository root; console log in "
        f"`{result['tag']}.log`)  ",
        f"Machine: {env['cpu_count']} CPUs (Ray sees {_f(env['ray_cpus'], 0) or '-'}), "
        f"{env['platform']}, Python {env['python']}; git {env['git']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
    ]
    if result.get("note"):
        lines.append(f"Note: {result['note']}  ")
    if s is None:
        lines.append("")
    else:
        st, m, probe, cold = (result["settings"], result["model"], result["actor_probe"],
                              result["cold_stage"])
        lines += [
            f"Model: `DIGITS_UNET` ({m['parameters'] / 1e6:.2f}M parameters, class-conditional, "
            f"8×8×1), trained {m['train_steps']} steps (loss {m['final_loss']:.3f}), checkpoint "
            f"layout. Job: {st['num_samples']} samples in shards of {st['shard_size']} "
            f"({st['num_samples'] // st['shard_size']} shards), `{st['sampler']}` "
            f"{st['steps']} steps, guidance {st['guidance_scale']}, labels uniform, batch "
            f"{st['batch_size']}, one actor (`cpus_per_actor` {st['cpus_per_actor']})  ",
            f"Inside the Sampler actor: torch threads **{probe['torch_threads']}**, "
            f"OMP_NUM_THREADS={probe['OMP_NUM_THREADS']}, CPU affinity {probe['cpu_affinity']} "
            f"cores; this process's torch default: {env['driver_torch_threads_default']} "
            "threads  ",
            f"Ray start-up (a new local Ray, once, in no figure below): "
            f"{result['ray_init_seconds']:.2f} s. First (cold) stage run, "
            f"{cold['samples']} samples: {cold['seconds']:.1f} s, of which start-up "
            f"{cold['startup_seconds']:.1f} s (timeline: "
            + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.2f}"
                        for k, v in cold.get("phases", {}).items()) + ")",
            "",
            "*Steady* = the median per-shard images/s after the first shard (plain: shard times "
            "in the loop; stage: the intervals between shards being written, i.e. the ends of "
            "the actor's Sampler calls, so Ray Data's time between calls counts); *mean* = the "
            "same span as a whole. *Busy* = the stage's rate over the Sampler calls alone "
            "(sampling + Parquet write), idle time between them left out. *Start-up* = "
            "wall time − N / mean rate. *Cores* = CPU time of this process and those it started "
            "/ wall; *other load* = cores the machine was busy with other work (/proc/stat minus "
            f"ours; > {thr}: †, left out of medians). *Equal* = the plain loop's uint8 images "
            "and labels are identical to the stage's output.",
            "",
            "| rep | run | threads | steady img/s | mean img/s | busy img/s | start-up s | "
            "wall s | cores | other load | stage / this | equal |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for rep in result["reps"]:
            mark = "" if rep["clean"] else " †"
            b = rep["stage"]
            for p, eq in zip(rep["plain"], rep["equal"], strict=True):
                eq_txt = "yes" if eq["equal"] else (
                    f"no ({eq['images_differing']} images, max Δ {eq['max_abs_diff']})")
                lines.append(
                    f"| {rep['index']}{mark} | plain | {p['threads']} | "
                    f"{_f(p['steady_images_per_s'], 2)} | {_f(p['mean_images_per_s'], 2)} | | "
                    f"{p['startup_seconds']:.2f} | {p['seconds']:.1f} | {p['cores_used']:.2f} | "
                    f"{p['foreign_load']:.2f} | "
                    f"×{b['steady_images_per_s'] / p['steady_images_per_s']:.3f} | {eq_txt} |")
            lines.append(
                f"| {rep['index']}{mark} | stage | {b['torch_threads']} | "
                f"{_f(b['steady_images_per_s'], 2)} | {_f(b['mean_images_per_s'], 2)} | "
                f"{_f(b['actor_busy_images_per_s'], 2)} | {b['startup_seconds']:.2f} | "
                f"{b['seconds']:.1f} | {b['cores_used']:.2f} | {b['foreign_load']:.2f} | | |")
        lines += ["", f"Medians over {s['median_over']}:", "",
                  "| plain threads | plain img/s | stage img/s | stage / plain | (means) | goal "
                  "| outputs equal |",
                  "|---:|---:|---:|---:|---:|---|---|"]
        for k, v in s["by_threads"].items():
            verdict = "met" if v["ratio"] >= GOAL else "**missed**"
            lines.append(f"| {k} | {_f(v['plain_ips'], 2)} | {_f(s['stage_ips'], 2)} | "
                         f"**×{v['ratio']:.3f}** | ×{v['mean_ratio']:.3f} | ≥ ×{GOAL}: "
                         f"{verdict} | {'yes' if v['outputs_equal'] else 'no'} |")
        ph = s["stage_phases"]
        lines += [
            "",
            f"Stage (medians): the actor uses {s['stage_actor_cores']:.2f} cores while "
            f"sampling, at {_f(s['stage_actor_busy_ips'], 2)} img/s; it waits "
            f"{s['stage_idle_between_shards_ms']:.1f} ms between shards. The driver's loop in "
            f"`generate` receives each shard's row {s['stage_delivery_ms']:.0f} ms after the "
            f"shard is written (per shard: {s['stage_delivery_ms_by_shard'][0]} ms); by those "
            f"arrivals the rate would read {_f(s['stage_driver_ips'], 2)} img/s (mean "
            f"{_f(s['stage_driver_mean_ips'], 2)}).",
            "",
            f"Start-up (medians): stage {s['stage_startup_s']:.2f} s of "
            f"{s['stage_seconds']:.1f} s; plain "
            + ", ".join(f"{v['plain_startup_s']:.2f} s ({k} thread(s))"
                        for k, v in s["by_threads"].items()) + ". Stage timeline (s):",
            "",
            "| " + " | ".join(k[:-2].replace("_", " ") for k in PHASES) + " |",
            "|" + "---:|" * len(PHASES),
            "| " + " | ".join(f"{ph.get(k, float('nan')):.2f}" for k in PHASES) + " |",
            "",
        ]
    g = result.get("gpu")
    lines += ["## GPU path", ""]
    if not g:
        lines.append("Not requested (`--gpu`).")
    elif g.get("skipped"):
        lines.append(f"Skipped: {g['skipped']}.")
    else:
        a, b, st = g["plain"], g["stage"], g["settings"]
        lines += [
            f"{g.get('name', g['device'])}"
            + (" (**test run on the CPU**, tiny model)" if g["test_on_cpu"] else "")
            + f"; UNet {g['model']['parameters'] / 1e6:.1f}M parameters, 32×32×3, "
            f"{g['model'].get('weights', '')}; "
            f"{st['num_samples']} samples in shards of {st['shard_size']}, `{st['sampler']}` "
            f"{st['steps']} steps, guidance {st['guidance_scale']}, batch {st['batch_size']}, "
            "bf16 autocast, one actor" + ("" if g["test_on_cpu"] else " with one GPU") + ".",
            "",
            "| run | steady img/s | mean img/s | start-up s | wall s |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, r in (("plain loop", a), ("stage", b)):
            lines.append(f"| {label} | {_f(r['steady_images_per_s'], 1)} | "
                         f"{_f(r['mean_images_per_s'], 1)} | {r['startup_seconds']:.1f} | "
                         f"{r['seconds']:.1f} |")
        lines += ["", f"Stage / plain: ×{g['ratio']:.3f} (means ×{g['ratio_of_means']:.3f}); "
                  f"outputs equal: {'yes' if g['equal']['equal'] else 'no'} "
                  f"({g['equal']['images_differing']} images differ, max Δ "
                  f"{g['equal']['max_abs_diff']})."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    global DRIVER_THREADS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-samples", type=int, default=2048, help="samples per run")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    ap.add_argument("--cpus-per-actor", type=float, default=None,
                    help="the stage's generate.cpus_per_actor (its actor's torch threads); "
                    "default: every core, the resources of the plain loop on every core")
    ap.add_argument("--plain-threads", type=int, nargs="*", default=None,
                    help="torch thread counts of the plain loop (default: the Sampler actor's, "
                    "measured, and every core)")
    ap.add_argument("--warmup-shards", type=int, default=3,
                    help="shards of the first (cold) stage run, reported apart")
    ap.add_argument("--train-steps", type=int, default=200,
                    help="training steps of the digits model (cached under --root)")
    ap.add_argument("--root", default="/tmp/bench-generate-root", help="scratch root")
    ap.add_argument("--out", default="benchmarks/results", help="where the results go")
    ap.add_argument("--tag", default=None, help="result file stem (default generate_throughput,"
                    " generate_throughput_gpu with --gpu-only)")
    ap.add_argument("--note", default="", help="a line for the report header")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="before each run wait until other processes use fewer cores than "
                    "this; repetitions during which they used more are left out of medians")
    ap.add_argument("--max-wait", type=float, default=30,
                    help="longest wait for a quiet machine before a run, seconds")
    ap.add_argument("--max-run-seconds", type=float, default=150,
                    help="stop a plain run after this long (a busy machine can slow a loop on "
                    "every core many times over); it then counts as disturbed")
    ap.add_argument("--gpu", action="store_true",
                    help="also run the GPU variant (skipped, and recorded so, without CUDA)")
    ap.add_argument("--gpu-only", action="store_true", help="the GPU variant alone")
    ap.add_argument("--gpu-num-samples", type=int, default=8192)
    ap.add_argument("--gpu-shard-size", type=int, default=1024)
    ap.add_argument("--gpu-batch-size", type=int, default=256)
    ap.add_argument("--gpu-sampler", default="ddim")
    ap.add_argument("--gpu-steps", type=int, default=50)
    ap.add_argument("--gpu-guidance", type=float, default=1.5)
    ap.add_argument("--gpu-test-on-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.tag = args.tag or ("generate_throughput_gpu" if args.gpu_only
                            else "generate_throughput")

    import torch

    DRIVER_THREADS = tb.DRIVER_THREADS = torch.get_num_threads()  # environment() reads it
    exe = os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else "python"
    command = " ".join([exe, "benchmarks/generate_throughput.py", *sys.argv[1:]])
    out, root = Path(args.out), Path(args.root)
    out.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    wait = {"threshold": args.quiet_threshold, "max_wait": args.max_wait}
    shutil.rmtree(ACTOR_RECORDS, ignore_errors=True)  # earlier runs' actor records

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    quiet = wait_quiet(**wait)
    result: dict = {"command": command, "tag": args.tag, "note": args.note,
                    "quiet_threshold": args.quiet_threshold, "quiet_before_start": quiet}

    if not args.gpu_only:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        path, minfo = digits_model(root, args.train_steps, cores)
        print(f"model: {path} ({'reused' if minfo['reused'] else 'trained'}: "
              f"{minfo['train_steps']} steps, loss {minfo['final_loss']:.3f}, "
              f"{minfo['parameters'] / 1e6:.2f}M parameters)")
        torch.set_num_threads(DRIVER_THREADS)
        runtime = RuntimeConfig(root=str(root))
        ray_init_s = tb.start_ray(runtime)
        print(f"ray: started in {ray_init_s:.2f} s, {ray.cluster_resources().get('CPU')} CPUs, "
              f"{ray.get_runtime_context().gcs_address}; idle after {settle():.0f} s more")
        gen = GenerateConfig(model=path, num_samples=args.num_samples, sampler=args.sampler,
                             steps=args.steps, guidance_scale=args.guidance,
                             batch_size=args.batch_size, shard_size=args.shard_size,
                             num_actors=1, cpus_per_actor=args.cpus_per_actor or cores)
        if args.num_samples // args.shard_size < 6:
            print(f"warning: {args.num_samples // args.shard_size} shards; the steady state "
                  "rests on few shards")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        runs = root / "out"

        # The first Ray Data execution of this process, in fresh workers: start-up as a user's
        # first job sees it; it also tells the actor's torch threads.
        print(f"cold stage run, {args.warmup_shards} shards ...")
        cold_cfg = gen.model_copy(update={"num_samples": args.warmup_shards * args.shard_size,
                                          "output": str(runs / f"{stamp}-cold")})
        cold = tb.timed(stage_run, cold_cfg, runtime, **wait)
        shutil.rmtree(cold_cfg.output, ignore_errors=True)
        probe = cold["actor"]
        print(f"  cold stage: {describe(cold)}; phases "
              + ", ".join(f"{k} {v:.2f}" for k, v in cold.get("phases", {}).items()))
        threads = args.plain_threads or sorted({probe["torch_threads"], cores})
        # Untimed: this process's first-use costs at each thread count (the actor pays its own
        # in its start-up and first shard).
        for th in threads:
            torch.set_num_threads(th)
            job, model = resolve_job(gen, runtime, echo=lambda m: None)
            sample_indices(model, job, np.arange(16), 16, torch.device("cpu"))

        reps = []
        for i in range(args.repeats):
            plain = []
            for th in threads:
                print(f"rep {i}: plain loop, {th} thread(s) ...")
                settle(10)
                a = tb.timed(plain_run, gen, runtime, th, max_seconds=args.max_run_seconds,
                             **wait)
                print(f"  plain@{th}: {describe(a)}")
                plain.append(a)
            torch.set_num_threads(DRIVER_THREADS)
            out_dir = runs / f"{stamp}-{i}"
            print(f"rep {i}: stage → {out_dir} ...")
            settle(10)
            b = tb.timed(stage_run, gen.model_copy(update={"output": str(out_dir)}), runtime,
                         **wait)
            x, y, _ = read_samples(str(out_dir), runtime)
            equal = [compare(p, x, y) for p in plain]
            shutil.rmtree(out_dir, ignore_errors=True)
            print(f"  stage: {describe(b)}; phases "
                  + ", ".join(f"{k} {v:.2f}" for k, v in b.get("phases", {}).items()))
            print("  stage / plain: " + ", ".join(
                f"@{p['threads']} ×{b['steady_images_per_s'] / p['steady_images_per_s']:.3f} "
                f"(outputs equal: {e['equal']}"
                + ("" if e["equal"] else f", {e['images_differing']} images differ, max Δ "
                   f"{e['max_abs_diff']}") + ")" for p, e in zip(plain, equal, strict=True)))
            reps.append({"index": i, "plain": [public(p) for p in plain], "stage": public(b),
                         "equal": equal, "clean": all(r["clean"] for r in (*plain, b))})
        result.update(
            settings=gen.model_dump(mode="json") | {"repeats": args.repeats,
                                                    "plain_threads": threads,
                                                    "root": args.root},
            model=minfo, ray_init_seconds=ray_init_s, actor_probe=probe, cold_stage=public(cold),
            reps=reps, summary=summarize(reps))
    if args.gpu or args.gpu_only or args.gpu_test_on_cpu:
        result["gpu"] = gpu_section(args, root, wait)
    result["environment"] = tb.environment()
    md = render(result)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{args.tag}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.md')}")


if __name__ == "__main__":
    main()

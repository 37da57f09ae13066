"""Preprocessing benchmark: the Ray Data stage against a plain single-process Pillow loop.

    .venv/bin/python benchmarks/preprocess_images.py --n 20000 --repeats 3 --out benchmarks/results

A folder of ``--n`` generated 64×64 RGB PNGs (smooth gradients plus noise, in 10 class
sub-folders) is preprocessed to 32×32 RGB by

  (a) **baseline**: one process, one loop: list the folder, read every file, decode it with
      ``tasks.decode.decode_image`` (the exact function the Ray workers run: Pillow open, RGB,
      ``ImageOps.fit`` bicubic), collect the arrays and write one zstd Parquet file with pyarrow;
  (b) **pipeline**: ``tasks.preprocess.preprocess`` (listing, fingerprint, Ray Data
      ``from_items → map_batches(decode) → Datasink`` writing train/val part files, manifest
      commit), each run into a fresh root so that nothing is reused;
  (c) **ceiling**: the loop of (a) split over one forked process per CPU, without Ray: what this
      machine itself gives for the work (``--no-ceiling`` skips it).

Ray start-up (``ensure_ray``) is timed once, on its own, and is in no pipeline figure. The first
pipeline run (cold worker processes) is reported separately; then the runs alternate
(A C B A C B ...) and the ratio pipeline / baseline is taken per pair, the median over
pairs being the headline. Pipeline images/s are given two ways: from ``res.seconds`` (the whole
stage) and from ``manifest["writer"]["seconds"]`` (the Ray Data execution alone).

Generation of the folder is cached (``--images``) and not timed. The machine may be shared:
each run waits for other processes to go quiet, and the CPU they use meanwhile is measured
from /proc; disturbed pairs are left out of the medians. Writes ``preprocess.json`` (all raw
timings, CPU accounting, environment) and ``preprocess.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import CpuMeter, git_revision, settle, wait_quiet

from tasks.datasets import DataConfig
from tasks.decode import decode_image
from tasks.preprocess import preprocess
from tasks.runtime import RuntimeConfig, ensure_ray

SIZE = 64
RESOLUTION = 32
CLASSES = 10
META = ".bench-meta.json"  # hidden: the stage's listing ignores dot-files
GOAL = 1.8


# --------------------------------------------------------------------------------------------
# The input folder
# --------------------------------------------------------------------------------------------


def _make_images(args: tuple[str, int, int]) -> int:
    """Write images [start, stop) of the folder; each is seeded by its index (reproducible)."""
    from PIL import Image

    root, start, stop = args
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        k = i % CLASSES
        c = rng.uniform(0, 255, (3, 4)).astype(np.float32)
        fx, fy = rng.uniform(0.5, 3.0, 2)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + k)  # class-dependent phase
        img = (c[:, 0, None, None] * x + c[:, 1, None, None] * y
               + c[:, 2, None, None] * (1 - x) * (1 - y) + c[:, 3, None, None] * wave) / 2.0
        img = img + rng.normal(0, 6, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(img, "RGB").save(os.path.join(root, f"class_{k}", f"img_{i:06d}.png"))
    return stop - start


def _count_pngs(root: Path) -> int:
    return sum(1 for d in root.iterdir() if d.is_dir() for f in os.scandir(d)
               if f.name.endswith(".png"))


def warm_page_cache(root: Path) -> float:
    """Read every file once (untimed), so that no timed run pays for the disk."""
    t0 = time.perf_counter()
    for d in root.iterdir():
        if d.is_dir():
            for f in os.scandir(d):
                with open(f.path, "rb") as fh:
                    fh.read()
    return time.perf_counter() - t0


def ensure_images(root: Path, n: int) -> dict:
    """The cached folder of ``n`` PNGs under ``root``; regenerated only if the count differs."""
    meta_path = root / META
    if root.is_dir() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("n") == n and meta.get("size") == SIZE and _count_pngs(root) == n:
            print(f"images: reusing {n} PNGs in {root}")
            return meta
    print(f"images: generating {n} PNGs ({SIZE}x{SIZE} RGB, {CLASSES} classes) in {root} ...")
    t0 = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    for k in range(CLASSES):
        (root / f"class_{k}").mkdir(parents=True)
    workers = os.cpu_count() or 1
    chunk = 1000
    jobs = [(str(root), s, min(s + chunk, n)) for s in range(0, n, chunk)]
    with ProcessPoolExecutor(workers) as pool:
        done = sum(pool.map(_make_images, jobs))
    assert done == n
    size = sum(f.stat().st_size for d in root.iterdir() if d.is_dir() for f in d.iterdir())
    meta = {"n": n, "size": SIZE, "classes": CLASSES, "bytes": size,
            "generated_s": round(time.perf_counter() - t0, 2)}
    meta_path.write_text(json.dumps(meta))
    print(f"images: {n} PNGs, {size / 1e6:.1f} MB, generated in {meta['generated_s']} s")
    return meta


# --------------------------------------------------------------------------------------------
# CPU accounting: this process tree (the driver and the Ray processes it started) vs the rest
# --------------------------------------------------------------------------------------------

# "foreign" = the CPU of the other processes /proc shows; the process table is read at the two
# ends of a block only (no sampling thread beside the single-process baseline).
METER = {"every": None, "machine_wide": False, "reaped": False}


# --------------------------------------------------------------------------------------------
# (a) the single-process baseline
# --------------------------------------------------------------------------------------------


def _list_folder(src: Path) -> list[tuple[str, int, str]]:
    """(key, label, path) of every PNG, ImageFolder style, sorted like the stage's listing."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [(f"{c}/{name}", label, str(src / c / name))
            for label, c in enumerate(classes)
            for name in sorted(os.listdir(src / c)) if name.endswith(".png")]


def _decode_files(files: list[tuple[str, int, str]]) -> list[bytes]:
    out = []
    for _, _, path in files:
        with open(path, "rb") as f:
            data = f.read()
        arr = decode_image(data, resolution=RESOLUTION, mode="RGB", max_pixels=50_000_000)
        out.append(arr.tobytes())
    return out


def _write(files: list[tuple[str, int, str]], pixels: list[bytes], out_file: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "key": pa.array([k for k, _, _ in files], pa.string()),
        "label": pa.array([y for _, y, _ in files], pa.int32()),
        "pixels": pa.array(pixels, pa.binary(3 * RESOLUTION * RESOLUTION)),
    })
    pq.write_table(table, out_file, compression="zstd")


def baseline(src: Path, out_file: Path, pool=None, procs: int = 1) -> dict:
    """List, read, decode, resize, write one Parquet file: the same work as the stage, inline.

    With ``pool`` (a multiprocessing pool forked before Ray started), the read+decode loop is
    split over its processes instead: the machine's own ceiling for this work, without Ray.
    """
    t0 = time.perf_counter()
    files = _list_folder(src)
    t_list = time.perf_counter()
    if pool is None:
        pixels = _decode_files(files)
    else:
        k = 4 * procs  # a few chunks per process even out their finishing times
        chunks = [files[i * len(files) // k: (i + 1) * len(files) // k] for i in range(k)]
        pixels = [px for part in pool.map(_decode_files, chunks, chunksize=1) for px in part]
    t_decode = time.perf_counter()
    _write(files, pixels, out_file)
    t_end = time.perf_counter()
    n = len(files)
    total = t_end - t0
    return {
        "images": n,
        "seconds": total,
        "list_s": t_list - t0,
        "decode_s": t_decode - t_list,
        "write_s": t_end - t_decode,
        "images_per_s": n / total,
        "bytes_written": out_file.stat().st_size,
    }


# --------------------------------------------------------------------------------------------
# (b) the pipeline
# --------------------------------------------------------------------------------------------


def pipeline(src: Path, root: Path, name: str, rows_per_file: int | None) -> dict:
    """One ``preprocess`` run into a fresh root; phases from the timestamps of its messages."""
    marks: list[tuple[float, str]] = []

    def echo(msg: str) -> None:
        marks.append((time.perf_counter(), msg))
        print(f"  [stage] {msg}")

    extra = {"rows_per_file": rows_per_file} if rows_per_file else {}
    cfg = DataConfig(name=name, source=str(src), resolution=RESOLUTION, channels=3, **extra)
    t0 = time.perf_counter()
    res = preprocess(cfg, RuntimeConfig(root=str(root)), echo=echo)
    t_end = time.perf_counter()
    assert not res.reused, "a timed run reused a committed version; roots must be fresh"
    m = res.manifest
    rows = sum(split["rows"] for split in m["splits"].values())  # train, val, test
    writer_s = float(m["writer"]["seconds"])

    def at(prefix: str) -> float | None:
        return next((t for t, msg in marks if msg.startswith(prefix)), None)

    t_listed = next((t for t, msg in marks if " input(s) (" in msg), None)
    t_decoding = at("decoding on Ray Data")
    phases = {}
    if t_listed and t_decoding:
        phases = {
            "list_fingerprint_s": t_listed - t0,
            "pre_ray_s": t_decoding - t_listed,  # existence check, ensure_ray (0: already up)
            "ray_data_s": writer_s,
            "post_s": t_end - t_decoding - writer_s,  # merge stats, manifest commit
        }
    blocks = next((int(msg.split(" in ")[1].split(" ")[0]) for _, msg in marks
                   if msg.startswith("decoding on Ray Data")), None)
    return {
        "images": rows,
        "skipped": len(m["skipped"]),
        "seconds": res.seconds,
        "writer_seconds": writer_s,
        "ray_init_seconds_in_run": res.ray_init_seconds,
        "images_per_s": rows / res.seconds,
        "writer_images_per_s": rows / writer_s,
        "blocks": blocks,
        "part_files": sum(len(split["files"]) for split in m["splits"].values()),
        "phases": phases,
        "version": m["version"],
    }


def check_same_pixels(baseline_file: Path, root: Path, name: str) -> dict:
    """Pipeline output == baseline output, key by key (a benchmark of wrong work is no use)."""
    import pyarrow.parquet as pq

    base = pq.read_table(baseline_file)
    ref = dict(zip(base.column("key").to_pylist(), base.column("pixels").to_pylist(), strict=True))
    parts = sorted(root.glob(f"datasets/{name}/*/*/part-*.parquet"))
    got = {}
    for p in parts:
        t = pq.read_table(p, columns=["key", "pixels"])
        got.update(zip(t.column("key").to_pylist(), t.column("pixels").to_pylist(), strict=True))
    same = sum(1 for k, v in got.items() if ref.get(k) == v)
    return {"baseline_rows": len(ref), "pipeline_rows": len(got), "identical": same,
            "ok": same == len(ref) == len(got)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment() -> dict:
    import fsspec
    import PIL
    import pyarrow
    import ray

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ray_cpus": ray.cluster_resources().get("CPU") if ray.is_initialized() else None,
        "loadavg_1m_5m_15m": list(os.getloadavg()),
        "git": git_revision(),
        "versions": {"ray": ray.__version__, "pyarrow": pyarrow.__version__,
                     "pillow": PIL.__version__, "numpy": np.__version__,
                     "fsspec": fsspec.__version__},
    }


def _f(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def render(result: dict) -> str:
    env, s, thr = result["environment"], result["summary"], result["quiet_threshold"]
    lines = [
        "# Preprocessing benchmark: Ray Data stage vs a single-process Pillow loop",
        "",
        f"Command: `{result['command']}` (from the repository root; console log in "
        f"`{result['tag']}.log` when run as `... 2>&1 | tee benchmarks/results/{result['tag']}"
        ".log`)  ",
        f"Settings: --n {result['n']} --repeats {result['repeats']} --images "
        f"{result['images_dir']} --quiet-threshold {result['quiet_threshold']}; git "
        f"{result['environment']['git']}  ",
        f"Machine: {env['cpu_count']} CPUs (Ray sees {env['ray_cpus']:.0f}), "
        f"{env['platform']}, Python {env['python']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "  ",
        f"Input: {result['n']} PNGs, {SIZE}×{SIZE} RGB, {CLASSES} class folders "
        f"({result['images']['bytes'] / 1e6:.1f} MB) → {RESOLUTION}×{RESOLUTION} RGB, "
        f"rows_per_file {result['rows_per_file']}, {s['blocks']} Ray Data block(s)  ",
        f"Ray start-up (`ensure_ray`, once, excluded from every figure below): "
        f"**{_f(result['ray_init_seconds'])} s**",
        "",
        "Runs in the order shown, interleaved pair by pair. *Stage* = `res.seconds` (listing, "
        "fingerprint, Ray Data, manifest commit); *Ray Data* = `manifest.writer.seconds`. "
        "*CPU s* = CPU time of this process and the processes it started (Ray's, the "
        "ceiling's pool), idle Ray included; *other load* = cores used meanwhile by unrelated "
        f"processes (a pair with > {thr} is marked † and left out of the medians)."
        + (f" *Ceiling* = the baseline's loop split over {result['ceiling_processes']} forked "
           "processes, no Ray: what this machine gives for the work itself."
           if result["ceiling_processes"] else ""),
        "",
        "| pair | run | seconds | images/s | Ray Data s | Ray Data images/s | CPU s "
        "| other load | ratio (stage) | ratio (Ray Data) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["pairs"]:
        a, b = p["baseline"], p["pipeline"]
        tag = "cold" if p["cold"] else "warm"
        mark = "" if p["clean"] else " †"
        lines.append(f"| {p['index']}{mark} | baseline (1 process) | {_f(a['seconds'])} | "
                     f"{_f(a['images_per_s'], 0)} | | | {_f(a['cpu_s'], 1)} | "
                     f"{a['foreign_load']:.2f} | | |")
        if p.get("ceiling"):
            c = p["ceiling"]
            lines.append(f"| {p['index']}{mark} | ceiling ({result['ceiling_processes']} "
                         f"processes, no Ray) | {_f(c['seconds'])} | {_f(c['images_per_s'], 0)} "
                         f"| | | {_f(c['cpu_s'], 1)} | {c['foreign_load']:.2f} | "
                         f"×{p['ratio_ceiling']:.2f} | |")
        lines.append(f"| {p['index']}{mark} | pipeline ({tag}) | {_f(b['seconds'])} | "
                     f"{_f(b['images_per_s'], 0)} | {_f(b['writer_seconds'])} | "
                     f"{_f(b['writer_images_per_s'], 0)} | {_f(b['cpu_s'], 1)} | "
                     f"{b['foreign_load']:.2f} | ×{p['ratio_stage']:.2f} | "
                     f"×{p['ratio_ray_data']:.2f} |")
    verdict = "met" if s["median_ratio_stage"] >= GOAL else "**missed**"
    ph = s["median_phases"]
    lines += [
        "",
        f"Medians over {s['median_over']}: baseline {_f(s['median_baseline_ips'], 0)} images/s; "
        f"pipeline {_f(s['median_pipeline_ips'], 0)} images/s (stage), "
        f"{_f(s['median_pipeline_writer_ips'], 0)} images/s (Ray Data part).  ",
        f"**Median ratio pipeline / baseline: ×{s['median_ratio_stage']:.2f} (whole stage), "
        f"×{s['median_ratio_ray_data']:.2f} (Ray Data part)** — goal ×{GOAL} on the whole "
        f"stage: {verdict}. Cold first run: ×{s['cold_ratio_stage']:.2f}."
        + (f" For scale, the same loop split over {result['ceiling_processes']} processes "
           f"without Ray (*ceiling*) reaches ×{s['median_ratio_ceiling']:.2f}."
           if s.get("median_ratio_ceiling") else ""),
        "",
        "Where the time goes (same medians, seconds):",
        "",
        "| baseline: list | read+decode | write | pipeline: list+fingerprint | before Ray Data "
        "| Ray Data | merge+commit |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(_f(ph[k]) for k in (
            "baseline_list_s", "baseline_decode_s", "baseline_write_s", "list_fingerprint_s",
            "pre_ray_s", "ray_data_s", "post_s")) + " |",
        "",
        f"Output check (first warm run): {result['pixel_check']['identical']} of "
        f"{result['pixel_check']['baseline_rows']} rows byte-identical to the baseline "
        f"({'ok' if result['pixel_check']['ok'] else 'MISMATCH'}).",
        "",
    ]
    return "\n".join(lines)


def timed(fn, *a, threshold: float, max_wait: float) -> dict:
    """Wait for a quiet machine, run ``fn``, add CPU accounting to its result."""
    quiet = wait_quiet(threshold, max_wait, **METER)
    with CpuMeter(**METER) as m:
        r = fn(*a)
    r.update(cpu=m.cpu, cpu_s=m.cpu["driver"] + m.cpu["children"],
             foreign_load=m.foreign_load, quiet_before=quiet)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="number of PNGs (default 20000)")
    ap.add_argument("--repeats", type=int, default=3, help="warm A/B pairs (default 3)")
    ap.add_argument("--out", default="benchmarks/results", help="where the results go")
    ap.add_argument("--images", default="/tmp/bench-preprocess-images",
                    help="the cached input folder (regenerated if its count differs)")
    ap.add_argument("--work", default=None, help="scratch for outputs (default: a temp dir)")
    ap.add_argument("--rows-per-file", type=int, default=None,
                    help="DataConfig.rows_per_file (default: the stage's default)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="before each run wait until other processes use fewer cores than "
                    "this; pairs during which they used more are left out of the medians")
    ap.add_argument("--max-wait", type=float, default=600,
                    help="longest wait for a quiet machine before a run, seconds")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the multiprocessing-ceiling runs (the loop over N processes)")
    ap.add_argument("--tag", default="preprocess", help="result file stem (default preprocess)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be ≥ 1")

    exe = os.path.relpath(sys.executable) if not sys.executable.startswith("/usr") else "python"
    command = " ".join([exe, "benchmarks/preprocess_images.py", *sys.argv[1:]])
    src = Path(args.images).resolve()
    images_meta = ensure_images(src, args.n)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wait = {"threshold": args.quiet_threshold, "max_wait": args.max_wait}

    procs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Forked now, before Ray starts threads in this process (forking after that is unsafe).
    pool = None if args.no_ceiling else multiprocessing.get_context("fork").Pool(procs)

    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    quiet = wait_quiet(**wait, **METER)
    t = time.perf_counter()
    ray_init_s = ensure_ray(RuntimeConfig())
    print(f"ray: started in {ray_init_s:.2f} s (measured {time.perf_counter() - t:.2f} s), "
          f"{ray.cluster_resources().get('CPU')} CPUs")
    print(f"ray: idle after {settle(window=1.0, idle=0.1, **METER):.0f} s more")
    print(f"images: page cache warmed in {warm_page_cache(src):.1f} s")
    rows_per_file = args.rows_per_file or DataConfig().rows_per_file

    pairs = []
    pixel_check = None
    for i in range(args.repeats + 1):  # pair 0 has the cold pipeline run
        cold = i == 0
        base_file = work / f"baseline-{i}.parquet"
        print(f"pair {i}: baseline ...")
        a = timed(baseline, src, base_file, **wait)
        print(f"  baseline {a['seconds']:.2f} s, {a['images_per_s']:,.0f} images/s "
              f"(list {a['list_s']:.2f}, read+decode {a['decode_s']:.2f}, "
              f"write {a['write_s']:.2f}); CPU {a['cpu']}, other load {a['foreign_load']:.2f}")
        c = None
        if pool is not None:
            print(f"pair {i}: ceiling ({procs} processes, no Ray) ...")
            c = timed(baseline, src, base_file, pool, procs, **wait)
            print(f"  ceiling {c['seconds']:.2f} s, {c['images_per_s']:,.0f} images/s "
                  f"(read+decode {c['decode_s']:.2f}); CPU {c['cpu']}, other load "
                  f"{c['foreign_load']:.2f}")
        root = work / f"root-{i}"
        print(f"pair {i}: pipeline ({'cold' if cold else 'warm'}) ...")
        b = timed(pipeline, src, root, f"bench{i}", args.rows_per_file, **wait)
        print(f"  pipeline {b['seconds']:.2f} s, {b['images_per_s']:,.0f} images/s; Ray Data "
              f"{b['writer_seconds']:.2f} s, {b['writer_images_per_s']:,.0f} images/s; "
              f"{b['blocks']} blocks; phases " + ", ".join(
                  f"{k} {v:.2f}" for k, v in b["phases"].items())
              + f"; CPU {b['cpu']}, other load {b['foreign_load']:.2f}")
        assert b["images"] == args.n and b["skipped"] == 0, b
        if i == 1:
            pixel_check = check_same_pixels(base_file, root, f"bench{i}")
            print(f"  output check: {pixel_check}")
        shutil.rmtree(root, ignore_errors=True)
        base_file.unlink(missing_ok=True)
        loads = [r["foreign_load"] for r in (a, b, c) if r]
        pairs.append({
            "index": i, "cold": cold, "baseline": a, "pipeline": b, "ceiling": c,
            "clean": max(loads) <= args.quiet_threshold,
            "ratio_stage": b["images_per_s"] / a["images_per_s"],
            "ratio_ray_data": b["writer_images_per_s"] / a["images_per_s"],
            "ratio_ceiling": c["images_per_s"] / a["images_per_s"] if c else None,
        })

    warm = [p for p in pairs if not p["cold"]]
    clean = [p for p in warm if p["clean"]]
    chosen = clean or warm
    median_over = (f"the {len(clean)} warm pair(s) run on a quiet machine" if clean else
                   f"all {len(warm)} warm pairs (none ran on a quiet machine)")
    if clean and len(clean) < len(warm):
        median_over += f" ({len(warm) - len(clean)} disturbed pair(s) left out)"

    def med(f) -> float:
        return statistics.median(f(p) for p in chosen)

    summary = {
        "warm_pairs": len(warm),
        "clean_warm_pairs": len(clean),
        "median_over": median_over,
        "blocks": warm[0]["pipeline"]["blocks"],
        "median_baseline_ips": med(lambda p: p["baseline"]["images_per_s"]),
        "median_pipeline_ips": med(lambda p: p["pipeline"]["images_per_s"]),
        "median_pipeline_writer_ips": med(lambda p: p["pipeline"]["writer_images_per_s"]),
        "median_ratio_stage": med(lambda p: p["ratio_stage"]),
        "median_ratio_ray_data": med(lambda p: p["ratio_ray_data"]),
        "median_ratio_ceiling": med(lambda p: p["ratio_ceiling"]) if pool else None,
        "median_ceiling_ips": med(lambda p: p["ceiling"]["images_per_s"]) if pool else None,
        "median_ratio_stage_all_warm": statistics.median(p["ratio_stage"] for p in warm),
        "ratios_stage": [round(p["ratio_stage"], 3) for p in warm],
        "cold_ratio_stage": pairs[0]["ratio_stage"],
        "goal": GOAL,
        "median_phases": {
            "baseline_list_s": med(lambda p: p["baseline"]["list_s"]),
            "baseline_decode_s": med(lambda p: p["baseline"]["decode_s"]),
            "baseline_write_s": med(lambda p: p["baseline"]["write_s"]),
            **{k: med(lambda p, k=k: p["pipeline"]["phases"][k])
               for k in ("list_fingerprint_s", "pre_ray_s", "ray_data_s", "post_s")},
        },
    }
    result = {
        "command": command,
        "tag": args.tag,
        "n": args.n,
        "repeats": args.repeats,
        "images_dir": str(src),
        "rows_per_file": rows_per_file,
        "ceiling_processes": procs if pool else None,
        "quiet_threshold": args.quiet_threshold,
        "images": images_meta,
        "environment": {**environment(), "quiet_before_ray_init": quiet},
        "ray_init_seconds": ray_init_s,
        "pairs": pairs,
        "pixel_check": pixel_check,
        "summary": summary,
    }
    md = render(result)
    (out / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.tag}.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out / (args.tag + '.json')} and {out / (args.tag + '.md')}")
    if pool is not None:
        pool.close()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

r"""What running a stage as a Ray Job costs, beside running it in the driver process.

    .venv/bin/python benchmarks/jobs_overhead.py 2>&1 | tee benchmarks/results/jobs_overhead.log

Starts one Ray head on loopback (``ray start --head`` with the Jobs API, in its own temp dir)
and runs the four Ray stages on the embedded digits with a tiny model, each twice:

- *in-process*: a fresh Python process joins that cluster as its driver (``runtime.ray_address
  = <head>:<gcs port>``) and runs the stage (what a laptop run or a Ray Client run does);
- *job*: a fresh Python process submits the stage as a Ray Job to ``http://<head>:8265`` and
  follows it to its result (:mod:`tasks.jobs`).

Both start from the same inputs in fresh storage roots, so both do the stage's whole work; the
difference is the job mode's overhead (submission, the job's Python start and imports, log
streaming at the poll interval, the result read back from storage). The pairs run
interleaved (in-process, job, in-process, job, ...) and ``--repeat`` times, so the machine's
drift hits both sides alike. Goal (issue 13): ≤ 15 s per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("preprocess", "train", "evaluate", "generate")
TINY = {
    "model": {"base_channels": 8, "channel_mult": [1], "num_res_blocks": 1,
              "attention_resolutions": []},
    "train": {"steps": 40, "warmup_steps": 5, "checkpoint_every": 20, "log_every": 10,
              "sample_every": 0, "batch_size": 32},
    "evaluate": {"num_samples": 40, "nll_images": 8, "frontier": ["ddim:4"],
                 "reference_steps": 50},
    "generate": {"num_samples": 20},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmp: Path) -> tuple[str, str, dict]:
    """``ray start --head`` on loopback; returns (gcs address, jobs address, env)."""
    gcs, dash = _free_port(), _free_port()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token")
    subprocess.run(["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                    str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--num-cpus", "2", "--temp-dir", str(tmp / "ray"), "--include-dashboard",
                    "true", "--disable-usage-stats"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", env


def stop_head(tmp: Path) -> None:
    """Stop the processes of this head only (``ray stop`` would stop every Ray here)."""
    out = subprocess.run(["pgrep", "-f", str(tmp / "ray")], capture_output=True, text=True)
    for pid in out.stdout.split():
        subprocess.run(["kill", "-9", pid], check=False)


def one_stage(stage: str, root: str, address: str, model: str | None) -> float:
    """Run ``stage`` once in this process (the child of :func:`timed`); returns its seconds."""
    from flows.config import PipelineConfig
    from tasks.stages import execute

    cfg = PipelineConfig.model_validate(
        TINY | {"runtime": {"root": root, "ray_address": address}}).to_json_dict()
    if model:
        cfg["generate"]["model"] = model
    args = {"preprocess": {"data": cfg["data"], "runtime": cfg["runtime"]},
            "train": {"config": cfg},
            "evaluate": {"model_ref": model, "config": cfg, "dataset_version": None},
            "generate": {"config": cfg, "default_model": None}}[stage]
    t0 = time.perf_counter()
    out = execute(stage, args, echo=lambda m: None)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "result": out}, default=str))
    return seconds


def timed(stage: str, root: str, address: str, env: dict, model: str | None = None) -> dict:
    """One stage in a fresh process: its wall time (process start → exit) and result."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--one", stage, "--root", root, "--address",
                        address] + (["--model", model] if model else []),
                       env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{stage} at {address} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = [x for x in p.stdout.splitlines() if x.startswith("{")][-1]
    out = json.loads(line)
    return {"wall": wall, "stage_s": out["seconds"], "result": out["result"]}


def seed_root(src: Path, dst: Path, upto: str) -> None:
    """``dst`` holds what ``src`` produced before stage ``upto`` (dataset; + the run)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    keep = {"preprocess": [], "train": ["datasets"],
            "evaluate": ["datasets", "runs", "reference"],
            "generate": ["datasets", "runs", "reference"]}[upto]
    for name in keep:
        shutil.copytree(src / name, dst / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--one", choices=STAGES)
    ap.add_argument("--root")
    ap.add_argument("--address")
    ap.add_argument("--model")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/jobs_overhead.json"))
    a = ap.parse_args()
    if a.one:
        one_stage(a.one, a.root, a.address, a.model)
        return

    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    gcs, jobs, env = start_head(tmp)
    print(f"Ray head: {gcs}, Jobs API {jobs}", flush=True)
    rows: dict[str, dict[str, list[float]]] = {s: {"in-process": [], "job": []} for s in STAGES}
    try:
        # the inputs every stage starts from, made once in-process
        base = tmp / "base"
        timed("preprocess", str(base), gcs, env)
        trained = timed("train", str(base), gcs, env)
        ckpt = trained["result"]["checkpoint_uri"]
        timed("evaluate", str(base), gcs, env, ckpt)  # trains the reference network once
        for r in range(a.repeat):
            for stage in STAGES:
                for mode, address in (("in-process", gcs), ("job", jobs)):
                    root = tmp / f"{stage}-{mode}-{r}"
                    seed_root(base, root, stage)
                    # the evaluate/generate stages read the model from base's run
                    model = ckpt if stage in ("evaluate", "generate") else None
                    if stage == "evaluate":  # a stored result must not short-circuit it
                        shutil.rmtree(root / "evaluations", ignore_errors=True)
                    res = timed(stage, str(root), address, env, model)
                    rows[stage][mode].append(res["wall"])
                    print(f"  {stage:10s} {mode:10s} {res['wall']:6.1f} s", flush=True)
    finally:
        stop_head(tmp)

    lines = ["| stage | in-process (s) | job (s) | job − in-process (s) | ratio |",
             "|---|---|---|---|---|"]
    summary = {}
    for stage in STAGES:
        ip, jb = statistics.median(rows[stage]["in-process"]), statistics.median(rows[stage]["job"])
        summary[stage] = {"in_process_s": ip, "job_s": jb, "overhead_s": jb - ip,
                          "runs": rows[stage]}
        lines.append(f"| {stage} | {ip:.1f} | {jb:.1f} | {jb - ip:+.1f} | {jb / ip:.2f} |")
    print("\n".join(lines))
    Path(a.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

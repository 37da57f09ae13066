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

``--default-run`` compares the whole default run instead (``diffusion-pipeline run`` on the
embedded digits, the README's main job, default config), twice in fresh roots and fresh Prefect
homes: the *local default* (no ``RAY_ADDRESS``: the run starts its own Ray in-process, as
``make demo`` does) and *job mode* (``RAY_ADDRESS=http://<head>:8265``: every Ray stage a Ray
Job on the already running head, whose start is not counted: a cluster exists before its jobs).
Written to ``jobs_default_run.{json,md}``.
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
                    "--num-cpus", "2", "--temp-dir", str(tmp / "ray"),
                    # the agent's default port (52365) may be held by another Ray on the machine:
                    # the Jobs API then answers "No available agent to submit job"
                    "--dashboard-agent-listen-port", str(_free_port()), "--include-dashboard",
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


def default_runs(tmp: Path, jobs: str, env: dict, repeat: int) -> dict:
    """The default run, local default and job mode interleaved ``repeat`` times."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pipeline_run import run_once

    runs: dict[str, list[dict]] = {"local default": [], "job mode": []}
    for r in range(repeat):
        for mode in runs:
            d = tmp / f"default-{mode.replace(' ', '-')}-{r}"
            d.mkdir()
            run_env = {**env, "PREFECT_HOME": str(d / "prefect-home")}
            for k in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
                run_env.pop(k, None)
            if mode == "job mode":
                run_env["RAY_ADDRESS"] = jobs
            out = run_once(d / "root", run_env, d / "run.log", d / "summary.json")
            runs[mode].append(out)
            print(f"  {mode:14s} {out['wall_s']:6.1f} s  "
                  + "  ".join(f"{k} {v['seconds']:.1f}" for k, v in out["stages"].items()),
                  flush=True)
    return runs


def default_markdown(runs: dict) -> str:
    local, job = runs["local default"], runs["job mode"]
    stages = list(local[0]["stages"])
    med = statistics.median
    lines = ["| | local default (s) | job mode (s) | job − local (s) |", "|---|---:|---:|---:|"]
    for name in stages:
        a = med(r["stages"][name]["seconds"] for r in local)
        b = med(r["stages"].get(name, {"seconds": 0.0})["seconds"] for r in job)
        lines.append(f"| {name} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    a, b = med(r["wall_s"] for r in local), med(r["wall_s"] for r in job)
    lines.append(f"| **process wall time** | **{a:.1f}** | **{b:.1f}** | **{b - a:+.1f}** "
                 f"(×{b / a:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--one", choices=STAGES)
    ap.add_argument("--root")
    ap.add_argument("--address")
    ap.add_argument("--model")
    ap.add_argument("--default-run", action="store_true",
                    help="compare the whole default run, local default vs job mode")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/jobs_overhead.json"))
    a = ap.parse_args()
    if a.one:
        one_stage(a.one, a.root, a.address, a.model)
        return

    tmp = Path(tempfile.mkdtemp(prefix="jobs-bench-"))
    gcs, jobs, env = start_head(tmp)
    print(f"Ray head: {gcs}, Jobs API {jobs}", flush=True)
    if a.default_run:
        try:
            runs = default_runs(tmp, jobs, env, a.repeat)
        finally:
            stop_head(tmp)
        out = Path(a.out).with_name("jobs_default_run.json")
        out.write_text(json.dumps(runs, indent=2))
        print(default_markdown(runs))
        out.with_suffix(".md").write_text(default_markdown(runs))
        return
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

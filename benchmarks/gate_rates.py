r"""How often the promotion gate promotes a challenger that is no better, and one that is.

    .venv/bin/python benchmarks/gate_rates.py 2>&1 | tee benchmarks/results/gate_rates.log
    # options: --seeds 4 --long 1 --short 1 --factor 4 --max-samples 4000 --sizes 500,1000,2000
    #          --work /tmp/gate-rates (models are kept there and reused by a rerun)

With the pipeline's own stages (``tasks.train.run_training`` on a local Ray, then
``tasks.evaluate.evaluate``), on the embedded digits:

1. trains ``--seeds`` models of the default recipe that differ only in ``train.seed`` (same data,
   config, steps), ``--long`` models trained ``--factor`` × the default steps and ``--short``
   models trained 1/``--factor`` of them;
2. evaluates each once at ``--max-samples`` samples of the default sampler setting under one
   eval key (same noise streams, labels and reference set for every model), storing the paired
   inputs the gate reads. Sample i of an N-sample evaluation is sample i of the large one (noise
   stream (seed, i), labels cycling in a fixed order), so each disjoint block of N samples is
   exactly a paired N-sample evaluation of its own;
3. for every N in ``--sizes`` and every block, judges ordered (champion, challenger) pairs with
   the gate's own rule (``tasks.registry.gate.paired_difference`` and ``_verdict``, the
   default policy: margin 0, 95 % interval, 2000 draws):

   - *false promotions*: a default-recipe challenger with another seed promoted over a
     default-recipe champion (goal: under 5 %);
   - *true promotions*: a default challenger over a 1/``--factor``-trained champion, and a
     ``--factor``×-trained challenger over a default champion (goal: over 95 %, where the
     challenger is in fact better: the FD of all samples says whether it is);
   - the cost: the seconds an N-sample evaluation of one model takes (sampling at the measured
     images/s), ×2 for a gate decision that evaluates champion and challenger, and the gate's
     own bootstrap.

Models and verdicts are kept in ``--work`` (``models.json``, ``<tag>.verdicts.json``): a rerun
with more models trains, evaluates and judges only what is new.

It also reports the quality of the default recipe as issue 15 measures it: per model, the mean
± sd of FD over disjoint 500-sample draws and the FD of all samples, against the held-out split
in the project's own feature space (the reference network of ``tasks.evaluate``).

Writes ``results/gate_rates.json`` and ``results/gate_rates.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result

SETTING = "dpmpp_2m:10"


def recipe_sha(cfg) -> str:
    """What makes two trainings the same recipe (12 hex digits): the pipeline's own run
    identity (``tasks.train.config.run_identity`` less ``EXECUTION_KEYS``, as a default run
    name is derived) less the seed and the step count."""
    import hashlib

    from tasks.train.config import EXECUTION_KEYS, run_identity

    body = run_identity(cfg.model, cfg.diffusion, cfg.train)
    body["train"] = {k: v for k, v in body["train"].items()
                     if k not in EXECUTION_KEYS | {"seed", "steps"}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def data_sha(cfg) -> str:
    """What makes two trainings' data the same (12 hex digits): the source and the settings that
    fix the dataset version's bytes, the train/held-out split among them (``data.val_fraction``).
    A model is judged against its own held-out split, so one trained on other data is another
    model even under the same recipe."""
    import hashlib

    body = {"source": cfg.data.source, **cfg.data.preprocessing()}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:12]


def train_models(cfg, work: Path, specs: list[tuple[str, int, int]]) -> dict[str, dict]:
    """``{name: {"checkpoint_uri", "seconds", "loss"}}`` for (name, seed, steps) specs; a run
    already finished in ``work`` is found by its name and not trained again. A name recorded
    with another recipe or data is an error (a default changed since: use another ``--prefix``)."""
    from tasks.train import TrainConfig, run_training

    record = work / "models.json"
    known = json.loads(record.read_text()) if record.exists() else {}
    sha, data = recipe_sha(cfg), data_sha(cfg)
    out = {}
    for name, seed, steps in specs:
        if name in known and (known[name].get("recipe"), known[name].get("data")) != (sha, data):
            raise SystemExit(f"{record}: {name} was trained with recipe "
                             f"{known[name].get('recipe')} on data {known[name].get('data')}, "
                             f"not this recipe ({sha}) and data ({data}); give these models "
                             "another name (--prefix) or use another --work")
        if name in known and known[name]["steps"] == steps and Path(
                known[name]["checkpoint_uri"]).exists():
            out[name] = known[name]
            log(f"{name}: trained before, {known[name]['checkpoint_uri']}")
            continue
        train = TrainConfig(**(cfg.train.model_dump() | {
            "seed": seed, "steps": steps, "run_name": f"gate-{name}-{sha}",
            "checkpoint_every": max(steps, 500)}))
        t0 = time.perf_counter()
        res = run_training(cfg.data, cfg.model, cfg.diffusion, train, cfg.runtime,
                           pipeline=cfg.to_json_dict(), echo=lambda s: None)
        seconds = time.perf_counter() - t0
        out[name] = {"checkpoint_uri": res.checkpoint_uri, "seed": seed, "steps": steps,
                     "recipe": sha, "data": data, "seconds": round(seconds, 1),
                     "loss": res.metrics.get("loss")}
        log(f"trained {name} (seed {seed}, {steps} steps) in {seconds:.0f} s: "
            f"{res.checkpoint_uri}")
        record.write_text(json.dumps(known | out, indent=1))
    return out


def evaluate_models(cfg, models: dict, max_samples: int) -> tuple[dict, dict]:
    """Each model's paired inputs (sample features at SETTING, reference features) and its
    evaluation's timing, under one eval key."""
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.result import load_paired
    from tasks.evaluate.run import evaluate

    ev_cfg = EvalConfig(**(cfg.evaluate.model_dump() | {
        "num_samples": max_samples, "frontier": [SETTING], "nll_images": 0,
        "bootstrap_draws": 0}))
    arrays, timing = {}, {}
    for name, m in models.items():
        t0 = time.perf_counter()
        res = evaluate(m["checkpoint_uri"], cfg.data, ev_cfg, cfg.runtime, echo=lambda s: None)
        paired = load_paired(res)
        arrays[name] = paired["arrays"]
        timing[name] = {"seconds": round(time.perf_counter() - t0, 1),
                        "images_per_s": res["frontier"][0]["images_per_s"],
                        "fd_all": res["metrics"]["fd"], "eval_key": res["eval_key"],
                        "reused": res.get("reused", False)}
        log(f"evaluated {name}: FD of all {max_samples} {res['metrics']['fd']:.3f} "
            f"({timing[name]['images_per_s']:.0f} img/s)")
    return arrays, timing


def quality(arrays: dict, block: int) -> dict:
    """Per model: FD over disjoint ``block``-sample draws (mean, sd, count) and of all."""
    import torch

    from benchmarks.quality import draw_fd
    from diffusion.metrics import feature_statistics

    out = {}
    for name, a in arrays.items():
        ref = feature_statistics(torch.from_numpy(a["reference"]).double())
        d = draw_fd(torch.from_numpy(a[f"samples/{SETTING}"]).double(), ref, block)
        out[name] = {"mean": d["block_mean"], "draws": d["blocks"], "all": d["all"],
                     "sd": float("nan") if d["block_sd"] is None else d["block_sd"]}
    return out


_ARRAYS: dict = {}


def _init_worker(arrays: dict) -> None:
    import torch

    torch.set_num_threads(1)
    _ARRAYS.update(arrays)


def _block(name: str, sl: slice) -> dict:
    a = _ARRAYS[name]
    block = {f"samples/{SETTING}": a[f"samples/{SETTING}"][sl], "reference": a["reference"]}
    if "labels" in a:  # the block's own labels: the gate resamples within them
        block |= {"labels": a["labels"][sl], "reference_labels": a["reference_labels"]}
    return {"setting": SETTING, "arrays": block}


def _judge(task: tuple) -> dict:
    """One gate decision: ``chall`` against ``champ`` on samples ``[b·n, (b+1)·n)``."""
    import types

    import torch

    from diffusion.metrics import feature_statistics, frechet_distance
    from tasks.registry.config import RegistryConfig
    from tasks.registry.gate import _verdict, paired_difference

    n, b, champ, chall, kind = task  # kind: pair_kind
    cfg = RegistryConfig()
    sl = slice(b * n, (b + 1) * n)
    cb = _block(champ, sl)
    champ_fd = frechet_distance(
        *feature_statistics(torch.from_numpy(cb["arrays"][f"samples/{SETTING}"]).double()),
        *feature_statistics(torch.from_numpy(cb["arrays"]["reference"]).double()))
    t0 = time.perf_counter()
    d = paired_difference(_block(chall, sl), cb, "fd", cfg)
    ok, _ = _verdict("fd", d, champ_fd, types.SimpleNamespace(version=0), cfg)
    return {"n": n, "block": b, "champion": champ, "challenger": chall, "kind": kind,
            "promoted": ok, "difference": d.value, "low": d.low, "high": d.high,
            "gate_seconds": time.perf_counter() - t0}


def judge_all(arrays: dict, models: dict, sizes: list[int], max_samples: int,
              processes: int, record: Path) -> list[dict]:
    """Every ordered (default champion, other model) pair's verdict on every disjoint block of
    every size, the gate's own rule (``tasks.registry.gate``), in ``processes`` processes."""
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(n, b, champ, chall, pair_kind(models, champ, chall))
             for n in sizes for b in range(max_samples // n)
             for champ in models for chall in models
             if chall != champ and pair_kind(models, champ, chall)]
    # a rerun with another model judges only the new pairs
    known = {tuple(r["task"]): r for r in (json.loads(record.read_text())
                                           if record.exists() else [])}
    rows = [known[t] for t in tasks if t in known]
    todo = [t for t in tasks if t not in known]
    with ProcessPoolExecutor(processes, initializer=_init_worker, initargs=(arrays,)) as pool:
        for i, row in enumerate(pool.map(_judge, todo, chunksize=4)):
            rows.append(row | {"task": list(todo[i])})
            if (i + 1) % 50 == 0 or i + 1 == len(todo):
                log(f"judged {i + 1}/{len(todo)} pairs × blocks")
                record.write_text(json.dumps(rows))
    return rows


def pair_kind(models: dict, champ: str, chall: str) -> str | None:
    """What a (champion, challenger) pair measures: "same" (the default recipe, another seed:
    should not be promoted), "better" (a challenger trained longer than a default champion, or
    a default challenger against a champion trained shorter), or None (not judged)."""
    a, b = models[champ]["kind"], models[chall]["kind"]
    if a == b == "default":
        return "same"
    if (a, b) in (("default", "long"), ("short", "default")):
        return "better"
    return None


def wilson_upper(k: int, n: int, z: float = 1.645) -> float:
    """The one-sided 95 % Wilson upper bound of a rate of k in n (nan for n = 0); the lower
    bound of k in n is 1 − wilson_upper(n − k, n)."""
    if n == 0:
        return float("nan")
    p = k / n
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (
        1 + z * z / n)


def rate(rows: list[dict]) -> tuple[int, int, float, float]:
    """(promoted, total, rate, upper 95 % one-sided bound) of a set of verdicts (Wilson)."""
    k, n = sum(r["promoted"] for r in rows), len(rows)
    return k, n, (k / n if n else float("nan")), wilson_upper(k, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="default-recipe models (seeds)")
    ap.add_argument("--long", type=int, default=1, help="models trained --factor× longer")
    ap.add_argument("--short", type=int, default=1,
                    help="models trained 1/--factor of the default steps (champions a default "
                         "challenger should beat)")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--max-samples", type=int, default=4000)
    ap.add_argument("--sizes", default="500,1000,2000")
    ap.add_argument("--processes", type=int, default=os.cpu_count(),
                    help="processes judging pairs (each one torch thread)")
    ap.add_argument("--work", default="/tmp/gate-rates")
    ap.add_argument("--prefix", default="", help="model names' prefix in --work/models.json "
                    "(models of another recipe need their own)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config overrides for every model (the recipe under test)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="gate_rates", help="result file name")
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray

    from flows.config import load_config
    from tasks.preprocess import preprocess
    from tasks.runtime import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(sets=args.set, root=str(work / "root"))
    sizes = [int(s) for s in args.sizes.split(",")]
    t_start = time.perf_counter()
    ensure_ray(cfg.runtime)
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
    steps = cfg.train.steps
    p = args.prefix
    specs = ([(f"{p}seed{s}", s, steps) for s in range(args.seeds)]
             + [(f"{p}x{args.factor}-seed{100 + s}", 100 + s, steps * args.factor)
                for s in range(args.long)]
             + [(f"{p}div{args.factor}-seed{200 + s}", 200 + s, steps // args.factor)
                for s in range(args.short)])
    models = train_models(cfg, work, specs)
    for m in models.values():
        m["kind"] = ("default" if m["steps"] == steps else
                     "long" if m["steps"] > steps else "short")
    ray.shutdown()
    arrays, timing = evaluate_models(cfg, models, args.max_samples)
    qual = quality(arrays, 500)
    rows = judge_all(arrays, models, sizes, args.max_samples, args.processes,
                     work / f"{args.tag}.verdicts.json")

    summary = []
    ips = statistics.median(t["images_per_s"] for t in timing.values())
    for n in sizes:
        at = [r for r in rows if r["n"] == n]
        same = rate([r for r in at if r["kind"] == "same"])
        better = rate([r for r in at if r["kind"] == "better"])
        longer = rate([r for r in at if r["kind"] == "better"
                       and models[r["challenger"]]["kind"] == "long"])
        over_short = rate([r for r in at if r["kind"] == "better"
                           and models[r["champion"]]["kind"] == "short"])
        gate_s = statistics.median(r["gate_seconds"] for r in at)
        summary.append({"n": n, "false": same, "true": better, "true_long": longer,
                        "true_over_short": over_short,
                        "eval_seconds_per_model": n / ips, "gate_seconds": gate_s,
                        "median_width": statistics.median(r["high"] - r["low"] for r in at),
                        "median_better_difference": statistics.median(
                            r["difference"] for r in at if r["kind"] == "better")})
    result = {"command": "benchmarks/gate_rates.py " + " ".join(sys.argv[1:]),
              "guidance": cfg.evaluate.guidance_scale,
              "git": git_revision(), "setting": SETTING, "models": models, "timing": timing,
              "quality_500": qual, "summary": summary, "verdicts": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_result(args.out, args.tag, result, markdown(result, args))


def markdown(result: dict, args) -> str:
    lines = [
        "# The promotion gate's false and true promotion rates on the digits",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s in all.",
        f"Setting {SETTING}, guidance {result.get('guidance')}, one eval key for every model; "
        "the gate's "
        "default policy (margin 0, 95 % paired interval, 2000 draws). Rates count ordered "
        "pairs × disjoint sample blocks; *bound*: the one-sided 95 % Wilson upper (false) or "
        "lower (true) bound.",
        "",
        "| samples per model | false promotions (default recipe, other seed) | bound | "
        f"default over a 1/{args.factor}-trained champion | bound | "
        f"{args.factor}×-trained over a default champion | "
        "bound | median interval width | eval s per model | gate s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def lower_bound(k: int, n: int) -> float:
        return 1 - wilson_upper(n - k, n)

    for s in result["summary"]:
        kf, nf, pf, hf = s["false"]
        ks, ns, ps, _ = s["true_over_short"]
        kl, nl, pl, _ = s["true_long"]
        lines.append(f"| {s['n']} | {kf}/{nf} = {pf:.1%} | ≤ {hf:.1%} | {ks}/{ns} = {ps:.1%} "
                     f"| ≥ {lower_bound(ks, ns):.1%} | {kl}/{nl} = {pl:.1%} "
                     f"| ≥ {lower_bound(kl, nl):.1%} | {s['median_width']:.2f} | "
                     f"{s['eval_seconds_per_model']:.1f} | {s['gate_seconds']:.2f} |")
    lines += ["", "Models (the pipeline's training, `tasks.train.run_training`, local Ray):", "",
              "| model | seed | steps | train s | FD over 500-sample draws (mean ± sd, draws) | "
              "FD of all |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        q = result["quality_500"][name]
        lines.append(f"| {name} | {m['seed']} | {m['steps']} | {m['seconds']:.0f} | "
                     f"{q['mean']:.2f} ± {q['sd']:.2f} ({q['draws']}) | {q['all']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

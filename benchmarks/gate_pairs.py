r"""The promotion gate's error rates counted in independent model pairs (issue 26 item 5).

    .venv/bin/python benchmarks/gate_pairs.py --pairs 6 --short 3 \
        2>&1 | tee benchmarks/results/gate_pairs.log
    # options: --guidance 1.25 --samples 1000 --factor 4 --work /tmp/gate-pairs (models kept
    #          there and reused by a rerun: add pairs by raising --pairs)

``benchmarks/gate_rates.py`` judges every ordered pair of a few models on many disjoint sample
blocks: its verdicts share models and mirror each other, so its counts overstate the evidence
(the audit put 168 such decisions at about 10 independent ones). Here every decision of a kind
uses models no other decision of that kind uses, one ordering, one block of ``--samples`` (the
gate's default evaluation), so the count of pairs *is* the effective sample size of the rate:

- **same recipe** (``--pairs`` pairs, 2 × ``--pairs`` default-recipe models, seeds 1000, 1001,
  …): challenger seed 2k+1 against champion seed 2k. The recipe is the same, so a promotion is a
  false one (goal: under 5 %).
- **better** (``--short`` pairs): the default model of seed 2k (a challenger in no other pair of
  this kind) against a champion of its own trained 1/``--factor`` of the steps (seeds 2000 + k);
  a promotion is a true one (goal: over 90 %).
- **diversity** (one per same-recipe pair's champion): the same model sampled with guidance
  ``--guidance`` (less diverse, sharper classes) as the challenger against itself unguided. The
  population difference is not known, so the table reports the verdicts and the mean of the
  pairs' bias-corrected differences with a t-interval over the independent models: where that
  interval lies above 0 (the guided samples farther from the data), every promotion is a false
  one, the case the old, biased interval got wrong most often.

Every pair is judged by the gate's own rule (``tasks.registry.gate.paired_difference`` and
``_verdict``, the default policy: margin 0, 95 % interval, its default draws), on the selection
(val) split. All pairs share that one split as the reference: each interval accounts for the
reference's noise, but the decisions' errors are correlated through it (the digits hold one
such split; independent references would need another dataset or split salt per pair).

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.gate_rates import SETTING, train_models, wilson_upper
from benchmarks.recipes import t_interval


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The two-sided 95 % Wilson interval of k in n."""
    from diffusion.coverage import wilson as w

    return w(k, n, z)


def evaluate_at(cfg, models: dict, samples: int, guidance: float) -> dict:
    """Each model's stored paired inputs at SETTING, ``samples`` samples, ``guidance``."""
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.result import load_paired
    from tasks.evaluate.run import evaluate

    ev = EvalConfig(**(cfg.evaluate.model_dump() | {
        "num_samples": samples, "frontier": [SETTING], "nll_images": 0,
        "bootstrap_draws": 0, "guidance_scale": guidance}))
    out = {}
    for name, m in models.items():
        res = evaluate(m["checkpoint_uri"], cfg.data, ev, cfg.runtime, echo=lambda s: None)
        out[name] = {"setting": SETTING, "arrays": load_paired(res)["arrays"],
                     "fd": res["metrics"]["fd"]}
        log(f"evaluated {name} at guidance {guidance}: FD {res['metrics']['fd']:.3f}")
    return out


def judge(challenger: dict, champion: dict) -> dict:
    """The gate's verdict on ``challenger`` over ``champion`` (stored paired inputs)."""
    import types

    from tasks.registry.config import RegistryConfig
    from tasks.registry.gate import _verdict, paired_difference

    cfg = RegistryConfig()
    t0 = time.perf_counter()
    d = paired_difference(challenger, champion, "fd", cfg)
    ok, why = _verdict("fd", d, champion["fd"], types.SimpleNamespace(version=0), cfg)
    return {"promoted": bool(ok), "difference": d.value, "corrected": d.center, "low": d.low,
            "high": d.high, "seconds": round(time.perf_counter() - t0, 2), "why": why}


def summarize(rows: list[dict]) -> dict:
    """Promotions k of n independent pairs with the Wilson interval, and the mean corrected
    difference with its t-interval over the pairs."""
    k, n = sum(r["promoted"] for r in rows), len(rows)
    lo, hi = wilson(k, n) if n else (math.nan, math.nan)
    mean, mlo, mhi = (t_interval([r["corrected"] for r in rows]) if rows
                      else (math.nan, math.nan, math.nan))
    return {"promoted": k, "pairs": n, "rate": k / n if n else math.nan, "wilson": [lo, hi],
            "upper_95_one_sided": wilson_upper(k, n), "mean_corrected": mean,
            "mean_corrected_ci": [mlo, mhi],
            "median_width": statistics.median(r["high"] - r["low"] for r in rows) if rows
            else math.nan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=6, help="same-recipe pairs (2 models each)")
    ap.add_argument("--short", type=int, default=3, help="better pairs (1 new model each)")
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=1.25,
                    help="the diversity pair's challenger guidance (the champion: 1.0)")
    ap.add_argument("--samples", type=int, default=None,
                    help="samples per model (default: evaluate.num_samples, the gate's)")
    ap.add_argument("--work", default="/tmp/gate-pairs")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="gate_pairs")
    args = ap.parse_args()
    if args.short > args.pairs:
        raise SystemExit("--short must not exceed --pairs (each better pair's challenger is a "
                         "same-recipe pair's champion)")

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray

    from flows.config import load_config
    from tasks.preprocess import preprocess
    from tasks.runtime import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_config(sets=args.set, root=str(work / "root"))
    samples = args.samples or cfg.evaluate.num_samples
    t_start = time.perf_counter()
    ensure_ray(cfg.runtime)
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
    steps = cfg.train.steps
    specs = [(f"seed{1000 + i}", 1000 + i, steps) for i in range(2 * args.pairs)]
    specs += [(f"div{args.factor}-seed{2000 + k}", 2000 + k, steps // args.factor)
              for k in range(args.short)]
    models = train_models(cfg, work, specs)
    ray.shutdown()
    plain = evaluate_at(cfg, models, samples, 1.0)
    champions = {f"seed{1000 + 2 * k}": models[f"seed{1000 + 2 * k}"] for k in range(args.pairs)}
    guided = evaluate_at(cfg, champions, samples, args.guidance)

    rows = []
    for k in range(args.pairs):
        champ, chall = f"seed{1000 + 2 * k}", f"seed{1000 + 2 * k + 1}"
        rows.append({"kind": "same", "champion": champ, "challenger": chall}
                    | judge(plain[chall], plain[champ]))
        rows.append({"kind": "diversity", "champion": champ,
                     "challenger": f"{champ}@guidance{args.guidance}"}
                    | judge(guided[champ], plain[champ]))
    for k in range(args.short):
        champ, chall = f"div{args.factor}-seed{2000 + k}", f"seed{1000 + 2 * k}"
        rows.append({"kind": "better", "champion": champ, "challenger": chall}
                    | judge(plain[chall], plain[champ]))
    for r in rows:
        log(f"{r['kind']}: {r['challenger']} over {r['champion']}: "
            f"{'promoted' if r['promoted'] else 'kept'} (corrected {r['corrected']:+.3f} "
            f"[{r['low']:+.3f}, {r['high']:+.3f}])")
    summary = {kind: summarize([r for r in rows if r["kind"] == kind])
               for kind in ("same", "better", "diversity")}
    result = {"command": "benchmarks/gate_pairs.py " + " ".join(sys.argv[1:]),
              "git": git_revision(), "setting": SETTING, "samples": samples,
              "guidance": args.guidance, "models": models, "summary": summary,
              "fd": {n: e["fd"] for n, e in plain.items()}, "verdicts": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_result(args.out, args.tag, result, markdown(result, args))


def markdown(result: dict, args) -> str:
    s = result["summary"]

    def row(kind: str, what: str, goal: str) -> str:
        x = s[kind]
        lo, hi = x["wilson"]
        m, (mlo, mhi) = x["mean_corrected"], x["mean_corrected_ci"]
        return (f"| {what} | {x['promoted']}/{x['pairs']} = {x['rate']:.0%} | "
                f"[{lo:.0%}, {hi:.0%}] | {x['pairs']} | {goal} | {m:+.3f} [{mlo:+.3f}, "
                f"{mhi:+.3f}] | {x['median_width']:.2f} |")

    lines = [
        "# The promotion gate's rates in independent model pairs (digits)",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s in all. Setting {result['setting']}, "
        f"{result['samples']} samples per model, the val split as the reference, the gate's "
        "default policy. Every pair of a kind uses models no other pair of that kind uses, "
        "one ordering, one block: *effective n* is the number of pairs. Wilson 95 % "
        "intervals; the mean bias-corrected FD difference (challenger − champion) has a "
        "t-interval over the pairs.",
        "",
        "| pairs | promoted | 95 % interval | effective n | goal | mean corrected difference "
        "| median interval width |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("same", "same recipe, other seed (false)", "< 5 %"),
        row("better", f"default over 1/{args.factor}-trained (true)", "> 90 %"),
        row("diversity", f"same model, guidance {result['guidance']} over 1.0", "see text"),
        "",
        "| kind | challenger | champion | verdict | corrected difference [interval] |",
        "|---|---|---|---|---:|",
    ]
    for r in result["verdicts"]:
        lines.append(f"| {r['kind']} | {r['challenger']} | {r['champion']} | "
                     f"{'promoted' if r['promoted'] else 'kept'} | {r['corrected']:+.3f} "
                     f"[{r['low']:+.3f}, {r['high']:+.3f}] |")
    lines += ["", "| model | seed | steps | train s | FD (all samples, val) |",
              "|---|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        lines.append(f"| {name} | {m['seed']} | {m['steps']} | {m['seconds']:.0f} | "
                     f"{result['fd'][name]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

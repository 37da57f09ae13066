r"""What the locked test split costs (issue 26, item 4): the model's FD with a smaller training
set, and the gate's paired interval with a smaller selection set.

    .venv/bin/python benchmarks/split_cost.py --seeds 0,1 --work /tmp/split-cost \
        2>&1 | tee benchmarks/results/split_cost.log

With the pipeline's own stages on the embedded digits (``tasks.preprocess``,
``tasks.train.run_training`` on a local Ray, ``tasks.evaluate.evaluate``):

1. preprocesses two dataset versions: the *old* split (``data.test_fraction=0``: train is the
   whole top 1 − val_fraction of the key hash) and the *new* default one (``data.test_fraction``
   taken from the top of the hash, out of the old train rows; val unchanged);
2. trains the default recipe on each, one model per ``--seeds`` (same seed, same steps: the
   two differ only in their training rows);
3. evaluates every model on the new version under one eval key per split (``--samples``
   samples at the gate's setting, noise stream (seed, i), the new version's reference network)
   against
   - ``val``: images neither model trained on, so the fair comparison of the two train sets,
   - ``test``: the locked split, which the old-split models *trained on* (it was part of their
     train rows): their FD there is flattered; reported for the new models, and the
     difference only as a bound;
4. per seed, FD(new) − FD(old) with the gate's own paired interval
   (``tasks.registry.gate.paired_difference``, the default policy), and over the seeds the mean
   difference with a t-interval (the training seed's noise; wide with 2 seeds);
5. the gate's paired interval for a pair of default-recipe models (two seeds of the new split;
   with one seed, the new- and old-split models) against
   reference sets of ``--reference-sizes`` images drawn from the val split (the first is the
   whole val split): how much wider the gate's interval gets if the selection split shrinks.

Writes ``results/<tag>.json`` and ``results/<tag>.md``; models are kept in ``--work``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.gate_rates import SETTING, train_models
from benchmarks.recipes import t_interval


def evaluate_on(cfg, models: dict, split: str, version: str, samples: int) -> dict:
    """``{name: (evaluation, paired inputs)}`` of each model on ``split`` of ``version``."""
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.result import load_paired
    from tasks.evaluate.run import evaluate

    ev_cfg = EvalConfig(**(cfg.evaluate.model_dump() | {
        "num_samples": samples, "frontier": [SETTING], "nll_images": 0, "split": split}))
    out = {}
    for name, m in models.items():
        res = evaluate(m["checkpoint_uri"], cfg.data, ev_cfg, cfg.runtime,
                       dataset_version=version, echo=lambda s: None)
        out[name] = (res, load_paired(res))
        mt = res["metrics"]
        log(f"{name} on {split} ({res['dataset']['val_images']} images): FD {mt['fd']:.3f} "
            f"[{mt.get('fd_low', float('nan')):.3f}, {mt.get('fd_high', float('nan')):.3f}]")
    return out


def difference(a: dict, b: dict, reference_rows=None) -> dict:
    """The gate's paired interval of FD(a) − FD(b); ``reference_rows``: judge against only
    these rows of the reference (and of its labels)."""
    from tasks.registry.config import RegistryConfig
    from tasks.registry.gate import paired_difference

    if reference_rows is not None:
        a, b = (p | {"arrays": {k: (v[reference_rows] if k.startswith("reference") else v)
                                for k, v in p["arrays"].items()}} for p in (a, b))
    d = paired_difference(a, b, "fd", RegistryConfig())
    return {"difference": d.value, "low": d.low, "high": d.high, "width": d.high - d.low}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--samples", type=int, default=1000, help="samples per evaluation")
    ap.add_argument("--reference-sizes", default="324,237,165",
                    help="reference images for the gate-width measure (digits: val at 0.2, "
                         "0.15, 0.1)")
    ap.add_argument("--work", default="/tmp/split-cost")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="split_cost")
    ap.add_argument("--train-only", choices=["old", "new"], default=None,
                    help="train only this split's models and stop (to train the two splits in "
                         "two processes; copy the models.json entries into one --work after)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import numpy as np
    import ray

    from flows.config import load_config
    from tasks.preprocess import preprocess
    from tasks.runtime import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = {"new": load_config(sets=args.set, root=str(work / "root"))}
    cfg["old"] = load_config(sets=[*args.set, "data.test_fraction=0"], root=str(work / "root"))
    t_start = time.perf_counter()
    ensure_ray(cfg["new"].runtime)
    version, rows = {}, {}
    for which, c in cfg.items():
        res = preprocess(c.data, c.runtime, echo=lambda s: None)
        version[which] = res.ref.version
        rows[which] = {s: res.manifest["splits"][s]["rows"] for s in ("train", "val", "test")}
        log(f"{which} split: dataset version {res.ref.version}, {rows[which]}")
    steps = cfg["new"].train.steps
    models = {}
    for s in seeds:  # seed by seed: a cut-short run still has whole pairs
        for which in ("old", "new"):
            if args.train_only in (None, which):
                models |= train_models(cfg[which], work, [(f"{which}-seed{s}", s, steps)])
    ray.shutdown()
    if args.train_only:
        return

    evals = {split: evaluate_on(cfg["new"], models, split, version["new"], args.samples)
             for split in ("val", "test")}
    per_seed = {split: {s: difference(evals[split][f"new-seed{s}"][1],
                                      evals[split][f"old-seed{s}"][1]) for s in seeds}
                for split in ("val", "test")}
    over_seeds = {}
    for split, by_seed in per_seed.items():
        mean, low, high = t_interval([d["difference"] for d in by_seed.values()])
        over_seeds[split] = {"mean": mean, "low": low, "high": high, "seeds": len(by_seed)}
    widths = {}
    # a pair of default-recipe models: two seeds of the new split, or with one seed the two
    # splits' models (both held the val images out)
    pair = ([f"new-seed{s}" for s in seeds[:2]] if len(seeds) >= 2
            else [f"new-seed{seeds[0]}", f"old-seed{seeds[0]}"])
    a, b = (evals["val"][name][1] for name in pair)
    n_ref = len(a["arrays"]["reference"])
    rng = np.random.default_rng(0)
    for size in (int(s) for s in args.reference_sizes.split(",")):
        rows_ = None if size >= n_ref else np.sort(rng.choice(n_ref, size, replace=False))
        widths[min(size, n_ref)] = difference(a, b, rows_)
    result = {
        "rows": rows, "versions": version, "seeds": seeds, "steps": steps,
        "samples": args.samples, "setting": SETTING,
        "models": {k: {kk: v[kk] for kk in ("seed", "steps", "seconds", "loss")}
                   for k, v in models.items()},
        "fd": {split: {name: {k: ev[0]["metrics"].get(k) for k in ("fd", "fd_low", "fd_high")}
                       | {"eval_key": ev[0]["eval_key"], "images": ev[0]["dataset"]["val_images"]}
                       for name, ev in by.items()} for split, by in evals.items()},
        "new_minus_old": per_seed, "new_minus_old_over_seeds": over_seeds,
        "gate_width_pair": pair, "gate_width_by_reference_size": widths,
        "git": git_revision(), "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_result(args.out, args.tag, result, markdown(result))


def markdown(r: dict) -> str:
    def iv(v, lo, hi):
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"

    o, n = r["rows"]["old"], r["rows"]["new"]
    lines = [
        "# What the locked test split costs (benchmarks/split_cost.py)", "",
        f"Digits, default recipe ({r['steps']} steps), {r['samples']} samples at {r['setting']}; "
        "FD in the reference network's features with the evaluation's 95 % bootstrap "
        "interval; differences with the gate's paired interval (default policy).", "",
        f"- old split (data.test_fraction=0): {o['train']} train, {o['val']} val",
        f"- new split (default): {n['train']} train, {n['val']} val, {n['test']} test", "",
        "| model | FD on val (held out by both) | FD on test (old models trained on it) |",
        "|---|---:|---:|",
    ]
    for name in r["fd"]["val"]:
        v, t = r["fd"]["val"][name], r["fd"]["test"][name]
        lines.append(f"| {name} | {iv(v['fd'], v['fd_low'], v['fd_high'])} | "
                     f"{iv(t['fd'], t['fd_low'], t['fd_high'])} |")
    lines += ["", "FD(new split) − FD(old split), same training seed:", "",
              "| seed | on val | on test (biased for old) |", "|---|---:|---:|"]
    for s in r["seeds"]:
        v, t = r["new_minus_old"]["val"][s], r["new_minus_old"]["test"][s]
        lines.append(f"| {s} | {iv(v['difference'], v['low'], v['high'])} | "
                     f"{iv(t['difference'], t['low'], t['high'])} |")
    ov = r["new_minus_old_over_seeds"]
    lines += ["", f"Over {ov['val']['seeds']} seeds (t-interval): on val "
              f"{iv(ov['val']['mean'], ov['val']['low'], ov['val']['high'])}, on test "
              f"{iv(ov['test']['mean'], ov['test']['low'], ov['test']['high'])}."]
    if r["gate_width_by_reference_size"]:
        lines += ["", f"The gate's paired interval of {' − '.join(r['gate_width_pair'])} "
                  "against random subsets of the val split's reference images:", "",
                  "| reference images | difference [interval] | width |",
                  "|---:|---:|---:|"]
        for size, d in r["gate_width_by_reference_size"].items():
            lines.append(f"| {size} | {iv(d['difference'], d['low'], d['high'])} | "
                         f"{d['width']:.3f} |")
    lines += ["", f"git {r['git']}, {r['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

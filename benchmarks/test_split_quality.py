r"""The default recipe's sample quality on the locked test split, across independent models.

    .venv/bin/python benchmarks/test_split_quality.py --work /tmp/gate-pairs --models 4 \
        2>&1 | tee benchmarks/results/test_split_quality.log

Reads the default-recipe models ``benchmarks/gate_pairs.py`` trained in ``--work`` (seeds 1000,
1001, …: the pipeline's training, the default config) and evaluates the first ``--models`` of
them with the pipeline's evaluation (``tasks.evaluate.evaluate``) at its defaults, except
``evaluate.split=test``: the locked split no choice was made on (issue 26 item 4). Per model,
the headline figures with their intervals; across the models, the mean of each figure with a
t-interval over the independent models (seed-to-seed variation included), beside the floor
(what held-out real images score against the same split).

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.recipes import t_interval

FIGURES = ("fd", "fd_corrected", "fd_matched", "fd_floor", "kid", "kid_floor", "fd_inf",
           "fd_inf_floor",
           "precision", "precision_floor", "recall", "recall_floor", "class_accuracy",
           "class_accuracy_floor", "memorization", "memorization_floor")


def across(values: list[float]) -> dict:
    """Mean and its two-sided 95 % t-interval over independent models."""
    mean, low, high = t_interval(values)
    return {"mean": mean, "low": low, "high": high, "n": len(values),
            "sd": statistics.stdev(values) if len(values) >= 2 else math.nan}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gate-pairs")
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="test_split_quality")
    args = ap.parse_args()

    from flows.config import load_config
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.run import evaluate

    work = Path(args.work)
    known = json.loads((work / "models.json").read_text())
    names = sorted((n for n, m in known.items() if n.startswith("seed")),
                   key=lambda n: known[n]["seed"])[:args.models]
    if len(names) < 2:
        raise SystemExit(f"{work}/models.json holds {len(names)} default-recipe models; "
                         "run benchmarks/gate_pairs.py first (2 are needed for an interval)")
    cfg = load_config(sets=args.set, root=str(work / "root"))
    ev = EvalConfig(**(cfg.evaluate.model_dump() | {"split": "test"}))
    t0 = time.perf_counter()
    per_model = {}
    for name in names:
        res = evaluate(known[name]["checkpoint_uri"], cfg.data, ev, cfg.runtime,
                       echo=lambda s: None)
        m = res["metrics"]
        per_model[name] = {k: m.get(k) for k in (*FIGURES, "fd_low", "fd_high", "kid_low",
                                                  "kid_high")}
        per_model[name] |= {"default_sampler": res["default_sampler"],
                            "test_images": res["dataset"]["val_images"],
                            "strata": {k: v for k, v in res["fidelity"].items()
                                       if k.endswith("_strata")}}
        log(f"{name}: FD {m['fd']:.3f} (corrected {m.get('fd_corrected', math.nan):.3f} "
            f"[{m.get('fd_low', math.nan):.3f}, {m.get('fd_high', math.nan):.3f}]), KID "
            f"{m['kid']:.4f} [{m['kid_low']:.4f}, {m['kid_high']:.4f}], floor FD "
            f"{m['fd_floor']:.3f}")
    summary = {k: across([p[k] for p in per_model.values()]) for k in FIGURES
               if all(p.get(k) is not None for p in per_model.values())}
    result = {"command": "benchmarks/test_split_quality.py " + " ".join(sys.argv[1:]),
              "git": git_revision(), "models": {n: known[n] for n in names},
              "evaluate": ev.model_dump(mode="json"), "per_model": per_model,
              "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, args.tag, result, markdown(result))


def markdown(result: dict) -> str:
    s, ev = result["summary"], result["evaluate"]
    first = next(iter(result["per_model"].values()))
    lines = [
        "# The default recipe on the locked test split (digits)",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s. {len(result['per_model'])} default-recipe models "
        f"(independent training seeds), the pipeline's evaluation at its defaults on the "
        f"test split ({first['test_images']} images), {ev['num_samples']} samples, default "
        f"sampler {first['default_sampler']['name']}:{first['default_sampler']['steps']}, "
        f"guidance {ev['guidance_scale']}; features: the evaluation's reference network. "
        "Across models: the mean and its 95 % t-interval over the independent models; "
        "*floor*: held-out real training images against the same split, at matched size.",
        "",
        "| figure | models: mean [95 %] | sd across models | floor: mean |",
        "|---|---:|---:|---:|",
    ]
    for k, label in (("fd", "FD at N (plain, size-biased)"),
                     ("fd_corrected", "FD, bias-corrected (the gate's centre)"),
                     ("fd_matched", "FD at the floor's size (as many samples as real images)"),
                     ("kid", "KID (stratified by class)"), ("fd_inf", "FD∞ (stratified)"),
                     ("precision", "precision"), ("recall", "recall"),
                     ("class_accuracy", "class accuracy"), ("memorization", "memorization")):
        if k not in s:
            continue
        x = s[k]
        # the FD floor compares only at its own size (fd_matched); the others have none
        floor = (s.get("fd_floor") if k == "fd_matched"
                 else None if k.startswith("fd") and k != "fd_inf" else s.get(f"{k}_floor"))
        floor_text = "" if floor is None else f"{floor['mean']:.4f}"
        lines.append(f"| {label} | {x['mean']:.4f} [{x['low']:.4f}, {x['high']:.4f}] | "
                     f"{x['sd']:.4f} | {floor_text} |")
    lines += ["", "| model | FD [interval, bias-corrected centre] | KID [interval] | "
              "FD∞ | class accuracy |", "|---|---:|---:|---:|---:|"]
    for name, p in result["per_model"].items():
        lines.append(f"| {name} | {p['fd']:.3f} ({p['fd_corrected']:.3f} [{p['fd_low']:.3f}, "
                     f"{p['fd_high']:.3f}]) | {p['kid']:.4f} [{p['kid_low']:.4f}, "
                     f"{p['kid_high']:.4f}] | {p['fd_inf']:.3f} | {p['class_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

r"""Training-recipe changes judged against the default recipe, over several seeds each, with
intervals that hold both the sampling noise and the training seed's.

    .venv/bin/python benchmarks/recipes.py --work /tmp/gate-rates \
        --recipe v=diffusion.prediction=v --recipe minsnr5=diffusion.min_snr_gamma=5 \
        --recipe cosine=diffusion.schedule=cosine --seeds 0,1,2 --tag recipes \
        2>&1 | tee benchmarks/results/recipes.log
    # results/recipes.md ran while the default schedule was linear; again today:
    #   add --set diffusion.schedule=linear --default-prefix linear-

A recipe is a name and ``--set`` overrides of the default config (several joined by ``;``).
It may change the data only by holding out more (``data.val_fraction``): its models are still
judged on the default data's held-out split, which they held out too.
Every (recipe, seed) is trained with the pipeline's own training (``run_training``, local Ray,
the default's steps and time budget) under ``--work`` (models.json; the default recipe's models
are those ``benchmarks/gate_rates.py`` trains, ``<--default-prefix>seed<N>``, so both benchmarks
share them; a name is only reused for the recipe it was trained with), then
evaluated once under one evaluation key (``--samples`` unguided samples at ``--setting``,
sample i from noise stream (seed, i), the held-out split as reference, the reference network's
features), so every model is judged on the same noise and labels.

Reported per recipe:

- the mean ± sd over disjoint 500-sample draws and the FD of all samples, per seed (issue 15's
  measure);
- per seed, FD(all) of the recipe minus FD(all) of the default recipe with the same training
  seed (same data order): the gate's paired interval (samples and reference resampled, within
  label for class-conditional samples) and its centre, the bias-corrected difference;
- over the seeds, the mean of those differences and a t-interval of it (95 %, n − 1 degrees of
  freedom): the training seed's noise, which the per-seed intervals do not hold. A change is
  kept only where that interval excludes 0.

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.gate_rates import train_models
from benchmarks.quality import draw_fd

# Two-sided 95 % Student t quantiles by degrees of freedom (scipy is not a dependency).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95 % t-interval of ``values`` (nan bounds for fewer than 2)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def holds_out_more(recipe: str, data, base) -> None:
    """A recipe may change the data only by holding out more of it (a larger
    ``data.val_fraction``): the split is by key hash against the fraction, so its held-out split
    contains the default's, and its models are judged on the default's like every other.
    Anything else would judge models against images some of them trained on."""
    same = data.model_copy(update={"val_fraction": base.val_fraction}) == base
    if not same or data.val_fraction < base.val_fraction:
        raise SystemExit(f"recipe {recipe} changes the data section other than by a larger "
                         "data.val_fraction: its models could not all be judged on held-out "
                         "images")


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, sets = text.partition("=")
    if not sep or not name.isidentifier() or name == "default":
        raise SystemExit(f"--recipe {text!r}: expected NAME=SECTION.KEY=VALUE[;...], "
                         "NAME an identifier other than 'default'")
    return name, [s for s in sets.split(";") if s]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=SET[;SET]")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--setting", default="dpmpp_2m:10")
    ap.add_argument("--draws", type=int, default=1000, help="bootstrap draws per difference")
    ap.add_argument("--work", default="/tmp/gate-rates")
    ap.add_argument("--default-prefix", default="", help="the default recipe's model names "
                    "are <prefix>seed<N> (gate_rates.py --prefix)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="applied to every recipe, the default included")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="recipes")
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    import ray
    import torch

    from diffusion.metrics import feature_statistics, paired_frechet_difference
    from flows.config import load_config
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.result import load_paired
    from tasks.evaluate.run import evaluate
    from tasks.preprocess import preprocess
    from tasks.runtime import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = str(work / "root")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = {"default": []} | dict(parse_recipe(r) for r in args.recipe)
    base = load_config(sets=args.set, root=root)
    t_start = time.perf_counter()
    ensure_ray(base.runtime)

    base_version = preprocess(base.data, base.runtime, echo=lambda s: None).ref.version
    # every model is judged on the default data's held-out split, which each one held out too
    judged_on = base.data.model_copy(update={"version": base_version})
    models: dict[str, dict] = {}
    for recipe, sets in recipes.items():
        cfg = load_config(sets=args.set + sets, root=root)
        if cfg.data != base.data:
            holds_out_more(recipe, cfg.data, base.data)
            preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
        prefix = args.default_prefix if recipe == "default" else f"{recipe}-"
        trained = train_models(cfg, work, [(f"{prefix}seed{s}", s, cfg.train.steps)
                                           for s in seeds])
        for s in seeds:
            models[recipe, s] = trained[f"{prefix}seed{s}"]
    ray.shutdown()

    ev_cfg = EvalConfig(**(base.evaluate.model_dump() | {
        "num_samples": args.samples, "frontier": [args.setting], "nll_images": 0,
        "bootstrap_draws": 0}))
    feats, reference, strata = {}, None, {}
    for (recipe, s), m in models.items():
        res = evaluate(m["checkpoint_uri"], judged_on, ev_cfg, base.runtime, echo=lambda s: None)
        arrays = load_paired(res)["arrays"]
        reference = torch.from_numpy(arrays["reference"]).double()
        if "labels" in arrays:  # class-conditional: resample within label, as the gate does
            strata = {"labels": torch.from_numpy(arrays["labels"]),
                      "reference_labels": torch.from_numpy(arrays["reference_labels"])}
        feats[recipe, s] = torch.from_numpy(arrays[f"samples/{args.setting}"]).double()
        m["eval_seconds"] = res["seconds"]
        log(f"evaluated {recipe} seed {s}: FD of all {res['metrics']['fd']:.3f}")

    torch.set_num_threads(1)  # the bootstrap's small eigendecompositions: no thread spin-waits
    ref_stats = feature_statistics(reference)
    rows = []
    for recipe in recipes:
        per_seed = {}
        for s in seeds:
            entry = draw_fd(feats[recipe, s], ref_stats, args.block)
            entry["loss"] = models[recipe, s]["loss"]
            entry["train_seconds"] = models[recipe, s]["seconds"]
            if recipe != "default":
                d = paired_frechet_difference(feats[recipe, s], feats["default", s], reference,
                                              draws=args.draws, **strata)
                # the interval's centre: the bias-corrected difference (diffusion.metrics)
                entry |= {"difference": d.center, "plain_difference": d.value, "low": d.low,
                          "high": d.high}
            per_seed[s] = entry
        row = {"recipe": recipe, "sets": recipes[recipe], "seeds": per_seed,
               "block_mean": statistics.mean(e["block_mean"] for e in per_seed.values()),
               "all_mean": statistics.mean(e["all"] for e in per_seed.values())}
        if recipe != "default":
            row["over_seeds"] = t_interval([e["difference"] for e in per_seed.values()])
            row["block_over_seeds"] = t_interval(
                [per_seed[s]["block_mean"] - rows[0]["seeds"][s]["block_mean"] for s in seeds])
        rows.append(row)
        log(f"{recipe}: mean FD over {args.block}-sample draws {row['block_mean']:.3f}, "
            f"of all {row['all_mean']:.3f}")
    result = {"command": "benchmarks/recipes.py " + " ".join(sys.argv[1:]), "git": git_revision(),
              "setting": args.setting, "split": base.evaluate.split, "samples": args.samples,
              "rows": rows,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_result(args.out, args.tag, result, markdown(result, seeds, args))


def markdown(result: dict, seeds: list[int], args) -> str:
    base = result["rows"][0]["block_mean"]
    lines = [
        "# Training recipes against the default",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s.",
        f"Each (recipe, training seed) trained by the pipeline, evaluated on the same "
        f"{result['samples']} unguided samples' noise and labels at {result['setting']}; FD in "
        f"the reference network's features against the {result.get('split', 'val')} split. "
        "*Draws*: mean ± sd over "
        f"disjoint {args.block}-sample draws; *all*: FD of all samples; *vs default*: FD(all) "
        "minus the default recipe's with the same training seed, bias-corrected, with the "
        "gate's paired 95 % interval (samples and reference); *over seeds*: the mean of those "
        "differences and its 95 % t-interval over the seeds (training noise).",
        "",
        "| recipe | overrides | draw mean (vs default) | FD of all | over seeds: Δ FD(all) "
        "[95 %] | over seeds: Δ draw mean [95 %] | " + " | ".join(
            f"seed {s}: draws; all; vs default; loss" for s in seeds) + " |",
        "|---|---|---:|---:|---:|---:|" + "---|" * len(seeds),
    ]
    for row in result["rows"]:
        cells = []
        for s in seeds:
            e = row["seeds"][str(s)] if str(s) in row["seeds"] else row["seeds"][s]
            vs = (f"{e['difference']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
                  if "difference" in e else "—")
            cells.append(f"{e['block_mean']:.2f} ± {e['block_sd']:.2f}; {e['all']:.2f}; {vs}; "
                         f"{e['loss']:.4f}")
        over = block = "—"
        if "over_seeds" in row:
            m, lo, hi = row["over_seeds"]
            over = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            m, lo, hi = row["block_over_seeds"]
            block = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        rel = 100 * (row["block_mean"] / base - 1)
        lines.append(f"| {row['recipe']} | {'; '.join(row['sets']) or '—'} | "
                     f"{row['block_mean']:.2f} ({rel:+.0f} %) | {row['all_mean']:.2f} | {over} | "
                     f"{block} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

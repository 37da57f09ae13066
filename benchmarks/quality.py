r"""Sample quality of trained models by guidance scale and sampler setting, each change judged
against the default with a paired interval (so no change is kept on a lucky draw).

    .venv/bin/python benchmarks/quality.py --models /tmp/gate-rates/models.json \
        --root /tmp/gate-rates/root 2>&1 | tee benchmarks/results/quality.log
    # options: --guidance 1.0,1.5,2.0,3.0 --frontier ddim:10,dpmpp_2m:10,dpmpp_2m_sde:10
    #          --samples 2000 --block 500 --baseline 1.5@dpmpp_2m:10 --only seed0,seed1
    #          --baseline-model seed0   (the baseline on another model, e.g. the old recipe's)

For every model (checkpoints, e.g. those ``benchmarks/gate_rates.py`` trained) and guidance
scale, one evaluation (``tasks.evaluate.evaluate``, the project's reference-network features,
the held-out split as reference) samples ``--samples`` images per sampler setting, sample i
from noise stream (seed, i) with the same label whatever the model, scale or setting. Reported
per (scale, setting), over the models:

- the mean ± sd of FD over disjoint ``--block``-sample draws (issue 15's measure), and the FD
  of all samples;
- the paired difference of FD(all samples) to the baseline (same model, same noise): its value
  and 95 % bootstrap interval per model. A change counts only where every model's interval
  lies on the same side of 0. With ``--baseline-model`` the baseline is that model's (same
  noise and labels, so still paired), e.g. the previous default recipe's. The baseline need
  not be among the scales × settings: it is then
  evaluated on its own.

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result


def draw_fd(x, ref_stats, block: int) -> dict:
    """FD of ``x`` [N, F] against ``ref_stats`` over disjoint ``block``-sample draws (mean, sd,
    count; nan where there are too few draws) and of all N."""
    from diffusion.metrics import feature_statistics, frechet_distance

    fds = [frechet_distance(*feature_statistics(x[i:i + block]), *ref_stats)
           for i in range(0, len(x) - block + 1, block)]
    return {"block_mean": statistics.mean(fds) if fds else float("nan"),
            "block_sd": statistics.stdev(fds) if len(fds) > 1 else None,
            "blocks": len(fds), "all": frechet_distance(*feature_statistics(x), *ref_stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", required=True, help="JSON {name: {checkpoint_uri: ...}}")
    ap.add_argument("--root", required=True, help="the storage root holding the dataset")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--guidance", default="1.0,1.5,2.0,3.0")
    ap.add_argument("--frontier", default="ddim:10,dpmpp_2m:10,dpmpp_2m_sde:10")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--draws", type=int, default=1000, help="bootstrap draws per difference")
    ap.add_argument("--baseline", default="1.5@dpmpp_2m:10", help="SCALE@SAMPLER:STEPS")
    ap.add_argument("--baseline-model", default="",
                    help="evaluate the baseline on this model of --models (default: each model)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="quality")
    args = ap.parse_args()

    import torch

    from diffusion.metrics import feature_statistics, paired_frechet_difference
    from flows.config import load_config
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.result import load_paired
    from tasks.evaluate.run import evaluate

    cfg = load_config(sets=args.set, root=args.root)
    every_model = json.loads(Path(args.models).read_text())
    models = every_model
    if args.only:
        models = {k: v for k, v in models.items() if k in args.only.split(",")}
    if args.baseline_model and args.baseline_model not in every_model:
        raise SystemExit(f"--baseline-model {args.baseline_model}: not in {args.models}")
    scales = [float(g) for g in args.guidance.split(",")]
    settings = args.frontier.split(",")
    base_scale, base_setting = args.baseline.split("@")
    base_scale = float(base_scale)
    combos = [(g, s) for g in scales for s in settings]
    if (base_scale, base_setting) not in combos:  # the baseline alone at its own scale
        combos.insert(0, (base_scale, base_setting))
    # whose samples each combination is evaluated on: the models, or the baseline's own model
    evaluated = {(name, g, s): every_model[args.baseline_model if args.baseline_model and (
        g, s) == (base_scale, base_setting) else name] for name in models for g, s in combos}
    t_start = time.perf_counter()

    feats: dict = {}  # (model, scale, setting) -> [N, F]
    reference = None
    seconds: dict = {}
    for name in models:
        for g in dict.fromkeys(g for g, _ in combos):
            by_model: dict = {}  # checkpoint -> the settings at g sampled from it
            for g2, s in combos:
                if g2 == g:
                    by_model.setdefault(evaluated[name, g, s]["checkpoint_uri"], []).append(s)
            for uri, at_g in by_model.items():
                ev_cfg = EvalConfig(**(cfg.evaluate.model_dump() | {
                    "num_samples": args.samples, "frontier": at_g, "guidance_scale": g,
                    "nll_images": 0, "bootstrap_draws": 0}))
                res = evaluate(uri, cfg.data, ev_cfg, cfg.runtime, echo=lambda s: None)
                arrays = load_paired(res)["arrays"]
                reference = torch.from_numpy(arrays["reference"]).double()
                for s in at_g:
                    feats[name, g, s] = torch.from_numpy(arrays[f"samples/{s}"]).double()
                who = name if uri == models[name]["checkpoint_uri"] else (
                    f"{args.baseline_model} (baseline model)")
                seconds[f"{who}@{g}"] = res["seconds"]
                log(f"{who} guidance {g}: " + ", ".join(
                    f"{e['sampler']}:{e['steps']} FD {e['fd']:.3f}" for e in res["frontier"]))

    torch.set_num_threads(1)  # the bootstrap's small eigendecompositions: no thread spin-waits
    ref_stats = feature_statistics(reference)
    rows = []
    for g, s in combos:
        per_model = {}
        for name in models:
            x = feats[name, g, s]
            entry = draw_fd(x, ref_stats, args.block)
            if (g, s) != (base_scale, base_setting):
                d = paired_frechet_difference(x, feats[name, base_scale, base_setting],
                                              reference, draws=args.draws)
                entry |= {"difference": d.value, "low": d.low, "high": d.high}
            per_model[name] = entry
        rows.append({"guidance": g, "setting": s, "models": per_model,
                     "mean_block_fd": statistics.mean(
                         e["block_mean"] for e in per_model.values())})
        log(f"guidance {g} {s}: mean FD over {args.block}-sample draws "
            f"{rows[-1]['mean_block_fd']:.3f}")
    result = {"command": "benchmarks/quality.py " + " ".join(sys.argv[1:]), "git": git_revision(),
              "baseline": args.baseline, "baseline_model": args.baseline_model or None,
              "rows": rows, "eval_seconds": seconds,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_result(args.out, args.tag, result, markdown(result, list(models), args))


def markdown(result: dict, names: list[str], args) -> str:
    base = next(r for r in result["rows"]
                if f"{r['guidance']}@{r['setting']}" == args.baseline)["mean_block_fd"]
    lines = [
        "# Sample quality by guidance scale and sampler setting",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s.",
        f"FD in the project's reference-network feature space against the held-out split. "
        f"*Draws*: mean ± sd over disjoint {args.block}-sample draws of {args.samples} samples, "
        f"per model; *vs baseline*: FD(all) − the baseline's FD(all) on the same noise, with "
        f"its paired 95 % interval, per model. Baseline {args.baseline}"
        + (f" on model {args.baseline_model}." if args.baseline_model else "."),
        "",
        "| guidance | setting | mean of the models' draw means | vs baseline | "
        + " | ".join(f"{n}: draws; all; vs baseline" for n in names) + " |",
        "|---:|---|---:|---:|" + "---|" * len(names),
    ]
    for r in result["rows"]:
        cells = []
        for n in names:
            e = r["models"][n]
            sd = f" ± {e['block_sd']:.2f}" if e["block_sd"] is not None else ""
            vs = (f"{e['difference']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
                  if "difference" in e else "baseline")
            cells.append(f"{e['block_mean']:.2f}{sd}; {e['all']:.2f}; {vs}")
        rel = r["mean_block_fd"] / base - 1
        lines.append(f"| {r['guidance']:g} | {r['setting']} | {r['mean_block_fd']:.2f} | "
                     f"{rel:+.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

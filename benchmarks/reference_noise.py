r"""How much of the promotion gate's interval is the held-out reference set, and whether the
bootstrap's resampling of it states that noise truly.

    .venv/bin/python benchmarks/reference_noise.py --work /tmp/gate-rates --prefix cosine- \
        --tag reference_noise_val10
    .venv/bin/python benchmarks/reference_noise.py --work /tmp/gate-rates --prefix val20- \
        --set data.val_fraction=0.2 --tag reference_noise_val20

With the models ``benchmarks/gate_rates.py`` trained (``<prefix>seed0``, ``<prefix>seed1`` and
``<prefix>div4-seed200`` in ``--work/models.json``) and their stored evaluations, for two paired
comparisons on the first ``--samples`` samples (the default model against another seed's, and
against the 200-step model), with the samples held fixed so that the reference is the only noise:

- the sd of FD(a) − FD(b) over bootstrap resamples of the reference (with repeats: what the
  gate does, ``diffusion.metrics.paired_frechet_difference``);
- the sd over random halves of the reference without repeats: the delete-half jackknife, whose
  variance estimates that of the statistic on the whole set (Shao and Wu 1989) without the
  bootstrap's repeated rows. The two agreeing says the resampling does not overstate the
  reference's noise; the gate's width is then the reference's size, not the method;
- for scale, the sd over bootstrap resamples of the samples with the reference fixed.

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.gate_rates import SETTING, evaluate_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gate-rates")
    ap.add_argument("--prefix", default="", help="the models' names' prefix (gate_rates.py's)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="the config the models were trained with (their data above all)")
    ap.add_argument("--samples", type=int, default=1000, help="samples per model compared")
    ap.add_argument("--max-samples", type=int, default=4000,
                    help="the stored evaluation's size (gate_rates.py --max-samples)")
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="reference_noise")
    args = ap.parse_args()

    import torch

    from diffusion.metrics import (
        _resample_counts,
        _weighted_statistics,
        feature_statistics,
        frechet_distance,
    )
    from flows.config import load_config

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = load_config(sets=args.set, root=str(Path(args.work) / "root"))
    known = json.loads((Path(args.work) / "models.json").read_text())
    p = args.prefix
    names = [f"{p}seed0", f"{p}seed1", f"{p}div4-seed200"]
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"{args.work}/models.json lacks {missing}: run benchmarks/gate_rates.py "
                         f"--prefix {p!r} with this --work first")
    arrays, _ = evaluate_models(cfg, {n: known[n] for n in names}, args.max_samples)
    ref = torch.from_numpy(arrays[names[0]]["reference"]).double()
    g = torch.Generator().manual_seed(0)

    def feats(name: str):
        return torch.from_numpy(arrays[name][f"samples/{SETTING}"][:args.samples]).double()

    def difference(a, b, ref_stats, w=None) -> float:
        """FD(a) − FD(b), on the resample ``w`` of the paired rows where given."""
        def stats(x):
            return feature_statistics(x) if w is None else _weighted_statistics(x, w)
        return frechet_distance(*stats(a), *ref_stats) - frechet_distance(*stats(b), *ref_stats)

    rows = []
    for label, other in (("another seed's model", names[1]), ("the 200-step model", names[2])):
        a, b = feats(names[0]), feats(other)
        value = difference(a, b, feature_statistics(ref))
        wr = _resample_counts(len(ref), args.draws, g)
        boot_ref = torch.tensor([difference(a, b, _weighted_statistics(ref, wr[i]))
                                 for i in range(args.draws)])
        halves = torch.tensor([
            difference(a, b, feature_statistics(ref[torch.randperm(len(ref), generator=g)
                                                    [:len(ref) // 2]]))
            for _ in range(args.draws)])
        ws = _resample_counts(args.samples, args.draws, g)
        boot_samples = torch.tensor([difference(a, b, feature_statistics(ref), ws[i])
                                     for i in range(args.draws)])
        row = {"pair": f"{names[0]} − {other}", "against": label, "difference": value,
               "sd_reference_bootstrap": float(boot_ref.std()),
               "sd_reference_halves": float(halves.std()),
               "sd_samples_bootstrap": float(boot_samples.std())}
        rows.append(row)
        log(f"{row['pair']}: {value:+.3f}; sd over the reference: bootstrap "
            f"{row['sd_reference_bootstrap']:.3f}, halves {row['sd_reference_halves']:.3f}; "
            f"over the samples {row['sd_samples_bootstrap']:.3f}")
    result = {"command": "benchmarks/reference_noise.py " + " ".join(sys.argv[1:]),
              "git": git_revision(), "setting": SETTING, "samples": args.samples,
              "reference": len(ref), "draws": args.draws, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.out, args.tag, result, markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# The held-out reference's share of the gate's noise",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s.",
        f"{result['samples']} unguided samples per model at {result['setting']}, "
        f"{result['reference']} reference images, {result['draws']} draws each. The samples "
        "fixed: sd of the paired FD difference over bootstrap resamples of the reference (the "
        "gate's) and over random halves of it without repeats (delete-half jackknife); the "
        "reference fixed: sd over bootstrap resamples of the samples.",
        "",
        "| pair | FD difference | sd, reference bootstrap | sd, reference halves | "
        "sd, samples bootstrap |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} ({r['against']}) | {r['difference']:+.3f} | "
                     f"{r['sd_reference_bootstrap']:.3f} | {r['sd_reference_halves']:.3f} | "
                     f"{r['sd_samples_bootstrap']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

r"""Is the gate's paired interval as wide as the difference really varies between sample sets?

    .venv/bin/python benchmarks/block_spread.py --root /tmp/demo/pipeline-data \
        --model /tmp/demo/pipeline-data/runs/<run>/checkpoint_<latest> --blocks 8

Issue 26 item 2. With one trained model (e.g. ``make demo``'s) and two of its sampler settings
(``--a``, ``--b``: two "models" that share noise streams and labels, as two versions under one
eval key do), sample ``--blocks`` × ``--block`` images per setting (sample i: noise stream
(seed, i), labels dealt from the held-out split's as the evaluation deals them), take the
reference network's features, and for each disjoint block of ``--block`` paired samples compute
FD(a) − FD(b) against the held-out split, held fixed. Their sd is the observed block-to-block
spread of the difference. Against it, on each block with the reference held fixed too (the only
noise the blocks see), the bootstrap's sd of the difference, resampled freely and within label,
and the sd the gate's interval implies (its half-width / 1.96). Then, for scale, the gate's own
interval on one block with the reference resampled (the reference's noise counted as well).
Writes ``results/<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="the storage root the model was trained in")
    ap.add_argument("--model", required=True, help="a checkpoint or model directory URI")
    ap.add_argument("--a", default="ddim:10")
    ap.add_argument("--b", default="dpmpp_2m:10")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block", type=int, default=1000)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="block_spread")
    args = ap.parse_args()

    import torch

    from diffusion.metrics import _interval, _resampled_fds
    from tasks.datasets import open_dataset
    from tasks.evaluate.config import EvalConfig, parse_setting
    from tasks.evaluate.metrics import sample_labels
    from tasks.evaluate.reference import reference_features
    from tasks.evaluate.run import generate
    from tasks.models import load_model_ref
    from tasks.pixels import read_split
    from tasks.runtime import RuntimeConfig

    t0 = time.perf_counter()
    runtime = RuntimeConfig(root=args.root)
    root = runtime.root_location()
    loaded = load_model_ref(args.model, runtime)
    ds = loaded.config.get("dataset") or {}
    _, manifest = open_dataset(root, ds.get("name", "digits"), ds.get("version"))
    cfg = EvalConfig()
    device = torch.device("cpu")
    features = reference_features(root, manifest, cfg, device, log)
    val_x, val_y = read_split(root, manifest, "val", cfg.max_real_images)
    n = args.blocks * args.block
    labels = sample_labels(val_y, n, cfg.seed, loaded.config["unet"].get("num_classes"))
    feats = {}
    for setting in (args.a, args.b):
        name, steps = parse_setting(setting)
        images, ips = generate(loaded, n, name, steps, cfg, labels, device)
        feats[setting] = features(images)
        log(f"{setting}: {n} samples at {ips:.0f} images/s")
    ref = features(val_x)
    lab, ref_lab = torch.as_tensor(labels), torch.as_tensor(val_y)

    observed, free_sd, strat_sd, gate_sd = [], [], [], []
    for k in range(args.blocks):
        sl = slice(k * args.block, (k + 1) * args.block)
        a, b = feats[args.a][sl], feats[args.b][sl]
        common = dict(draws=args.draws, seed=k, resample_reference=False)
        (va, vb), free, _ = _resampled_fds([a, b], ref, labels=None, reference_labels=None,
                                           **common)
        _, strat, twice = _resampled_fds([a, b], ref, labels=lab[sl], reference_labels=ref_lab,
                                         again=True, **common)
        observed.append(va - vb)
        free_sd.append(float((free[0] - free[1]).std()))
        strat_sd.append(float((strat[0] - strat[1]).std()))
        gate = _interval(va - vb, strat[0] - strat[1], 0.95, twice[0] - twice[1])
        gate_sd.append((gate.high - gate.low) / 2 / 1.96)
        log(f"block {k}: difference {va - vb:+.4f}; bootstrap sd free {free_sd[-1]:.4f}, "
            f"within label {strat_sd[-1]:.4f}, the gate's {gate_sd[-1]:.4f}")
    (va, vb), full, twice = _resampled_fds(
        [feats[args.a][:args.block], feats[args.b][:args.block]], ref, draws=args.draws,
        seed=0, resample_reference=True, labels=lab[:args.block], reference_labels=ref_lab,
        again=True)
    with_ref = _interval(va - vb, full[0] - full[1], 0.95, twice[0] - twice[1])
    spread = statistics.stdev(observed)
    result = {"git": git_revision(), "args": vars(args), "observed": observed,
              "observed_sd": spread, "bootstrap_sd_free": free_sd,
              "bootstrap_sd_within_label": strat_sd, "gate_sd": gate_sd,
              "gate_interval_block0_reference_resampled": [with_ref.low, with_ref.high],
              "seconds": time.perf_counter() - t0}
    med = statistics.median
    text = "\n".join([
        "# The gate's paired interval against the observed spread of disjoint sample blocks",
        "",
        f"Command: `.venv/bin/python benchmarks/block_spread.py --root {args.root} --model "
        f"<checkpoint> --a {args.a} --b {args.b} --blocks {args.blocks} --block {args.block}`; "
        f"git {result['git']}; {result['seconds']:.0f} s.",
        f"One model, two sampler settings as the pair; {args.blocks} disjoint blocks of "
        f"{args.block} paired samples against the {len(ref)} held-out images, held fixed "
        "(the effective n of the observed sd is the number of blocks).",
        "",
        "| what | sd of FD(a) − FD(b) |",
        "|---|---:|",
        f"| observed between blocks (mean difference {statistics.mean(observed):+.3f}) | "
        f"{spread:.3f} |",
        f"| bootstrap, rows resampled freely (median over blocks) | {med(free_sd):.3f} |",
        f"| bootstrap, within label (median) | {med(strat_sd):.3f} |",
        f"| the gate's interval, within label, double bootstrap (half-width / 1.96, median) | "
        f"{med(gate_sd):.3f} |",
        "",
        f"The gate's interval on block 0 with the reference resampled too: "
        f"[{with_ref.low:+.3f}, {with_ref.high:+.3f}].", ""])
    write_result(args.out, args.tag, result, text)


if __name__ == "__main__":
    main()

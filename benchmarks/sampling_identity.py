"""Digests of everything one checkpoint produces, to show a refactor changed no output bit.

For a fixed training checkpoint it records: the evaluation (metrics and frontier, no timings),
the generated shards of a Ray Data job, the served MLflow model's images for a mixed request
table, the training stage's sample grid, and the demo's grid, NLL and weights. Run it in the old
and the new tree on the same checkpoint and compare the two JSON files:

    # a checkpoint, once (any tree): a tiny run under ROOT
    diffusion-pipeline preprocess --root ROOT
    diffusion-pipeline train --root ROOT --set train.steps=40 --set train.batch_size=32 \\
        --set train.warmup_steps=5 --set train.run_name=golden --set train.checkpoint_every=20
    # in each tree (PYTHONPATH=that tree):
    python benchmarks/sampling_identity.py ROOT OUT_OLD     # in the old tree
    python benchmarks/sampling_identity.py ROOT OUT_NEW --compare OUT_OLD/identity.json

It uses the code's public entry points only (tasks.evaluate.evaluate, tasks.generate.generate,
tasks.pyfunc_model.generate, the training grid, flows.demo.run_demo), so it runs unchanged on
both sides of a refactor that keeps them. Takes 3–10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import replace


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _checkpoint(root: str) -> str:
    found = sorted(p for p in glob.glob(f"{root}/runs/golden/checkpoint_*") if os.path.isdir(p))
    if not found:
        sys.exit(f"no checkpoint under {root}/runs/golden; train one first (see the docstring)")
    return found[-1]


def record(root: str, out: str) -> dict:
    import pandas as pd
    import torch

    from flows.config import load_config

    ckpt = _checkpoint(root)
    quiet = lambda s: None  # noqa: E731
    cfg = load_config(root=root, sets=[
        "evaluate.num_samples=40", "evaluate.frontier=[ddim:5,dpmpp_2m:5]",
        "evaluate.nll_images=4", "evaluate.reference_steps=50", "evaluate.batch_size=16",
        "generate.num_samples=50", "generate.batch_size=16", "generate.shard_size=25",
        f"generate.output={out}/gen", f"generate.model={ckpt}", "generate.labels=3",
        "generate.guidance_scale=2.0"])
    res: dict = {"checkpoint": os.path.basename(ckpt)}

    from tasks.evaluate import evaluate

    r = evaluate(ckpt, cfg.data, cfg.evaluate, cfg.runtime, echo=quiet, use_cache=False)
    res["eval"] = {"metrics": r["metrics"], "key": r["eval_key"],
                   "frontier": [{k: v for k, v in f.items() if k != "images_per_s"}
                                for f in r["frontier"]]}

    from tasks.generate import generate

    generate(cfg.generate, cfg.runtime, echo=quiet)
    res["gen"] = {os.path.basename(p): _digest(p)
                  for p in sorted(glob.glob(f"{out}/gen/**/shard-*.parquet", recursive=True))}

    from tasks import pyfunc_model
    from tasks.models import load_model_ref

    loaded = load_model_ref(ckpt, cfg.runtime)
    defaults = {"sampler": {"name": "ddim", "steps": 6}, "guidance_scale": 1.5, "batch_size": 3}
    table = pd.DataFrame({
        "seed": [1, 1, 2, 3, 4, 5, 6, 7], "index": [0, 1, 5, None, 2, 3, 4, 9],
        "label": [3, None, 7, 1, None, 2, 2, 5],
        "sampler": [None, None, "dpmpp_2m", None, "ddpm", None, None, "heun"],
        "steps": [None, 4, 5, None, 10, None, 3, 4],
        "guidance_scale": [None, None, 1.0, 3.0, None, None, None, 2.0]})
    served = pyfunc_model.generate(loaded.model, loaded.config, defaults, table, batch_size=3)
    res["served"] = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in served["pixels"]]

    from diffusion.ema import EMA
    from diffusion.pipeline import DiffusionConfig
    from diffusion.unet import UNetConfig
    from tasks.train.grid import log_sample_grid

    class Tracker:
        def artifact(self, path: str, _dir: str) -> None:
            res["grid"] = _digest(path)

    schedule = DiffusionConfig.from_dict(loaded.config["diffusion"]).build_schedule()
    torch.manual_seed(0)
    log_sample_grid(loaded.model, EMA(loaded.model, decay=0.9),
              UNetConfig.from_dict(loaded.config["unet"]), schedule, "eps", 7, Tracker())

    from diffusion import SamplerConfig
    from flows.demo import DemoConfig, run_demo

    demo = replace(DemoConfig(steps=6, batch_size=16, samples_per_class=2, nll_images=2),
                   sampler=SamplerConfig("ddim", steps=4))
    summary = run_demo(f"{out}/demo", demo, log=quiet)
    res["demo"] = {"grid": _digest(f"{out}/demo/samples.png"),
                   "nll": summary["val_nll_bits_per_dim"],
                   "weights": _digest(f"{out}/demo/model/model.safetensors")}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="storage root holding runs/golden (see the docstring)")
    ap.add_argument("out", help="output folder (samples, demo, identity.json)")
    ap.add_argument("--compare", help="identity.json of the other tree: exit 1 on a difference")
    args = ap.parse_args()
    res = record(args.root, args.out)
    with open(os.path.join(args.out, "identity.json"), "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            other = json.load(f)
        diff = [k for k in sorted(set(res) | set(other)) if res.get(k) != other.get(k)]
        for k in sorted(set(res) | set(other)):
            print(f"{k:>10}: {'DIFFERENT' if k in diff else 'identical'}")
        sys.exit(1 if diff else 0)
    print(json.dumps(res, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()

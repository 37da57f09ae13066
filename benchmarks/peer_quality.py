r"""Our UNet against diffusers' ``UNet2DModel`` at equal steps, in the evaluation's own feature
space: the README's "Sample quality" comparison.

    .venv/bin/uv pip install --python .venv/bin/python diffusers   # the peer; not a dependency
    .venv/bin/python benchmarks/peer_quality.py --work /tmp/gate-rates --seeds 0,1,2 \
        2>&1 | tee benchmarks/results/peer_quality.log

Both networks are trained here, in one process, by the same loop with the default config's
recipe (``train.steps`` steps of ``train.batch_size``, AdamW at ``train.lr`` with its warm-up and
cosine decay, gradient clipping, the EMA, label dropout for guidance, the default loss), on the
same training split of the default digits dataset, with the same batches, timesteps and noise
at every step (one generator seeded by the training seed drives both): only the network
differs. diffusers' net has our widths (32, 64), one res block per level, self-attention at
4×4 and a class embedding (ten digits and the null class), as ours.

Each trained EMA model then goes through the evaluation's own sampling and features
(``tasks.evaluate.run.generate``, the dataset's reference network, the held-out split as the
reference): ``--samples`` unguided samples at ``--setting``, sample i from noise stream
(seed, i) with the same label for both networks. Reported per training seed: FD over disjoint
500-sample draws (mean ± sd), FD of all, and diffusers − ours with its paired 95 % bootstrap
interval; over the seeds, the mean difference and its t-interval. The pipeline's own model of
the same seed (trained through Ray Train, ``benchmarks/gate_rates.py``'s ``seed<N>``) is
sampled the same way when ``--work`` holds it: it shows that this in-process loop trains as
the pipeline does.

Writes ``results/<tag>.json`` and ``results/<tag>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._machine import git_revision, log, write_result
from benchmarks.gate_rates import data_sha, recipe_sha
from benchmarks.quality import draw_fd
from benchmarks.recipes import t_interval


class DiffusersConditional(torch.nn.Module):
    """diffusers' UNet2DModel behind our model signature ``f(x_t, t, labels) -> output``."""

    def __init__(self, unet_cfg: dict):
        from diffusers import UNet2DModel

        super().__init__()
        widths = tuple(unet_cfg["base_channels"] * m for m in unet_cfg["channel_mult"])
        attn = set(unet_cfg["attention_resolutions"])
        res = unet_cfg["resolution"]
        down, up = [], []
        for level in range(len(widths)):
            has_attn = res // 2 ** level in attn
            down.append("AttnDownBlock2D" if has_attn else "DownBlock2D")
            up.insert(0, "AttnUpBlock2D" if has_attn else "UpBlock2D")
        self.unet = UNet2DModel(
            sample_size=res, in_channels=unet_cfg["in_channels"],
            out_channels=unet_cfg.get("out_channels") or unet_cfg["in_channels"],
            layers_per_block=unet_cfg["num_res_blocks"], block_out_channels=widths,
            down_block_types=tuple(down), up_block_types=tuple(up),
            norm_num_groups=unet_cfg["groups"],
            attention_head_dim=widths[-1] // unet_cfg["num_heads"],
            num_class_embeds=(unet_cfg["num_classes"] + 1) if unet_cfg.get("num_classes")
            else None)

    def forward(self, xt, t, labels=None):
        return self.unet(xt, t, class_labels=labels).sample


def train_in_process(model, train_x, train_y, cfg, seed: int) -> tuple[torch.nn.Module, dict]:
    """``cfg.train.steps`` steps of the default recipe; the EMA weights loaded into ``model``."""
    from diffusion.ema import EMA
    from diffusion.training import train_loop
    from tasks.train.config import optim_config

    ema = EMA(model, decay=cfg.train.ema_decay)
    null = cfg.model.num_classes
    y_all = torch.from_numpy(train_y).long()
    y_all = torch.where(y_all < 0, torch.full_like(y_all, null), y_all) if null else None
    losses = []
    t0 = time.perf_counter()
    for out in train_loop(model, torch.from_numpy(train_x), y_all,
                          cfg.diffusion.build_schedule(), optim_config(cfg.train, cfg.diffusion),
                          batch_size=cfg.train.batch_size,
                          generator=torch.Generator().manual_seed(seed * 7919), ema=ema,
                          null_class=null, draw="epochs"):
        losses.append(out["loss"])
        if out["step"] % 200 == 0:
            log(f"  step {out['step']}/{cfg.train.steps} loss "
                f"{statistics.mean(losses[-50:]):.4f}")
    ema.copy_to(model)
    model.eval()
    return model, {"loss": statistics.mean(losses[-50:]),
                   "seconds": round(time.perf_counter() - t0, 1),
                   "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/gate-rates",
                    help="holds root/ (the dataset) and models.json (the pipeline's models)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--block", type=int, default=500)
    ap.add_argument("--setting", default="dpmpp_2m:10")
    ap.add_argument("--draws", type=int, default=1000, help="bootstrap draws per difference")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="peer_quality")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusion.metrics import feature_statistics, paired_frechet_difference
    from diffusion.unet import UNet
    from flows.config import load_config
    from tasks.evaluate import EvalConfig
    from tasks.evaluate.config import parse_setting
    from tasks.evaluate.metrics import sample_labels
    from tasks.evaluate.run import _feature_net, _open_inputs, generate
    from tasks.pixels import read_split
    from tasks.preprocess import preprocess

    work = Path(args.work)
    cfg = load_config(root=str(work / "root"))
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    preprocess(cfg.data, cfg.runtime, echo=lambda s: None)
    known = (json.loads((work / "models.json").read_text())
             if (work / "models.json").exists() else {})
    sha, data = recipe_sha(cfg), data_sha(cfg)  # the pipeline's models of this recipe, by seed
    pipeline_models = {m["seed"]: m for m in known.values()
                       if (m.get("recipe"), m.get("data")) == (sha, data)
                       and m["steps"] == cfg.train.steps}
    if not pipeline_models:
        raise SystemExit(f"{work}/models.json has no model of the default recipe ({sha}): run "
                         "benchmarks/gate_rates.py (or recipes.py) with this --work first")
    template = next(iter(pipeline_models.values()))["checkpoint_uri"]
    ev_cfg = EvalConfig(**(cfg.evaluate.model_dump() | {
        "num_samples": args.samples, "frontier": [args.setting], "nll_images": 0,
        "bootstrap_draws": 0}))
    inputs = _open_inputs(template, cfg.data, ev_cfg, cfg.runtime, None)
    features = _feature_net(inputs, ev_cfg, lambda s: None, False)
    reference = features(inputs.val_x).double().cpu()
    ref_stats = feature_statistics(reference)
    train_x, train_y = read_split(inputs.root, inputs.manifest, "train")
    labels = sample_labels(inputs.val_y, args.samples, ev_cfg.seed, inputs.num_classes)
    sampler, steps = parse_setting(args.setting)
    unet_cfg = inputs.loaded.config["unet"]
    log(f"{len(train_x)} training images, {len(inputs.val_x)} reference images; "
        f"{args.samples} samples at {args.setting}, guidance {ev_cfg.guidance_scale}")

    def sample(model) -> torch.Tensor:
        loaded = dataclasses.replace(inputs.loaded, model=model)
        images, _ = generate(loaded, args.samples, sampler, steps, ev_cfg, labels, inputs.device)
        return features(images).double().cpu()

    rows = {}
    for seed in seeds:
        feats, info = {}, {}
        for name in ("ours", "diffusers"):
            torch.manual_seed(seed)
            model = (UNet(cfg.model) if name == "ours"
                     else DiffusersConditional(unet_cfg))
            log(f"seed {seed}: training {name} in process")
            model, info[name] = train_in_process(model, train_x, train_y, cfg, seed)
            feats[name] = sample(model)
        if seed in pipeline_models:
            from tasks.models import load_model_ref

            m = pipeline_models[seed]
            feats["pipeline"] = sample(load_model_ref(m["checkpoint_uri"], cfg.runtime).model)
            info["pipeline"] = {"loss": m["loss"], "seconds": m["seconds"]}
        entry = {}
        for name, x in feats.items():
            entry[name] = draw_fd(x, ref_stats, args.block) | info[name]
            if name != "ours":
                d = paired_frechet_difference(x, feats["ours"], reference, draws=args.draws)
                entry[name] |= {"difference": d.value, "low": d.low, "high": d.high}
            log(f"seed {seed} {name}: FD draws {entry[name]['block_mean']:.3f}, "
                f"all {entry[name]['all']:.3f}")
        rows[seed] = entry
    names = list(rows[seeds[0]])
    summary = {}
    for name in names:
        have = [rows[s][name] for s in seeds if name in rows[s]]
        summary[name] = {"block_mean": statistics.mean(e["block_mean"] for e in have),
                         "all_mean": statistics.mean(e["all"] for e in have)}
        if name != "ours":
            summary[name]["over_seeds"] = t_interval([e["difference"] for e in have])
    result = {"command": "benchmarks/peer_quality.py " + " ".join(sys.argv[1:]),
              "git": git_revision(), "setting": args.setting, "samples": args.samples,
              "seeds": rows, "summary": summary,
              "seconds": round(time.perf_counter() - t_start, 1)}
    write_result(args.out, args.tag, result, markdown(result, seeds, args))


def markdown(result: dict, seeds: list[int], args) -> str:
    lines = [
        "# Our UNet against diffusers' UNet2DModel, in the evaluation's feature space",
        "",
        f"Command: `.venv/bin/python {result['command']}`; git {result['git']}; "
        f"{result['seconds']:.0f} s.",
        "Both trained in one process by the same loop, batches and noise (the default recipe); "
        f"{result['samples']} unguided samples each at {result['setting']} on the same noise and "
        "labels; FD in the reference network's features against the held-out split. *pipeline*: "
        "the pipeline's own model of that seed (Ray Train), sampled the same way. Δ: FD(all) "
        "minus ours, paired 95 % bootstrap interval; over seeds: its mean and 95 % t-interval.",
        "",
        "| network | FD, 500-sample draws | FD of all | Δ vs ours over seeds [95 %] | "
        + " | ".join(f"seed {s}: draws; all; Δ; loss; train s" for s in seeds) + " |",
        "|---|---:|---:|---:|" + "---|" * len(seeds),
    ]
    for name, summ in result["summary"].items():
        over = "—"
        if "over_seeds" in summ:
            m, lo, hi = summ["over_seeds"]
            over = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        cells = []
        for s in seeds:
            e = result["seeds"][s].get(name)
            if e is None:
                cells.append("—")
                continue
            d = (f"{e['difference']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
                 if "difference" in e else "—")
            cells.append(f"{e['block_mean']:.2f} ± {e['block_sd']:.2f}; {e['all']:.2f}; {d}; "
                         f"{e['loss']:.4f}; {e['seconds']:.0f}")
        lines.append(f"| {name} | {summ['block_mean']:.2f} | {summ['all_mean']:.2f} | {over} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

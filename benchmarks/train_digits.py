"""Digits benchmark: training speed, NLL and sample quality of every sampler, against diffusers.

    .venv/bin/pip install diffusers          # for the peer comparison only; not a dependency
    .venv/bin/python benchmarks/train_digits.py --budget 300 --out benchmarks/results

In one process, same data, batch size, optimiser, EMA and wall-clock budget:
  (a) our UNet (``diffusion.unet``) trained with ``diffusion.training.train_loop``;
  (b) diffusers' UNet2DModel of similar parameter count with DDPMScheduler.add_noise and the same
      optimiser / EMA (skipped with a note when diffusers is not installed).
Then for each model: steady-state training images/s (first 20 steps excluded), final loss, val
NLL in bits/dim (the same T=1000 bound code for both), and the Fréchet distance of 1,000
unconditional samples for each sampler and step count.

Quality metric — FD in the features of a small digits classifier (``diffusion.metrics.FeatureNet``,
trained here on the training split, its val accuracy printed). Inception features are meaningless
at 8×8 and cannot be downloaded here; a classifier trained on the data knows what separates the
digits, so its penultimate features measure "looks like this dataset" the way FID's do. The
reference set is the held-out split (not seen in training); the real-vs-real floor is the FD of
1,000 training images against the same reference, printed beside every score. Lower is better.

Writes ``digits.json`` and ``digits.md`` (a markdown table) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion import (
    EMA,
    Denoiser,
    NoiseSchedule,
    OptimConfig,
    SampleNoise,
    SamplerConfig,
    UNet,
    load_model,
    nll_bits_per_dim,
    sample,
    save_model,
)
from diffusion.metrics import (
    FeatureNetConfig,
    accuracy,
    extract_features,
    feature_statistics,
    frechet_distance,
    train_feature_net,
)
from diffusion.pixels import uint8_to_unit
from diffusion.training import train_loop
from tasks.digits import DIGITS_UNET, digits_splits

OUR_SAMPLERS = [
    ("ddpm", 1000), ("ddpm", 100), ("ddpm", 50),
    ("ddim", 10), ("ddim", 20), ("ddim", 50),
    ("dpmpp_2m", 10), ("dpmpp_2m", 20),
    ("dpmpp_2m_sde", 10), ("dpmpp_2m_sde", 20), ("dpmpp_2m_sde", 50),
    ("heun", 10), ("heun", 20), ("euler", 20),
    ("langevin", 100),
]  # fmt: skip

BF16_SAMPLERS = [("ddpm", 1000), ("dpmpp_2m", 20), ("dpmpp_2m_sde", 20)]
PEER_SAMPLERS = [
    ("DDPMScheduler", 1000),
    ("DDPMScheduler", 20),
    ("DDIMScheduler", 20),
    ("DPMSolverMultistepScheduler", 10),
    ("DPMSolverMultistepScheduler", 20),
    ("DPMSolverMultistepScheduler+sde-dpmsolver++", 20),
]


def make_step_fn(model: torch.nn.Module, train_x, schedule, optim: OptimConfig, *, batch: int,
                 seed: int, autocast_dtype=None):
    """``step_fn(step) -> loss``, one step of ``diffusion.training.train_loop`` per call (batch
    draw, loss, backward, AdamW, EMA; unconditional), and the EMA."""
    ema = EMA(model, decay=0.999)
    steps = train_loop(model, train_x, None, schedule, optim, batch_size=batch,
                       generator=torch.Generator().manual_seed(seed), ema=ema,
                       autocast_dtype=autocast_dtype)
    return (lambda step: next(steps)["loss"]), ema


def train_for_budget(step_fn, budget_s: float, warmup_steps: int = 20):
    """Call ``step_fn(step) -> loss`` until ``budget_s`` seconds have passed; returns stats with
    steady-state images/s measured after ``warmup_steps`` steps."""
    t0 = time.perf_counter()
    step, loss, t_steady, steps_steady = 0, float("nan"), None, 0
    while time.perf_counter() - t0 < budget_s:
        loss = step_fn(step)
        step += 1
        if step == warmup_steps:
            t_steady = time.perf_counter()
        elif step > warmup_steps:
            steps_steady += 1
    elapsed = time.perf_counter() - t0
    steady = (time.perf_counter() - t_steady) if t_steady else elapsed
    return {
        "steps": step,
        "seconds": elapsed,
        "final_loss": loss,
        "steady_steps": steps_steady,
        "steady_seconds": steady,
    }


def interleaved_throughput(step_fns: dict, batch: int, log, rounds: int = 7, steps: int = 15):
    """Training images/s of each step function, measured in interleaved rounds after a warm-up;
    returns {name: {"median", "rounds"}} and the ratios to the last entry (the peer)."""
    for fn in step_fns.values():
        for i in range(5):
            fn(i)
    rates: dict[str, list[float]] = {name: [] for name in step_fns}
    for _ in range(rounds):
        for name, fn in step_fns.items():
            t0 = time.perf_counter()
            for i in range(steps):
                fn(i)
            rates[name].append(steps * batch / (time.perf_counter() - t0))
    out = {n: {"median": statistics.median(r), "rounds": r} for n, r in rates.items()}
    ref = list(out)[-1]
    for name, r in out.items():
        r["ratio_to_" + ref] = r["median"] / out[ref]["median"]
        log(f"throughput {name}: {r['median']:,.0f} img/s (×{r['ratio_to_' + ref]:.2f} {ref})")
    return out


class Fd:
    """FD against the reference features, with the real-vs-real floor.

    ``__call__`` returns (FD, bootstrap SD): the SD over resamplings (with replacement) of the
    scored images, i.e. how much the score moves with the finite sample it is computed from.
    Differences between two samplers smaller than about twice their SDs are noise.
    """

    def __init__(self, net, reference_images, floor_images, resamples: int = 50):
        self.net = net
        self.resamples = resamples
        self.ref = feature_statistics(extract_features(net, reference_images))
        self.floor, self.floor_sd = self(floor_images)

    def __call__(self, images: torch.Tensor) -> tuple[float, float]:
        feats = extract_features(self.net, images)
        score = frechet_distance(*feature_statistics(feats), *self.ref)
        g = torch.Generator().manual_seed(0)
        boot = [
            frechet_distance(*feature_statistics(feats[idx]), *self.ref)
            for idx in (torch.randint(0, len(feats), (len(feats),), generator=g)
                        for _ in range(self.resamples))
        ]  # fmt: skip
        return score, statistics.stdev(boot)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=300, help="training seconds per model")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--models", type=Path, help="save the trained (EMA) weights here")
    ap.add_argument(
        "--eval-only", action="store_true", help="evaluate the weights saved in --models"
    )
    ap.add_argument("--bf16", action="store_true", help="also train ours with bf16 autocast")
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="SAMPLER:STEPS",
        help="evaluate only these sampler settings, e.g. dpmpp_2m_sde:20 DDPMScheduler:20",
    )
    ap.add_argument("--nll-images", type=int, default=200, help="val images for the NLL")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    splits = digits_splits(args.val_fraction)
    train_x = uint8_to_unit(torch.from_numpy(splits["train"][0]))
    train_y = torch.from_numpy(splits["train"][1])
    val_u8 = torch.from_numpy(splits["val"][0])
    val_x, val_y = uint8_to_unit(val_u8), torch.from_numpy(splits["val"][1])
    log(f"digits: {len(train_x)} train / {len(val_x)} val")

    t = time.perf_counter()
    fnet = train_feature_net(train_x, train_y, FeatureNetConfig(), steps=1500, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    floor_idx = torch.randperm(len(train_x), generator=g)[: args.samples]
    fd = Fd(fnet, val_x, train_x[floor_idx])
    log(
        f"feature net: val accuracy {accuracy(fnet, val_x, val_y):.3f} "
        f"({time.perf_counter() - t:.0f}s); real-vs-real FD floor {fd.floor:.3f}"
    )

    schedule = NoiseSchedule.linear(1000)
    optim = OptimConfig(steps=10**9, lr=2e-3, warmup_steps=100, min_lr_ratio=1.0)  # constant LR
    results: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "budget_seconds": args.budget,
        "batch_size": args.batch,
        "num_samples": args.samples,
        "val_images": len(val_x),
        "feature_net_val_accuracy": accuracy(fnet, val_x, val_y),
        "fd_floor": fd.floor,
        "fd_floor_bootstrap_sd": fd.floor_sd,
        "models": {},
    }

    def run_model(name: str, model: torch.nn.Module, samplers, autocast_dtype=None):
        torch.manual_seed(args.seed)
        step_fn, ema = make_step_fn(model, train_x, schedule, optim, batch=args.batch,
                                    seed=args.seed, autocast_dtype=autocast_dtype)

        n_params = sum(p.numel() for p in model.parameters())
        saved = args.models / name if args.models else None
        if args.eval_only:  # reuse the weights and training numbers of an earlier run
            state, stats = load_model(saved)
            model.load_state_dict(state)
            log(f"[{name}] loaded {saved} (trained earlier: {stats['steps']} steps)")
        else:
            log(f"[{name}] {n_params / 1e6:.2f}M parameters; training for {args.budget:.0f}s")
            stats = train_for_budget(step_fn, args.budget)
            ema.copy_to(model)
            if saved:
                save_model(saved, model.state_dict(), stats)
        ips = stats["steady_steps"] * args.batch / stats["steady_seconds"]
        log(
            f"[{name}] {stats['steps']} steps, {ips:,.0f} img/s steady, "
            f"final loss {stats['final_loss']:.4f}"
        )
        model.eval()
        den = Denoiser(model, schedule, "eps")
        t0 = time.perf_counter()
        nll_x = val_u8[: args.nll_images]
        nll = nll_bits_per_dim(den, nll_x, generator=torch.Generator().manual_seed(1))
        bpd, se = nll.mean_and_stderr()
        log(f"[{name}] val NLL {bpd:.3f} ± {se:.3f} bits/dim ({time.perf_counter() - t0:.0f}s)")
        rows = []
        if args.only is not None:
            samplers = [(n, k) for n, k in samplers if f"{n}:{k}" in args.only]
        for sampler, steps in samplers:
            t0 = time.perf_counter()
            with torch.no_grad():
                x = sample_fn(name, den, model, sampler, steps)
            secs = time.perf_counter() - t0
            score, score_sd = fd(x.clamp(-1, 1))
            rows.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "fd": score,
                    "fd_bootstrap_sd": score_sd,
                    "images_per_second": args.samples / secs,
                }
            )
            log(
                f"[{name}] {sampler:>28} {steps:>5} steps  FD {score:7.3f} ± {score_sd:.3f} "
                f"(floor {fd.floor:.3f})  {args.samples / secs:8.1f} img/s"
            )
        results["models"][name] = {
            "parameters": n_params,
            "train_steps": stats["steps"],
            "train_images_per_second": ips,
            "final_loss": stats["final_loss"],
            "val_nll_bits_per_dim": bpd,
            "val_nll_stderr": se,
            "samplers": rows,
        }

    def sample_fn(name, den, model, sampler, steps):
        if name.startswith("ours"):
            noise = SampleNoise(args.seed, range(args.samples))
            return sample(den, (1, 8, 8), noise, SamplerConfig(sampler, steps=steps))
        return diffusers_sample(model.unet, sampler, steps, args.samples, args.seed)

    ours_cfg = dataclasses.replace(DIGITS_UNET, num_classes=None)  # unconditional, as the peer
    # Throughput side by side: fresh copies of each model, training steps interleaved in rounds
    # so that machine noise hits every model alike; medians of the per-round rates.
    contenders = {"ours": (UNet(ours_cfg), None)}
    if args.bf16:
        contenders["ours-bf16"] = (UNet(ours_cfg), torch.bfloat16)
    peer_ok = not args.skip_peer and importlib.util.find_spec("diffusers") is not None
    if peer_ok:
        contenders["diffusers"] = (DiffusersEps(args.seed), None)
    results["throughput"] = interleaved_throughput(
        {n: make_step_fn(m, train_x, schedule, optim, batch=args.batch, seed=args.seed,
                         autocast_dtype=dt)[0] for n, (m, dt) in contenders.items()},
        args.batch, log,
    )

    torch.manual_seed(args.seed)
    ours = UNet(ours_cfg)
    run_model("ours", ours, OUR_SAMPLERS)
    if args.bf16:
        torch.manual_seed(args.seed)
        run_model("ours-bf16", UNet(ours_cfg), BF16_SAMPLERS, autocast_dtype=torch.bfloat16)

    if peer_ok:
        run_model("diffusers", DiffusersEps(args.seed), PEER_SAMPLERS)
    elif not args.skip_peer:
        log("diffusers is not installed: skipping the peer comparison (pip install diffusers)")

    write_results(results, args.out)


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel behind our model signature ``f(x_t, t, labels) -> ε̂``."""

    def __init__(self, seed: int):
        from diffusers import UNet2DModel

        super().__init__()
        torch.manual_seed(seed)
        # Same widths, depth and attention placement as ours: (32, 64) channels, one res block
        # per level, self-attention at 4×4.
        self.unet = UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=16,
        )

    def forward(self, xt, t, labels=None):
        return self.unet(xt, t).sample


def diffusers_sample(unet, scheduler_name: str, steps: int, n: int, seed: int) -> torch.Tensor:
    import diffusers

    cls_name, _, algorithm = scheduler_name.partition("+")
    extra = {"algorithm_type": algorithm} if algorithm else {}
    scheduler = getattr(diffusers, cls_name)(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **extra
    )
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 8, 8), generator=g)
    for t in scheduler.timesteps:
        out = unet(x, t).sample
        x = scheduler.step(out, t, x, generator=g).prev_sample
    return x


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "digits.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Digits benchmark",
        "",
        f"Command: `{results['command']}`  ",
        *(
            [
                "Weights and training numbers: an earlier run of the same command without "
                "`--eval-only` (it trained each model for the budget and saved it to `--models`).  "
            ]
            if "--eval-only" in results["command"]
            else []
        ),
        f"Machine: {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, "
        f"{results['machine']['platform']}  ",
        f"Budget {results['budget_seconds']:.0f}s of training per model, batch "
        f"{results['batch_size']}; FD of {results['num_samples']} samples vs "
        f"{results['val_images']} held-out images in a digits classifier's features "
        f"(val accuracy {results['feature_net_val_accuracy']:.3f}); real-vs-real floor "
        f"**{results['fd_floor']:.3f}** (± {results['fd_floor_bootstrap_sd']:.3f}). "
        "± is the bootstrap SD of each FD over resamplings of its 1,000 samples.",
        "",
        "| model | params | train img/s | steps | final loss | val NLL (bits/dim) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        lines.append(
            f"| {name} | {m['parameters'] / 1e6:.2f}M | {m['train_images_per_second']:,.0f}"
            f" | {m['train_steps']} | {m['final_loss']:.4f} | "
            f"{m['val_nll_bits_per_dim']:.3f} ± {m['val_nll_stderr']:.3f} |"
        )
    if "throughput" in results:
        lines += ["", "Training throughput, interleaved rounds (median images/s):", "",
                  "| model | img/s | ratio |", "|---|---:|---:|"]  # fmt: skip
        for name, r in results["throughput"].items():
            ratio = next(v for k, v in r.items() if k.startswith("ratio_to_"))
            lines.append(f"| {name} | {r['median']:,.0f} | ×{ratio:.2f} |")
    lines += ["", "| model | sampler | steps | FD ↓ | sampling img/s |", "|---|---|---:|---:|---:|"]
    for name, m in results["models"].items():
        for r in m["samplers"]:
            lines.append(
                f"| {name} | {r['sampler']} | {r['steps']} | {r['fd']:.3f} ± "
                f"{r['fd_bootstrap_sd']:.3f} | "
                f"{r['images_per_second']:,.1f} |"
            )
    (out / "digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

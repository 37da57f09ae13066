"""The evaluation stage: how good is a trained model, measured the same way every time.

For one model (a training checkpoint, a saved model directory, or a registered
``models:/<name>@<alias>`` / ``models:/<name>/<version>``) and the dataset version it was trained
on, :func:`evaluate` computes

- **NLL** in bits/dim on the val split: the variational bound of ``diffusion.likelihood``
  (discretised Gaussian decoder, every KL term, the prior), its mean and standard error;
- **sample quality**: the Fréchet distance between generated samples and the val split. With
  ``evaluate.inception_weights`` (a local safetensors file; nothing is downloaded) the features
  are the FID Inception-v3's and the score is FID. Otherwise they come from a small reference
  classifier (``diffusion.metrics.FeatureNet``) trained once on the dataset's own train split,
  stored under ``ROOT/reference/`` and identified by its weights' SHA-256, so every model trained
  on that dataset version is scored by the same network (it is fitted on 4/5 of the train
  split). Beside it, the *floor*: the same distance between the held-out fifth of the train split
  (up to as many images as samples) and the val split, what real data scores;
- **memorization**: the share of samples whose nearest training image is closer than
  ``evaluate.memorization_threshold`` (RMS distance, pixels in [0, 1]); the same share for the
  val images (held-out real data) is reported as its floor;
- the **quality-vs-cost frontier**: the Fréchet distance and images/s for each sampler setting
  in ``evaluate.frontier``. The *default* sampler is the cheapest setting (fewest network
  evaluations) within ``evaluate.tolerance`` of the best distance; the headline ``fd`` is the
  distance at that default, i.e. what a user gets without choosing.

Sample i depends only on (``evaluate.seed``, i) and the sampler setting, and the real images are
a fixed split, so two models evaluated with the same settings are judged on the same evaluation
set and seeds. That identity is the ``eval_key``; the promotion gate compares two models only
under the same key. Results are cached at ``ROOT/evaluations/<weights sha[:16]>/<eval_key>.json``:
re-evaluating an unchanged model is a read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.datasets import DataConfig, open_dataset
from tasks.errors import EvalError
from tasks.models import LoadedModel, load_model_ref
from tasks.pixels import read_split
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, atomic_write_bytes, call, exists, read_json

FORMAT = "diffusion-pipeline/evaluation"
REFERENCE_DIR = "reference"
EVALUATIONS_DIR = "evaluations"
# Every FLOOR_EVERY-th train row is kept out of the reference network's training: a network
# scores the images it was fitted on differently from unseen ones, so the real-vs-real floor
# compares these held-out rows (as unseen as the val split and the samples) with the val split.
FLOOR_EVERY = 5


def _setting(text: str) -> tuple[str, int]:
    from diffusion.samplers import SamplerConfig

    name, sep, steps = text.partition(":")
    if not sep or not steps.strip().isdigit():
        raise ValueError(f"evaluate.frontier entry {text!r} must be sampler:steps, e.g. ddim:10")
    try:
        SamplerConfig(name.strip(), steps=int(steps))
    except (KeyError, ValueError) as e:
        raise ValueError(f"evaluate.frontier entry {text!r}: {e}") from None
    return name.strip(), int(steps)


class EvalConfig(BaseModel):
    """The ``evaluate`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_samples: int = Field(500, ge=2, description="Generated images per sampler setting.")
    seed: int = Field(2024, description="Sample i uses noise stream (seed, i).")
    guidance_scale: float = Field(1.5, ge=0, description="Classifier-free guidance "
                                  "(conditional models; 1 = none).")
    frontier: list[str] = Field(
        default_factory=lambda: ["ddim:10", "dpmpp_2m:10", "dpmpp_2m:20"],
        min_length=1, description="Sampler settings as sampler:steps (each costs num_samples × "
        "NFE network calls; add e.g. ddim:50 to see where quality saturates).")
    tolerance: float = Field(0.1, ge=0, description="Default sampler: the cheapest within "
                             "(1 + tolerance) × the best distance.")
    nll_images: int = Field(16, ge=0, description="Val images for bits/dim (0: skip; T network "
                            "calls per image).")
    memorization_threshold: float = Field(0.05, gt=0, description="RMS pixel distance in [0, 1] "
                                          "below which a sample copies a training image.")
    inception_weights: str | None = Field(
        None, description="FID Inception-v3 weights (local .safetensors): FID instead of the "
        "reference network's distance.")
    reference_steps: int = Field(600, ge=1, description="Training steps of the reference net.")
    max_real_images: int = Field(10_000, ge=2, description="Cap on real images per split used.")
    batch_size: int = Field(250, ge=1, description="Images per sampling batch.")
    device: str = Field("auto", description="auto (CUDA when available), cpu or cuda[:N].")
    on_ray: bool = Field(
        False, description="Run the evaluation as one Ray task (on a GPU node with "
        "ray_gpus: 1) instead of in the calling process, the flow run. A stored result is "
        "still found without Ray.")
    ray_gpus: float = Field(0, ge=0, description="GPUs the Ray evaluation task asks for.")
    ray_cpus: float = Field(1, gt=0, description="CPUs the Ray evaluation task asks for.")

    @model_validator(mode="after")
    def _placement(self) -> EvalConfig:
        if self.ray_gpus and not self.on_ray:
            raise ValueError("evaluate.ray_gpus applies to an evaluation on Ray: set "
                             "evaluate.on_ray: true as well (or ray_gpus: 0)")
        return self

    @field_validator("frontier")
    @classmethod
    def _frontier(cls, v: list[str]) -> list[str]:
        seen = []
        for item in v:
            name, steps = _setting(item)
            if f"{name}:{steps}" not in seen:
                seen.append(f"{name}:{steps}")
        return seen


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"evaluate.device={name} but CUDA is not available; use auto or cpu")
    return dev


# --------------------------------------------------------------------------------------------
# Feature networks
# --------------------------------------------------------------------------------------------


@dataclass
class Features:
    """Maps uint8 images to feature vectors; ``kind`` is 'fid' or 'reference'."""

    kind: str
    sha256: str
    net: Any
    device: Any
    batch_size: int = 500

    def __call__(self, images_uint8: np.ndarray):
        import torch

        from diffusion.pixels import uint8_to_unit

        out = []
        with torch.no_grad():
            for i in range(0, len(images_uint8), self.batch_size):
                x = uint8_to_unit(torch.from_numpy(images_uint8[i:i + self.batch_size]))
                out.append(self.net.features(x.to(self.device)).float().cpu())
        return torch.cat(out).double()


def reference_features(root: Location, manifest: dict, cfg: EvalConfig, device, echo, *,
                       stored_only: bool = False) -> Features | None:
    """The dataset version's reference network, trained on first use and stored under
    ``ROOT/reference/<name>/<version>/featurenet-<settings>/`` (safetensors + JSON, config
    last). Unlabelled datasets get the same architecture with a fixed random initialisation
    (random-feature Fréchet distance), equally reproducible. ``stored_only``: None instead of
    training one."""
    import torch

    from diffusion.metrics import FeatureNet, FeatureNetConfig, accuracy, train_feature_net
    from diffusion.pixels import uint8_to_unit
    from diffusion.serialization import load_model_bytes, save_model_bytes, sha256_hex

    labelled = bool(manifest.get("class_names"))
    net_cfg = FeatureNetConfig(in_channels=manifest["shape"][0],
                               num_classes=max(1, len(manifest.get("class_names") or [])))
    settings = {"net": net_cfg.__dict__, "steps": cfg.reference_steps if labelled else 0,
                "max_rows": cfg.max_real_images, "seed": 0, "held_out_every": FLOOR_EVERY}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    where = root.child(REFERENCE_DIR, manifest["name"], manifest["version"], f"featurenet-{tag}")
    weights_loc, config_loc = where.child("model.safetensors"), where.child("config.json")
    if exists(config_loc):
        weights = call(weights_loc, weights_loc.fs.cat_file, weights_loc.path)
        config_bytes = call(config_loc, config_loc.fs.cat_file, config_loc.path)
        state, _ = load_model_bytes(weights, config_bytes, name=weights_loc.describe())
        net = FeatureNet(net_cfg)
        net.load_state_dict(state, strict=True)
        echo(f"reference network {where.describe()} (sha256 {sha256_hex(weights)[:12]})")
        return Features("reference", sha256_hex(weights), net.eval().to(device), device)
    if stored_only:
        return None

    t0 = time.perf_counter()
    if labelled:
        x, y = read_split(root, manifest, "train", cfg.max_real_images)
        fit = np.arange(len(x)) % FLOOR_EVERY != 0  # every FLOOR_EVERY-th row: the floor's
        x, y = x[fit], y[fit]
        keep = y >= 0
        x, y = x[keep], y[keep]
        if len(x) < 2:
            raise EvalError(f"dataset {manifest['name']}@{manifest['version']} has no labelled "
                            "train rows to fit the reference network on")
        images, labels = uint8_to_unit(torch.from_numpy(x)), torch.from_numpy(y)
        echo(f"training the reference network on {len(x)} train images "
             f"({cfg.reference_steps} steps; once per dataset version)")
        net = train_feature_net(images, labels, net_cfg, steps=cfg.reference_steps)
        vx, vy = read_split(root, manifest, "val", cfg.max_real_images)
        keep = vy >= 0
        val_acc = accuracy(net, uint8_to_unit(torch.from_numpy(vx[keep])),
                           torch.from_numpy(vy[keep])) if keep.any() else float("nan")
    else:
        torch.manual_seed(0)
        net, val_acc = FeatureNet(net_cfg).eval(), float("nan")
    weights, config_bytes = save_model_bytes(
        net.state_dict(), {"feature_net": net_cfg.__dict__, "settings": settings,
                           "dataset": {"name": manifest["name"], "version": manifest["version"]},
                           "val_accuracy": None if math.isnan(val_acc) else val_acc})
    atomic_write_bytes(weights_loc, weights)
    atomic_write_bytes(config_loc, config_bytes)  # last: marks the network complete
    echo(f"reference network saved to {where.describe()} in {time.perf_counter() - t0:.1f}s"
         + ("" if math.isnan(val_acc) else f" (val accuracy {val_acc:.1%})"))
    return Features("reference", sha256_hex(weights), net.eval().to(device), device)


def fid_features(path: str, device, echo) -> Features:
    from diffusion.inception import load_fid_inception
    from diffusion.serialization import sha256_hex

    try:
        with open(path, "rb") as f:
            digest = sha256_hex(f.read())
    except OSError as e:
        raise EvalError(f"evaluate.inception_weights {path}: {e}; give a local .safetensors "
                        "file (see README: FID)") from None
    net = load_fid_inception(path).eval().to(device)
    echo(f"FID Inception-v3 from {path} (sha256 {digest[:12]})")
    return Features("fid", digest, net, device, batch_size=50)  # 299×299 activations are big


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def eval_key(manifest: dict, cfg: EvalConfig, features: Features, n_val: int) -> str:
    """What makes two evaluations comparable: the evaluation set, seeds, sample counts, sampler
    settings and the feature network."""
    payload = {
        "dataset": [manifest["name"], manifest["version"]], "n_val": n_val,
        "features": [features.kind, features.sha256],
        **cfg.model_dump(include={"num_samples", "seed", "guidance_scale", "frontier",
                                  "tolerance", "nll_images", "memorization_threshold",
                                  "max_real_images"}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def sample_labels(val_labels: np.ndarray, n: int, seed: int, num_classes: int | None):
    """Labels for n samples following the val split's class proportions (fixed by the seed), or
    None for unconditional models / unlabelled data."""
    if num_classes is None:
        return None
    known = val_labels[val_labels >= 0]
    if len(known) == 0:
        return None
    rng = np.random.default_rng(seed)
    return known[rng.permutation(len(known))][np.arange(n) % len(known)]


def floor_images(train_x: np.ndarray, train_y: np.ndarray, val_y: np.ndarray, n: int,
                 seed: int) -> np.ndarray:
    """Up to n held-out train images (rows the reference network never saw) with the val
    split's class proportions, the same proportions the samples are drawn with (the class mix
    alone moves a Fréchet distance in a classifier's feature space)."""
    rows = np.flatnonzero(np.arange(len(train_x)) % FLOOR_EVERY == 0)
    rng = np.random.default_rng(seed)
    labels = sample_labels(val_y, min(n, len(rows)), seed, num_classes=1)
    if labels is None:
        return train_x[rng.permutation(rows)[:n]]
    pools = {c: list(rng.permutation(rows[train_y[rows] == c])) for c in np.unique(labels)}
    picked = [pools[c].pop() for c in labels if pools.get(c)]
    if len(picked) < len(labels):  # a class ran out of held-out rows: fill with any others
        taken = set(picked)
        rest = [r for r in rng.permutation(rows) if r not in taken]
        picked += rest[:len(labels) - len(picked)]
    return train_x[np.array(picked, dtype=np.int64)]


def generate(loaded: LoadedModel, n: int, name: str, steps: int, cfg: EvalConfig, labels,
             device) -> tuple[np.ndarray, float]:
    """n uint8 samples with one sampler setting, in batches; sample i uses stream (seed, i).
    Returns the images and images/s."""
    import torch

    from diffusion import SampleNoise, SamplerConfig
    from diffusion.pipeline import DiffusionConfig, sample_images

    diff = DiffusionConfig.from_dict(loaded.config["diffusion"])
    schedule = diff.build_schedule()
    unet = loaded.config["unet"]
    shape = (unet["in_channels"], unet["resolution"], unet["resolution"])
    t0 = time.perf_counter()
    images = sample_images(
        loaded.model.to(device), schedule, shape, SampleNoise(cfg.seed, range(n), device=device),
        SamplerConfig(name, steps=min(steps, schedule.T)), prediction=diff.prediction,
        labels=labels, guidance_scale=cfg.guidance_scale, null_label=unet.get("num_classes"),
        batch_size=cfg.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return images.numpy(), n / max(seconds, 1e-9)


def nearest_rms(queries: np.ndarray, reference: np.ndarray, device, chunk: int = 4096):
    """For each query image, the RMS distance (pixels in [0, 1]) to its nearest reference image."""
    import torch

    q = torch.from_numpy(queries.reshape(len(queries), -1)).to(device, torch.float32) / 255.0
    best = torch.full((len(q),), float("inf"), device=device)
    for i in range(0, len(reference), chunk):
        r = torch.from_numpy(reference[i:i + chunk].reshape(-1, q.shape[1]))
        d = torch.cdist(q, r.to(device, torch.float32) / 255.0)
        best = torch.minimum(best, d.min(dim=1).values)
    return (best / math.sqrt(q.shape[1])).cpu().numpy()


def evaluate(model_ref: str, data: DataConfig, cfg: EvalConfig, runtime: RuntimeConfig, *,
             dataset_version: str | None = None, echo=print, use_cache: bool = True,
             stored_only: bool = False) -> dict | None:
    """Evaluate ``model_ref`` on ``data.name`` at ``dataset_version`` (default: the version the
    model was trained on when recorded, else ``data.version``/the latest). Returns the
    evaluation dict (JSON-safe) also stored under ``ROOT/evaluations/``. In this process, on
    ``evaluate.device``; :func:`run_evaluation` places it where ``evaluate.on_ray`` says.

    ``stored_only``: return the stored result, or None where there is none (nothing is
    computed; the reference network is not trained)."""
    import torch

    from diffusion import Denoiser, nll_bits_per_dim
    from diffusion.metrics import feature_statistics, frechet_distance
    from diffusion.pipeline import DiffusionConfig
    from diffusion.samplers import network_evaluations

    t_start = time.perf_counter()
    root = runtime.root_location()
    loaded = load_model_ref(model_ref, runtime)
    trained_on = (loaded.config.get("dataset") or {})
    version = dataset_version or data.version or (
        trained_on.get("version") if trained_on.get("name") == data.name else None)
    ref, manifest = open_dataset(root, data.name, version)
    unet = loaded.config["unet"]
    if [unet["in_channels"], unet["resolution"], unet["resolution"]] != list(manifest["shape"]):
        raise EvalError(f"model {loaded.source} makes {unet['in_channels']}x{unet['resolution']}"
                        f"x{unet['resolution']} images but dataset {ref.name}@{ref.version} holds "
                        f"{'x'.join(map(str, manifest['shape']))}; evaluate it on the dataset it "
                        "was trained on (data.name / data.version)")
    device = _device(cfg.device)
    val_x, val_y = read_split(root, manifest, "val", cfg.max_real_images)
    if len(val_x) < 2:
        raise EvalError(f"dataset {ref.name}@{ref.version} has {len(val_x)} val images; the "
                        "Fréchet distance needs at least 2 (raise data.val_fraction)")
    if stored_only and cfg.inception_weights and not os.path.isfile(cfg.inception_weights):
        return None  # the weights live where the evaluation runs (a Ray node), not here
    features = (fid_features(cfg.inception_weights, device, echo) if cfg.inception_weights
                else reference_features(root, manifest, cfg, device, echo,
                                        stored_only=stored_only))
    if features is None:
        return None
    key = eval_key(manifest, cfg, features, len(val_x))
    cache = root.child(EVALUATIONS_DIR, loaded.weights_sha256[:16], f"{key}.json")
    if use_cache and exists(cache):
        result = read_json(cache)
        echo(f"evaluation {key} of this model found at {cache.describe()}; reusing it")
        return result | {"stored_at": cache.describe(), "reused": True}
    if stored_only:
        return None

    echo(f"evaluating {loaded.source} on {ref.name}@{ref.version} ({len(val_x)} val images, "
         f"{cfg.num_samples} samples per setting, eval key {key})")
    real = features(val_x)
    real_stats = feature_statistics(real)
    train_x, train_y = read_split(root, manifest, "train", cfg.max_real_images)
    num_classes = unet.get("num_classes")
    labels = sample_labels(val_y, cfg.num_samples, cfg.seed, num_classes)
    floor_x = floor_images(train_x, train_y, val_y, cfg.num_samples, cfg.seed)
    fd_floor = (frechet_distance(*feature_statistics(features(floor_x)), *real_stats)
                if len(floor_x) >= 2 else None)  # None: too few train rows to hold out
    frontier, samples_at = [], {}
    for item in cfg.frontier:
        name, steps = _setting(item)
        images, ips = generate(loaded, cfg.num_samples, name, steps, cfg, labels, device)
        fd = frechet_distance(*feature_statistics(features(images)), *real_stats)
        nfe = network_evaluations(name, min(steps, loaded.config["diffusion"]["T"]))
        guided = num_classes is not None and labels is not None and cfg.guidance_scale != 1.0
        frontier.append({"sampler": name, "steps": steps, "fd": fd, "images_per_s": ips,
                         "nfe": nfe * (2 if guided else 1)})
        samples_at[item] = images
        echo(f"  {name:>10} {steps:>4} steps: FD {fd:8.3f}  {ips:8.1f} img/s  "
             f"(NFE {frontier[-1]['nfe']})")
    best = min(f["fd"] for f in frontier)
    ok = [f for f in frontier if f["fd"] <= best * (1 + cfg.tolerance)]
    default = min(ok, key=lambda f: (f["nfe"], f["fd"]))
    default_images = samples_at[f"{default['sampler']}:{default['steps']}"]

    near = nearest_rms(default_images, train_x, device)
    near_val = nearest_rms(val_x, train_x, device)
    memorization = float((near < cfg.memorization_threshold).mean())
    memorization_floor = float((near_val < cfg.memorization_threshold).mean())

    nll = {}
    if cfg.nll_images:
        diff = DiffusionConfig.from_dict(loaded.config["diffusion"])
        schedule = diff.build_schedule()
        x = torch.from_numpy(val_x[:cfg.nll_images]).to(device)
        lab = None
        if num_classes is not None:
            y = torch.from_numpy(val_y[:cfg.nll_images])
            lab = torch.where(y < 0, torch.full_like(y, num_classes), y).to(device)
        totals = []
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        for i in range(0, len(x), 64):
            den = Denoiser(loaded.model.to(device), schedule, diff.prediction,
                           labels=None if lab is None else lab[i:i + 64])
            totals.append(nll_bits_per_dim(den, x[i:i + 64], generator=gen).total.cpu())
        total = torch.cat(totals)
        se = float(total.std(unbiased=True) / math.sqrt(len(total))) if len(total) > 1 else 0.0
        nll = {"nll_bpd": float(total.mean()), "nll_bpd_se": se}
        echo(f"  NLL {nll['nll_bpd']:.3f} ± {se:.3f} bits/dim on {len(total)} val images")

    result = {
        "format": FORMAT,
        "eval_key": key,
        "model": {"source": loaded.source, "weights_sha256": loaded.weights_sha256},
        "dataset": {"name": ref.name, "version": ref.version, "val_images": len(val_x),
                    "train_images": len(train_x), "floor_images": len(floor_x)},
        "features": {"kind": features.kind, "sha256": features.sha256},
        "metrics": {
            "fd": default["fd"], "fd_floor": fd_floor, "fd_best": best, **nll,
            "memorization": memorization, "memorization_floor": memorization_floor,
        },
        "frontier": frontier,
        "default_sampler": {"name": default["sampler"], "steps": default["steps"]},
        "guidance_scale": cfg.guidance_scale,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_bytes(cache, json.dumps(result, indent=2).encode())
    echo(f"FD {default['fd']:.3f} at {default['sampler']}:{default['steps']} (floor "
         f"{_num(fd_floor)}, best {best:.3f}); memorization {memorization:.1%} (floor "
         f"{memorization_floor:.1%}); stored {cache.describe()}")
    return result | {"stored_at": cache.describe(), "reused": False}


def run_evaluation(model_ref: str, data: DataConfig, cfg: EvalConfig, runtime: RuntimeConfig,
                   *, dataset_version: str | None = None, echo=print) -> dict:
    """:func:`evaluate`, where ``evaluate.on_ray`` puts it.

    Off Ray (the default) it runs in this process. On Ray it is one task asking for
    ``ray_gpus``/``ray_cpus``, so a flow run on a CPU-only pod evaluates on a GPU node; its
    progress lines reach this process through Ray's worker-log forwarding. A stored result is
    looked up here first, on the CPU, so an unchanged rerun neither starts nor joins Ray."""
    if not cfg.on_ray:
        return evaluate(model_ref, data, cfg, runtime, dataset_version=dataset_version,
                        echo=echo)
    found = evaluate(model_ref, data, cfg.model_copy(update={"device": "cpu"}), runtime,
                     dataset_version=dataset_version, echo=echo, stored_only=True)
    if found is not None:
        return found
    import ray

    from tasks.runtime import ensure_ray

    ensure_ray(runtime, echo=echo)
    echo(f"evaluating {model_ref} as a Ray task ({cfg.ray_cpus:g} CPU"
         + (f", {cfg.ray_gpus:g} GPU" if cfg.ray_gpus else "") + ")")
    remote = ray.remote(num_cpus=cfg.ray_cpus, num_gpus=cfg.ray_gpus,
                        max_retries=0)(_evaluate_on_worker)  # retried as a whole by the task
    try:
        return ray.get(remote.remote(model_ref, data, cfg, runtime, dataset_version))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):  # EvalError & co., as if raised here (the retry
            raise e.cause from None         # policy and the one-line CLI errors see them)
        raise


def _evaluate_on_worker(model_ref: str, data: DataConfig, cfg: EvalConfig,
                        runtime: RuntimeConfig, dataset_version: str | None) -> dict:
    import torch

    torch.set_num_threads(max(1, int(cfg.ray_cpus)))  # the task's CPUs, in a reused worker too
    return evaluate(model_ref, data, cfg, runtime, dataset_version=dataset_version,
                    echo=lambda m: print(f"[evaluate] {m}", flush=True))


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def table(result: dict) -> str:
    """The evaluation as a markdown table (CLI output, Prefect artifact, MLflow artifact)."""
    m = result["metrics"]
    kind = "FID" if result["features"]["kind"] == "fid" else "FD (reference net)"
    lines = [
        f"Evaluation {result['eval_key']} on {result['dataset']['name']}@"
        f"{result['dataset']['version']} ({result['dataset']['val_images']} val images)",
        "",
        "| metric | value | floor |",
        "|---|---:|---:|",
        f"| {kind} at default sampler ({result['config']['num_samples']} samples) | "
        f"{m['fd']:.3f} | {_num(m['fd_floor'])} ({result['dataset'].get('floor_images', '?')} "
        "held-out real) |",
    ]
    if "nll_bpd" in m:
        lines.append(f"| NLL bits/dim | {m['nll_bpd']:.3f} ± {m['nll_bpd_se']:.3f} | |")
    lines += [
        f"| memorization | {m['memorization']:.1%} | {m['memorization_floor']:.1%} |",
        "",
        "| sampler | steps | NFE | distance | images/s | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    d = result["default_sampler"]
    for f in result["frontier"]:
        mark = "default" if (f["sampler"], f["steps"]) == (d["name"], d["steps"]) else ""
        lines.append(f"| {f['sampler']} | {f['steps']} | {f['nfe']} | {f['fd']:.3f} | "
                     f"{f['images_per_s']:.1f} | {mark} |")
    return "\n".join(lines)

"""One evaluation in this process: load and check the model and the dataset, find the feature
network and a stored result, else sample every frontier setting, measure the floor,
memorization and NLL, and store the result. This is what the on-Ray evaluation task runs."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.datasets import DataConfig, DatasetRef, open_dataset
from tasks.errors import EvalError
from tasks.evaluate.config import EvalConfig, parse_setting
from tasks.evaluate.metrics import copy_share, default_setting, floor_images, sample_labels
from tasks.evaluate.reference import Features, fid_features, reference_features
from tasks.evaluate.result import (
    FORMAT,
    eval_key,
    features_location,
    result_location,
    summary,
    with_interval,
)
from tasks.models import LoadedModel, load_model_ref
from tasks.pixels import read_split
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, atomic_write_bytes, exists, read_json


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"evaluate.device={name} but CUDA is not available; use auto or cpu")
    return dev


@dataclass
class _Inputs:
    """What one evaluation reads first: the model, its dataset version and the split it is
    measured against (``evaluate.split``: val, or the locked test split for a report), held in
    ``val_x``/``val_y`` whichever it is."""

    root: Location
    loaded: LoadedModel
    ref: DatasetRef
    manifest: dict
    device: Any
    val_x: np.ndarray
    val_y: np.ndarray

    @property
    def num_classes(self) -> int | None:
        return self.loaded.config["unet"].get("num_classes")


def _open_inputs(model_ref: str, data: DataConfig, cfg: EvalConfig, runtime: RuntimeConfig,
                 dataset_version: str | None) -> _Inputs:
    """Load the model and open the dataset version it is evaluated on; refuse a model whose
    images are not the dataset's shape, or an evaluation split (``evaluate.split``) too small
    for a Fréchet distance."""
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
    val_x, val_y = read_split(root, manifest, cfg.split, cfg.max_real_images)
    if len(val_x) < 2:
        raise EvalError(f"dataset {ref.name}@{ref.version} has {len(val_x)} {cfg.split} images; "
                        f"the Fréchet distance needs at least 2 (raise data.{cfg.split}_fraction "
                        "and preprocess again)")
    return _Inputs(root, loaded, ref, manifest, device, val_x, val_y)


def _feature_net(inputs: _Inputs, cfg: EvalConfig, echo, stored_only: bool) -> Features | None:
    """The FID Inception (``evaluate.inception_weights``) or the dataset's reference network;
    None where ``stored_only`` finds neither here."""
    if stored_only and cfg.inception_weights and not os.path.isfile(cfg.inception_weights):
        return None  # the weights live where the evaluation runs (a Ray node), not here
    if cfg.inception_weights:
        return fid_features(cfg.inception_weights, inputs.device, echo)
    return reference_features(inputs.root, inputs.manifest, cfg, inputs.device, echo,
                              stored_only=stored_only)


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


def _floor(inputs: _Inputs, cfg: EvalConfig, features: Features, real_stats,
           train_x: np.ndarray, train_y: np.ndarray) -> tuple[np.ndarray, Any, float | None]:
    """The floor: held-out train images (:func:`floor_images`), their features and their
    Fréchet distance to the val split, what real data scores."""
    from diffusion.metrics import feature_statistics, frechet_distance

    floor_x, floor_y = floor_images(train_x, train_y, inputs.val_y, cfg.num_samples, cfg.seed)
    floor_feats = features(floor_x) if len(floor_x) else None
    fd_floor = (frechet_distance(*feature_statistics(floor_feats), *real_stats)
                if len(floor_x) >= 2 else None)  # None: too few train rows to hold out
    return floor_x, floor_y, floor_feats, fd_floor


def _matched_fd(feats: np.ndarray, floor_rows: int, real_stats, fd: float | None
                ) -> float | None:
    """The default setting's FD on as many samples as the floor holds real images (its first
    ``floor_rows``, whose labels are dealt in the same proportions), against the same split:
    the figure ``fd_floor`` compares with. An FD's small-sample bias grows as the count shrinks,
    so a model's FD at 1000 samples read against a floor of 240 real images flatters the model
    (the digits' default read 0.25 × its floor that way). None without a floor."""
    import torch

    from diffusion.metrics import feature_statistics, frechet_distance

    if floor_rows < 2:
        return None
    if floor_rows >= len(feats):
        return fd
    return frechet_distance(*feature_statistics(torch.from_numpy(feats[:floor_rows])),
                            *real_stats)


# FD∞ fits a line in 1/N to FDs of subsets from half the rows to all of them; the line holds
# only where N is several times the feature width (the FD's higher-order terms in d/N fade):
# below FD_INF_ROWS_PER_FEATURE × width rows the figure is left out (None). On the digits'
# 64-d features the floor's 240 real images read FD∞ 1.14 where their KID read 0.09 and the
# models' 0.14 (benchmarks/results/test_split_quality.md): the fit at 120–240 rows overshoots.
FD_INF_ROWS_PER_FEATURE = 4


def _class_strata(rows_labels: np.ndarray | None, reference_labels: np.ndarray
                  ) -> tuple[dict, str]:
    """The ``labels``/``reference_labels`` arguments that stratify :mod:`diffusion.fidelity`'s
    figures by class, for a set whose labels were dealt from the reference's (class-conditional
    samples, the floor's real images), and what was done, in words. Unstratified ({}) where
    the set has no labels, a label is unknown (−1), or a class holds fewer than 3 rows in
    either set (the stratified KID's within-class pairs need them)."""
    import torch

    from diffusion.fidelity import MIN_CLASS_ROWS

    if rows_labels is None:
        return {}, "none (the rows are not dealt by class)"
    if (reference_labels < 0).any() or (rows_labels < 0).any():
        return {}, "none (some labels are unknown)"
    classes = np.union1d(rows_labels, reference_labels)
    least = min(min(int((rows_labels == c).sum()), int((reference_labels == c).sum()))
                for c in classes)
    if least < MIN_CLASS_ROWS:
        return {}, (f"none (a class holds {least} rows; {MIN_CLASS_ROWS} are needed in each "
                    "set)")
    return ({"labels": torch.as_tensor(rows_labels),
             "reference_labels": torch.as_tensor(reference_labels)}, "by class")


def _fidelity(inputs: _Inputs, cfg: EvalConfig, features: Features, real_feats, feats,
              images: np.ndarray, labels: np.ndarray | None, floor_feats,
              floor_labels: np.ndarray | None) -> tuple[dict, dict]:
    """The figures comparable across sample sizes (:mod:`diffusion.fidelity`) for the default
    setting's samples and, beside them, for the floor's real images: KID with its jackknife
    interval, FD∞, and precision/recall at matched sizes (the first as many samples as the
    floor holds, against the whole reference: both figures depend on the set sizes); and the
    class accuracy of the samples under the reference network (labelled, class-conditional
    models; its floor: the same network's accuracy on the val images). KID and FD∞ are
    stratified by class where a set's labels were dealt from the reference's
    (:func:`_class_strata`): unstratified, such sets read below 0. Returns the metrics and
    what they were measured on. None where a set is too small for a figure."""
    import torch

    from diffusion.fidelity import fd_infinity, kid, precision_recall
    from diffusion.metrics import accuracy
    from diffusion.pixels import uint8_to_unit

    k = 3
    sets = {"": (feats, labels), "_floor": (floor_feats, floor_labels)}
    metrics: dict[str, Any] = {}
    strata_used: dict[str, str] = {}
    pr_rows = min(len(feats), len(floor_feats)) if floor_feats is not None else len(feats)
    for suffix, (f, set_labels) in sets.items():
        n = 0 if f is None else len(f)
        strata, strata_used[f"kid{suffix}_strata"] = (
            _class_strata(set_labels, inputs.val_y) if n else ({}, "none (no rows)"))
        if n >= 3 and len(real_feats) >= 3:
            e = kid(f, real_feats, level=cfg.interval_level, **strata)
            metrics |= {f"kid{suffix}": e.value, f"kid{suffix}_low": e.low,
                        f"kid{suffix}_high": e.high, f"kid{suffix}_se": e.se}
        else:
            metrics[f"kid{suffix}"] = None
        metrics[f"fd_inf{suffix}"] = (
            fd_infinity(f, real_feats, seed=cfg.seed, **strata).value
            if n >= FD_INF_ROWS_PER_FEATURE * f.shape[1] else None)
        if min(n, pr_rows) > k and len(real_feats) > k:
            pr = precision_recall(f[:pr_rows], real_feats, k=k)
            metrics |= {f"precision{suffix}": pr.precision, f"recall{suffix}": pr.recall}
        else:
            metrics |= {f"precision{suffix}": None, f"recall{suffix}": None}

    metrics |= {"class_accuracy": None, "class_accuracy_floor": None}
    if features.kind == "reference" and labels is not None:  # the reference net classifies
        device = inputs.device

        def acc(x: np.ndarray, y: np.ndarray) -> float:
            return accuracy(features.net, uint8_to_unit(torch.from_numpy(x)).to(device),
                            torch.from_numpy(y).to(device))

        metrics["class_accuracy"] = acc(images, labels)
        known = inputs.val_y >= 0
        if known.any():
            metrics["class_accuracy_floor"] = acc(inputs.val_x[known], inputs.val_y[known])
    return metrics, {"precision_recall_rows": pr_rows, "precision_recall_k": k,
                     "kid_interval": "delete-one jackknife (stratified with the KID), normal",
                     **strata_used}


def _frontier(inputs: _Inputs, cfg: EvalConfig, features: Features, real_feats, real_stats,
              labels, echo) -> tuple[list[dict], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each ``evaluate.frontier`` setting's distance to the val split (with its bootstrap
    interval), speed and network evaluations; the samples and their features, per setting."""
    import torch

    from diffusion.metrics import feature_statistics, frechet_distance, frechet_distance_interval
    from diffusion.samplers import network_evaluations

    loaded, num_classes = inputs.loaded, inputs.num_classes
    frontier, samples_at, features_at = [], {}, {}
    # class-conditional samples are dealt from the reference's labels: every setting's interval
    # resamples both within label (diffusion.metrics), as another draw of samples would vary
    strata = ({} if labels is None else
              {"labels": torch.as_tensor(labels),
               "reference_labels": torch.as_tensor(inputs.val_y)})
    for item in cfg.frontier:
        name, steps = parse_setting(item)
        images, ips = generate(loaded, cfg.num_samples, name, steps, cfg, labels, inputs.device)
        feats = features(images)
        nfe = network_evaluations(name, min(steps, loaded.config["diffusion"]["T"]))
        guided = num_classes is not None and labels is not None and cfg.guidance_scale != 1.0
        entry = {"sampler": name, "steps": steps, "fd": None, "images_per_s": ips,
                 "nfe": nfe * (2 if guided else 1)}
        if cfg.bootstrap_draws:
            ci = frechet_distance_interval(
                feats, real_feats, draws=cfg.bootstrap_draws, level=cfg.interval_level,
                seed=cfg.seed, **strata)
            # fd: the plain FD at num_samples (biased upwards by the finite sets); the interval
            # and fd_corrected: the population FD, the bias removed (diffusion.metrics.Interval)
            entry |= {"fd": ci.value, "fd_low": ci.low, "fd_high": ci.high,
                      "fd_corrected": ci.corrected}
        else:
            entry["fd"] = frechet_distance(*feature_statistics(feats), *real_stats)
        frontier.append(entry)
        samples_at[item] = images
        features_at[item] = feats.float().cpu().numpy()
        echo(f"  {name:>10} {steps:>4} steps: FD {with_interval(entry, 'fd'):>24}  "
             f"{ips:8.1f} img/s  (NFE {entry['nfe']})")
    return frontier, samples_at, features_at


def _nll(inputs: _Inputs, cfg: EvalConfig, echo) -> tuple[dict, np.ndarray]:
    """NLL in bits/dim on the first ``evaluate.nll_images`` val images: the variational bound of
    ``diffusion.likelihood`` (discretised Gaussian decoder, every KL term, the prior), its mean,
    standard error and bootstrap interval; and the per-image values."""
    import torch

    from diffusion import Denoiser, nll_bits_per_dim
    from diffusion.pipeline import DiffusionConfig

    loaded, device, num_classes = inputs.loaded, inputs.device, inputs.num_classes
    diff = DiffusionConfig.from_dict(loaded.config["diffusion"])
    schedule = diff.build_schedule()
    x = torch.from_numpy(inputs.val_x[:cfg.nll_images]).to(device)
    lab = None
    if num_classes is not None:
        y = torch.from_numpy(inputs.val_y[:cfg.nll_images])
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
    if cfg.bootstrap_draws and len(total) > 1:
        from diffusion.metrics import paired_mean_difference

        # the mean's interval: a paired difference against zero is the plain mean's bootstrap
        ci = paired_mean_difference(total, torch.zeros_like(total), draws=cfg.bootstrap_draws,
                                    level=cfg.interval_level, seed=cfg.seed)
        nll |= {"nll_bpd_low": ci.low, "nll_bpd_high": ci.high}
    echo(f"  NLL {nll['nll_bpd']:.3f} ± {se:.3f} bits/dim on {len(total)} val images")
    return nll, total.numpy()


def _paired_inputs(features_at: dict[str, np.ndarray], real_feats,
                   per_image_nll: np.ndarray | None, labels: np.ndarray | None,
                   reference_labels: np.ndarray) -> bytes:
    """The safetensors file of an evaluation's paired inputs: ``samples/<sampler:steps>``
    [N, F] features, ``reference`` [M, F] and ``nll`` [n] (float32; no pickle), and where the
    samples are class-conditional, ``labels`` [N] and ``reference_labels`` [M] (int64, −1:
    unlabelled), the strata the gate's bootstrap resamples within."""
    import safetensors.numpy

    tensors = {f"samples/{k}": np.ascontiguousarray(v, np.float32)
               for k, v in features_at.items()}
    tensors["reference"] = np.ascontiguousarray(np.asarray(real_feats.float().cpu()), np.float32)
    if labels is not None:
        tensors["labels"] = np.ascontiguousarray(labels, np.int64)
        tensors["reference_labels"] = np.ascontiguousarray(reference_labels, np.int64)
    if per_image_nll is not None:
        tensors["nll"] = np.ascontiguousarray(per_image_nll, np.float32)
    return safetensors.numpy.save(tensors)


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

    from diffusion.metrics import feature_statistics

    t_start = time.perf_counter()
    inputs = _open_inputs(model_ref, data, cfg, runtime, dataset_version)
    loaded, ref, val_x, device = inputs.loaded, inputs.ref, inputs.val_x, inputs.device
    features = _feature_net(inputs, cfg, echo, stored_only)
    if features is None:
        return None
    key = eval_key(inputs.manifest, cfg, features, len(val_x))
    cache = result_location(inputs.root, loaded.weights_sha256, key)
    if use_cache and exists(cache):
        result = read_json(cache)
        echo(f"evaluation {key} of this model found at {cache.describe()}; reusing it")
        return result | {"stored_at": cache.describe(), "reused": True}
    if stored_only:
        return None

    echo(f"evaluating {loaded.source} on {ref.name}@{ref.version} ({len(val_x)} {cfg.split} "
         f"images, {cfg.num_samples} samples per setting, eval key {key})")
    real_feats = features(val_x)
    real_stats = feature_statistics(real_feats)
    train_x, train_y = read_split(inputs.root, inputs.manifest, "train", cfg.max_real_images)
    labels = sample_labels(inputs.val_y, cfg.num_samples, cfg.seed, inputs.num_classes)
    floor_x, floor_y, floor_feats, fd_floor = _floor(inputs, cfg, features, real_stats,
                                                     train_x, train_y)
    frontier, samples_at, features_at = _frontier(inputs, cfg, features, real_feats,
                                                  real_stats, labels, echo)
    best, default = default_setting(frontier, cfg.tolerance)
    setting = f"{default['sampler']}:{default['steps']}"
    default_images, default_feats = samples_at[setting], features_at[setting]
    fidelity, fidelity_on = _fidelity(
        inputs, cfg, features, real_feats,
        torch.from_numpy(default_feats),
        default_images, labels, floor_feats, floor_y)
    threshold = cfg.memorization_threshold
    memorization = copy_share(default_images, train_x, threshold, device)
    memorization_floor = copy_share(val_x, train_x, threshold, device)
    nll, per_image_nll = _nll(inputs, cfg, echo) if cfg.nll_images else ({}, None)

    result = {
        "format": FORMAT,
        "eval_key": key,
        "model": {"source": loaded.source, "weights_sha256": loaded.weights_sha256},
        "dataset": {"name": ref.name, "version": ref.version, "split": cfg.split,
                    "val_images": len(val_x), "train_images": len(train_x),
                    "floor_images": len(floor_x)},
        "features": {"kind": features.kind, "sha256": features.sha256},
        "metrics": {
            "fd": default["fd"],
            **{k: default[k] for k in ("fd_low", "fd_high", "fd_corrected") if k in default},
            "fd_floor": fd_floor,
            "fd_matched": _matched_fd(default_feats, len(floor_x), real_stats, default["fd"]),
            "fd_best": best, **nll,
            "memorization": memorization, "memorization_floor": memorization_floor,
            **fidelity,
        },
        "fidelity": fidelity_on,
        "frontier": frontier,
        "default_sampler": {"name": default["sampler"], "steps": default["steps"]},
        "guidance_scale": cfg.guidance_scale,
        "config": cfg.model_dump(mode="json"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    # what a paired comparison with another model under this key needs (tasks.registry.gate):
    # the features of every setting's samples, the reference's, the per-image NLL; written
    # before the result, which is the commit
    atomic_write_bytes(features_location(cache), _paired_inputs(
        features_at, real_feats, per_image_nll, labels, inputs.val_y))
    atomic_write_bytes(cache, json.dumps(result, indent=2).encode())
    echo(summary(result, cache.describe()))
    return result | {"stored_at": cache.describe(), "reused": False}

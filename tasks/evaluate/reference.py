"""The feature networks a Fréchet distance is measured in.

With ``evaluate.inception_weights`` (a local safetensors file; nothing is downloaded) the
features are the FID Inception-v3's and the score is FID. Otherwise they come from a small
reference classifier (``diffusion.metrics.FeatureNet``) trained once on the dataset's own train
split, stored under ``ROOT/reference/`` and identified by its weights' SHA-256, so every model
trained on that dataset version is scored by the same network (it is fitted on 4/5 of the train
split; the held-out fifth is the real-vs-real floor's, see
:func:`tasks.evaluate.metrics.floor_images`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.errors import EvalError
from tasks.evaluate.config import EvalConfig
from tasks.pixels import read_split
from tasks.storage import Location, atomic_write_bytes, call, commit_bytes, exists

REFERENCE_DIR = "reference"
# Every FLOOR_EVERY-th train row is kept out of the reference network's training: a network
# scores the images it was fitted on differently from unseen ones, so the real-vs-real floor
# compares these held-out rows (as unseen as the val split and the samples) with the val split.
FLOOR_EVERY = 5


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
    from diffusion.metrics import FeatureNetConfig
    from diffusion.serialization import save_model_bytes, sha256_hex

    labelled = bool(manifest.get("class_names"))
    net_cfg = FeatureNetConfig(in_channels=manifest["shape"][0],
                               num_classes=max(1, len(manifest.get("class_names") or [])))
    settings = {"net": net_cfg.__dict__, "steps": cfg.reference_steps if labelled else 0,
                "max_rows": cfg.max_real_images, "seed": 0, "held_out_every": FLOOR_EVERY}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    where = root.child(REFERENCE_DIR, manifest["name"], manifest["version"], f"featurenet-{tag}")
    config_loc = where.child("config.json")
    if exists(config_loc):
        return _stored_reference(where, net_cfg, device, echo)
    if stored_only:
        return None

    t0 = time.perf_counter()
    net, val_acc = _fit_reference(root, manifest, cfg, net_cfg, labelled, echo)
    weights, config_bytes = save_model_bytes(
        net.state_dict(), {"feature_net": net_cfg.__dict__, "settings": settings,
                           "dataset": {"name": manifest["name"], "version": manifest["version"]},
                           "val_accuracy": None if math.isnan(val_acc) else val_acc})
    # One commit of both: the weights under a name of their own digest (two writers never share
    # a file), then config.json, create-only, naming them. A concurrent evaluation that
    # committed first wins; this one then uses that network, so all score with the same one.
    digest = sha256_hex(weights)
    weights_name = f"model-{digest[:16]}.safetensors"
    atomic_write_bytes(where.child(weights_name), weights)
    config = json.loads(config_bytes) | {"weights_file": weights_name}
    if not commit_bytes(config_loc, json.dumps(config, indent=2).encode()):
        echo(f"reference network {where.describe()} was stored by a concurrent evaluation; "
             "using it")
        return _stored_reference(where, net_cfg, device, echo)
    echo(f"reference network saved to {where.describe()} in {time.perf_counter() - t0:.1f}s"
         + ("" if math.isnan(val_acc) else f" (val accuracy {val_acc:.1%})"))
    return Features("reference", digest, net.eval().to(device), device)


def _stored_reference(where: Location, net_cfg, device, echo) -> Features:
    """The reference network stored at ``where`` (weights checked against their digest)."""
    from diffusion.metrics import FeatureNet
    from diffusion.serialization import load_model_bytes, sha256_hex

    config_loc = where.child("config.json")
    config_bytes = call(config_loc, config_loc.fs.cat_file, config_loc.path)
    # the weights file config.json names (before it named one: model.safetensors)
    weights_loc = where.child(json.loads(config_bytes).get("weights_file", "model.safetensors"))
    weights = call(weights_loc, weights_loc.fs.cat_file, weights_loc.path)
    state, _ = load_model_bytes(weights, config_bytes, name=weights_loc.describe())
    net = FeatureNet(net_cfg)
    net.load_state_dict(state, strict=True)
    echo(f"reference network {where.describe()} (sha256 {sha256_hex(weights)[:12]})")
    return Features("reference", sha256_hex(weights), net.eval().to(device), device)


def _fit_reference(root: Location, manifest: dict, cfg: EvalConfig, net_cfg, labelled: bool,
                   echo) -> tuple[Any, float]:
    """A new reference network and its val accuracy (NaN where there is none): trained on the
    labelled train rows outside the floor's held-out rows, or, for an unlabelled dataset, the
    fixed random initialisation of seed 0."""
    import torch

    from diffusion.metrics import FeatureNet, accuracy, train_feature_net
    from diffusion.pixels import uint8_to_unit

    if not labelled:
        torch.manual_seed(0)
        return FeatureNet(net_cfg).eval(), float("nan")
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
    return net, val_acc


def fid_features(path: str, device, echo) -> Features:
    """The FID Inception-v3 from the local safetensors file at ``path``."""
    from diffusion.inception import load_fid_inception
    from diffusion.serialization import sha256_hex

    try:
        with open(path, "rb") as f:
            digest = sha256_hex(f.read())
    except OSError as e:
        raise EvalError(f"evaluate.inception_weights {path}: {e}; give a local .safetensors "
                        "file (see docs/stages.md, FID)") from None
    net = load_fid_inception(path).eval().to(device)
    echo(f"FID Inception-v3 from {path} (sha256 {digest[:12]})")
    return Features("fid", digest, net, device, batch_size=50)  # 299×299 activations are big

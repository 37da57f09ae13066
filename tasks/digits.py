"""The embedded default dataset: scikit-learn's ``load_digits`` (1,797 real 8×8 handwritten
digits, 10 classes, shipped inside the scikit-learn wheel, so nothing is downloaded).

Pixels come as integers 0..16; they are rescaled to uint8 0..255. The train/val/test split is a
deterministic hash of the sample key (``digits/<index>``), the same rule the preprocessing stage
applies to any source, so a sample never changes side between runs.
"""

from __future__ import annotations

import numpy as np

from diffusion.pipeline import DiffusionConfig
from diffusion.unet import UNetConfig
from tasks.datasets import DataConfig, split_of

__all__ = ["CLASS_NAMES", "DIGITS_DIFFUSION", "DIGITS_UNET", "NAME", "digits_splits",
           "load_digits_uint8", "split_of"]

NAME = "digits"
CLASS_NAMES = [str(i) for i in range(10)]

# The small class-conditional UNet the demo trains and the benchmark measures (0.76M params;
# the benchmark drops the class embedding with ``num_classes=None``).
DIGITS_UNET = UNetConfig(
    resolution=8,
    in_channels=1,
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_classes=10,
)

# The pipeline's default diffusion: the cosine schedule (Nichol & Dhariwal 2021) rather than the
# math package's DDPM default (linear β 1e-4..0.02). Under the linear one the signal's share
# √(ᾱ/(1-ᾱ)) is below 0.1 from t ≈ 690 on, so about 30 % of the training timesteps see nearly
# pure noise; under the cosine one only from t ≈ 950 (they found the linear schedule worst at low
# resolution). On the digits, at the same 800 steps, over four training seeds: FD over 500-sample
# draws -9 %, -0.14 [-0.28, -0.01] (benchmarks/recipes.py, results/recipes_cosine.md).
DIGITS_DIFFUSION = DiffusionConfig(schedule="cosine")


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images [N, 1, 8, 8] uint8, labels [N] int64, keys [N])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    keys = [f"digits/{i:04d}" for i in range(images.shape[0])]
    return images[:, None], bunch.target.astype(np.int64), keys


def digits_splits(val_fraction: float | None = None, test_fraction: float | None = None):
    """{'train' | 'val' | 'test': (images, labels)} with the deterministic split, the
    pipeline's (``data.val_fraction`` and ``data.test_fraction``, by default
    :class:`~tasks.datasets.DataConfig`'s)."""
    fields = DataConfig.model_fields
    if val_fraction is None:
        val_fraction = fields["val_fraction"].default
    if test_fraction is None:
        test_fraction = fields["test_fraction"].default
    images, labels, keys = load_digits_uint8()
    side = np.array([split_of(k, val_fraction, test_fraction) for k in keys])
    return {s: (images[side == s], labels[side == s]) for s in ("train", "val", "test")}

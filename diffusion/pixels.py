"""uint8 pixels ↔ the model's data space [−1, 1] (Ho et al. 2020, §3.3: "we assume image data
consists of integers in {0, …, 255} scaled linearly to [−1, 1]")."""

from __future__ import annotations

import torch
from torch import Tensor


def uint8_to_unit(x: Tensor) -> Tensor:
    """uint8 pixels 0..255 → float32 in [−1, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {x.dtype}")
    return x.float() / 127.5 - 1.0


def unit_to_uint8(x: Tensor) -> Tensor:
    """Floats in [−1, 1] → uint8 0..255 (clamped, rounded to the nearest level)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

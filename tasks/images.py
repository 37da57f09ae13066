"""Image files for people to look at: sample grids as PNG (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def grid(
    images: np.ndarray, nrow: int, pad: int = 2, scale: int = 1, pad_value: int = 96
) -> np.ndarray:
    """Tile [N, C, H, W] uint8 images into one [H', W', C] array, ``nrow`` images per row, each
    pixel repeated ``scale`` times (nearest), ``pad`` grey (``pad_value``) pixels between them."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"grid expects [N, C, H, W] uint8, got {images.dtype} {images.shape}")
    n, c, h, w = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol = max(1, min(nrow, n))
    rows = (n + ncol - 1) // ncol
    out = np.full((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return out


def grid_png(images: np.ndarray, nrow: int, scale: int = 4) -> bytes:
    """A PNG grid of [N, C, H, W] uint8 images, as bytes."""
    import io

    from PIL import Image

    tiled = grid(images, nrow=nrow, scale=scale, pad=max(2, scale))
    mode = "L" if tiled.shape[2] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(tiled[..., 0] if mode == "L" else tiled, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def save_grid_png(images: np.ndarray, path: str | Path, nrow: int, scale: int = 4) -> Path:
    """Write a PNG grid of [N, C, H, W] uint8 images; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(grid_png(images, nrow=nrow, scale=scale))
    tmp.replace(path)
    return path

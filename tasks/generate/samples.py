"""Reading a complete generation job back: its samples, and a sample grid drawn beside them."""

from __future__ import annotations

import numpy as np

from tasks.generate.layout import GRID_FILE, MANIFEST
from tasks.pixels import read_pixel_files
from tasks.runtime import RuntimeConfig
from tasks.storage import Location, atomic_write_bytes, read_json, storage_options


def read_samples(output: str, runtime: RuntimeConfig) -> tuple[np.ndarray, np.ndarray, dict]:
    """All samples of a complete job in index order: (uint8 [N, C, H, W], labels, manifest)."""
    out = Location.of(output, storage_options(output, runtime))
    manifest = read_json(out.child(MANIFEST))
    x, y = read_pixel_files(out.fs, [out.child(s["path"]).path for s in manifest["shards"]],
                            manifest["shape"])
    return x, y, manifest


def grid_images(x: np.ndarray, y: np.ndarray, num_classes: int, per_class: int = 10,
                max_images: int = 100) -> tuple[np.ndarray, int]:
    """The images of a sample grid and its row length: for labelled samples one row per class
    (its first ``per_class`` samples in index order), else the first ``max_images``."""
    if num_classes and (y >= 0).any():
        rows = [x[np.flatnonzero(y == c)[:per_class]] for c in range(num_classes)]
        rows = [np.concatenate([r, np.zeros((per_class - len(r), *x.shape[1:]), np.uint8)])
                for r in rows if len(r)]  # a class with too few samples is padded with black
        return np.concatenate(rows), per_class
    return x[:max_images], per_class


def write_grid(output: str, runtime: RuntimeConfig, *, per_class: int = 10) -> tuple[str, bytes]:
    """Draw ``grid.png`` beside a complete job's shards from its first shard (at most
    ``shard_size`` samples are read, whatever the job's size); returns its URI and the PNG.
    Derived from the committed samples: a rerun redraws it byte for byte the same."""
    from tasks.images import grid_png

    out = Location.of(output, storage_options(output, runtime))
    manifest = read_json(out.child(MANIFEST))
    x, y = read_pixel_files(out.fs, [out.child(manifest["shards"][0]["path"]).path],
                            manifest["shape"])
    images, nrow = grid_images(x, y, len(manifest.get("class_names") or []), per_class)
    scale = max(1, 48 // manifest["shape"][-1])  # small images drawn at least 48 px wide
    loc = out.child(GRID_FILE)
    png = grid_png(images, nrow=nrow, scale=scale)
    atomic_write_bytes(loc, png)
    return loc.describe(), png

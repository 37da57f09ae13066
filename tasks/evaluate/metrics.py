"""What the samples are compared with and how: the labels they are drawn with, the held-out
real images of the floor, nearest-neighbour distances for memorization, and the frontier's
default sampler.

- **sample quality** is judged against a *floor*: the same Fréchet distance between the held-out
  fifth of the train split (up to as many images as samples) and the val split, what real data
  scores;
- **memorization**: the share of samples whose nearest training image is closer than
  ``evaluate.memorization_threshold`` (RMS distance, pixels in [0, 1]); the same share for the
  val images (held-out real data) is reported as its floor;
- the **quality-vs-cost frontier**: the *default* sampler is the cheapest setting (fewest network
  evaluations) within ``evaluate.tolerance`` of the best distance; the headline ``fd`` is the
  distance at that default, i.e. what a user gets without choosing.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.evaluate.reference import FLOOR_EVERY


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
                 seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to n held-out train images (rows the reference network never saw) with the val
    split's class proportions, the same proportions the samples are drawn with (the class mix
    alone moves a Fréchet distance in a classifier's feature space), and their labels (−1:
    unlabelled)."""
    rows = np.flatnonzero(np.arange(len(train_x)) % FLOOR_EVERY == 0)
    rng = np.random.default_rng(seed)
    labels = sample_labels(val_y, min(n, len(rows)), seed, num_classes=1)
    if labels is None:
        picked = rng.permutation(rows)[:n]
        return train_x[picked], train_y[picked]
    pools = {c: list(rng.permutation(rows[train_y[rows] == c])) for c in np.unique(labels)}
    picked = [pools[c].pop() for c in labels if pools.get(c)]
    if len(picked) < len(labels):  # a class ran out of held-out rows: fill with any others
        taken = set(picked)
        rest = [r for r in rng.permutation(rows) if r not in taken]
        picked += rest[:len(labels) - len(picked)]
    picked = np.array(picked, dtype=np.int64)
    return train_x[picked], train_y[picked]


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


def copy_share(images: np.ndarray, train_x: np.ndarray, threshold: float, device) -> float:
    """The share of ``images`` whose nearest training image is closer than ``threshold`` (RMS,
    pixels in [0, 1]): the memorization of samples, or its floor for held-out real images."""
    return float((nearest_rms(images, train_x, device) < threshold).mean())


def default_setting(frontier: list[dict], tolerance: float) -> tuple[float, dict]:
    """The best distance on the frontier and the default setting: the cheapest (fewest network
    evaluations, then the lower distance) within (1 + ``tolerance``) × the best."""
    best = min(f["fd"] for f in frontier)
    ok = [f for f in frontier if f["fd"] <= best * (1 + tolerance)]
    return best, min(ok, key=lambda f: (f["nfe"], f["fd"]))

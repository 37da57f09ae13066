"""Sample-quality metrics: the Fréchet distance between Gaussian fits of feature sets, and a small
reference classifier whose penultimate layer gives the features.

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½})      (Fréchet 1957; Heusel et al. 2017)

With Inception-v3 features this is FID. Small datasets (8×8 digits) have no Inception-scale
network, so :class:`FeatureNet` is a compact CNN trained on the dataset's own training split: a
feature space that knows what separates the classes, which is what "looks like a digit" means.
Scores are comparable only between runs that use the same feature network (same weights).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix (eigendecomposition)."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64, unbiased) of [N, F] features."""
    f = features.double().reshape(features.shape[0], -1)
    if f.shape[0] < 2:
        raise ValueError("feature statistics need at least 2 samples")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """The Fréchet (2-Wasserstein) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

    Uses tr((Σ₁^{½} Σ₂ Σ₁^{½})^{½}), whose argument is symmetric PSD, so a symmetric
    eigendecomposition is exact and stable (no complex parts to discard, unlike scipy's sqrtm).
    """
    mu1, mu2, cov1, cov2 = (a.double() for a in (mu1, mu2, cov1, cov2))
    root1 = _sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return float(value.clamp(min=0))


def frechet_distance_features(a: Tensor, b: Tensor) -> float:
    """FD between two [N, F] feature sets."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# --------------------------------------------------------------------------------------------
# Uncertainty: percentile bootstrap intervals of FD, and of the paired difference of two FDs
# --------------------------------------------------------------------------------------------


# A reference set's own noise is part of an FD's when the set is small (the digits' val split:
# 324 images), so the bootstrap resamples it too; past this many rows its share is negligible,
# resampling it only costs, and a fixed reference lets wide features take the Gram form. The
# resampled reference does not overstate that noise: for the paired difference of two digits
# models, its sd over bootstrap resamples of the reference matched a delete-half jackknife's
# (random halves without repeats): 1.06 and 1.07 against 165 images, 0.54 and 0.58 against 324
# (benchmarks/reference_noise.py).
RESAMPLE_REFERENCE_BELOW = 5000


@dataclass(frozen=True)
class Interval:
    """A statistic on all the samples and a percentile bootstrap interval around it."""

    value: float
    low: float
    high: float
    level: float
    draws: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _resample_counts(n: int, draws: int, g: torch.Generator) -> Tensor:
    """[draws, n] float64 counts: how often each of ``n`` rows is drawn in each resample."""
    idx = torch.randint(0, n, (draws, n), generator=g)
    counts = torch.zeros(draws, n, dtype=torch.float64)
    return counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))


def _weighted_statistics(f: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of the rows of ``f`` [N, F] repeated ``w`` [N] times: the
    statistics of a resample, without copying its rows."""
    n = w.sum()
    mu = (w @ f) / n
    c = f - mu
    return mu, (c.T * w) @ c / (n - 1)


def _interval(value: float, stats: Tensor, level: float) -> Interval:
    """The percentile interval of the bootstrap statistics ``stats``, re-centred on ``value``
    (their mean bias removed). FD needs it: a resample repeats rows, so it holds fewer distinct
    samples and its FD is larger on average (FD's small-N bias); the plain percentile interval
    of a 300-sample FD can miss the estimate altogether."""
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                 dtype=stats.dtype)).tolist()
    bias = float(stats.mean()) - float(value)
    return Interval(float(value), lo - bias, hi - bias, level, int(stats.numel()))


class _ResampledFD:
    """FD of weighted resamples of ``x`` [N, F] against a reference.

    Direct: the resample's mean and covariance, then two F×F eigendecompositions. Where the
    features are wider than the samples (F > N: Inception's 2048 against a few hundred
    samples) and the reference is fixed, the Gram form is exact and far cheaper: the nonzero
    eigenvalues of Σ₁^{½} Σ₂ Σ₁^{½} are those of A Σ₂ Aᵀ / (n − 1), with A the resample's
    weighted, centred rows, an N×N matrix that follows from G = X Σ₂ Xᵀ, computed once."""

    def __init__(self, x: Tensor, ref_stats: tuple[Tensor, Tensor], gram: bool):
        self.x, (self.mu2, self.cov2) = x, ref_stats
        self.gram = gram
        if gram:
            self.g = x @ self.cov2 @ x.T
            self.sq = (x * x).sum(1)
            self.tr2 = torch.trace(self.cov2)

    def __call__(self, w: Tensor, ref: tuple[Tensor, Tensor] | None = None) -> float:
        if not self.gram or ref is not None:
            return frechet_distance(*_weighted_statistics(self.x, w), *(ref or (self.mu2,
                                                                               self.cov2)))
        keep = w > 0
        w, x, g, sq = w[keep], self.x[keep], self.g[keep][:, keep], self.sq[keep]
        n = w.sum()
        mu = (w @ x) / n
        gw = g @ w / n
        m = g - gw[:, None] - gw[None, :] + (w @ g @ w) / n**2
        root = w.sqrt()
        cross = torch.linalg.eigvalsh(root[:, None] * m * root[None, :] / (n - 1))
        tr1 = (w @ sq - n * (mu @ mu)) / (n - 1)
        value = (mu - self.mu2).pow(2).sum() + tr1 + self.tr2 - 2 * cross.clamp(min=0).sqrt().sum()
        return float(value.clamp(min=0))


def _use_gram(x: Tensor, resample_reference: bool) -> bool:
    return not resample_reference and x.shape[1] > x.shape[0]


def _resamples_reference(reference: Tensor, resample_reference: bool | None) -> bool:
    """``resample_reference``, or by default whether the reference is small enough
    (:data:`RESAMPLE_REFERENCE_BELOW`) for its own noise to count."""
    if resample_reference is None:
        return len(reference) < RESAMPLE_REFERENCE_BELOW
    return resample_reference


def frechet_distance_interval(samples: Tensor, reference: Tensor, *, draws: int = 1000,
                              level: float = 0.95, seed: int = 0,
                              resample_reference: bool | None = None) -> Interval:
    """FD between the ``samples`` [N, F] and ``reference`` [M, F] features, with a bootstrap
    interval at ``level`` (percentile, bias-corrected: :func:`_interval`): each of ``draws``
    resamples draws N samples with replacement (and M reference rows, with
    ``resample_reference``; by default where the reference set is small, below
    :data:`RESAMPLE_REFERENCE_BELOW`). Deterministic for a given ``seed``.

    The interval says how much FD moves with the draw of samples; FD's bias at small N (it
    grows as N shrinks) is not removed, so compare FDs only at equal N."""
    a, r = samples.double().flatten(1), reference.double().flatten(1)
    resample_reference = _resamples_reference(r, resample_reference)
    g = torch.Generator().manual_seed(seed)
    wa = _resample_counts(len(a), draws, g)
    wr = _resample_counts(len(r), draws, g) if resample_reference else None
    ref_stats = feature_statistics(r)
    fd = _ResampledFD(a, ref_stats, _use_gram(a, resample_reference))
    stats = torch.empty(draws, dtype=torch.float64)
    for i in range(draws):
        stats[i] = fd(wa[i], _weighted_statistics(r, wr[i]) if wr is not None else None)
    ci = _interval(frechet_distance(*feature_statistics(a), *ref_stats), stats, level)
    # FD is never negative; a wide, re-centred interval (a small reference) can reach below 0
    return dataclasses.replace(ci, low=max(ci.low, 0.0))


def paired_frechet_difference(a: Tensor, b: Tensor, reference: Tensor, *, draws: int = 1000,
                              level: float = 0.95, seed: int = 0,
                              resample_reference: bool | None = None) -> Interval:
    """FD(a) − FD(b) against one ``reference``, with a *paired* percentile bootstrap interval:
    row i of ``a`` and of ``b`` come from the same noise and label (two models sampled with the
    same seeds), so each resample takes the same rows of both, and the same reference rows.
    What the two draws share cancels, and the interval is that of the difference, far narrower
    than two separate intervals would suggest. Negative: ``a`` is closer to the reference."""
    if a.shape != b.shape:
        raise ValueError(f"paired features need equal shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    fa, fb, r = a.double().flatten(1), b.double().flatten(1), reference.double().flatten(1)
    resample_reference = _resamples_reference(r, resample_reference)
    g = torch.Generator().manual_seed(seed)
    w = _resample_counts(len(fa), draws, g)
    wr = _resample_counts(len(r), draws, g) if resample_reference else None
    ref_stats = feature_statistics(r)
    gram = _use_gram(fa, resample_reference)
    fd_a, fd_b = _ResampledFD(fa, ref_stats, gram), _ResampledFD(fb, ref_stats, gram)
    stats = torch.empty(draws, dtype=torch.float64)
    for i in range(draws):
        rs = _weighted_statistics(r, wr[i]) if wr is not None else None
        stats[i] = fd_a(w[i], rs) - fd_b(w[i], rs)
    value = (frechet_distance(*feature_statistics(fa), *ref_stats)
             - frechet_distance(*feature_statistics(fb), *ref_stats))
    return _interval(value, stats, level)


def paired_mean_difference(a: Tensor, b: Tensor, *, draws: int = 1000, level: float = 0.95,
                           seed: int = 0) -> Interval:
    """mean(a) − mean(b) of paired per-item values (e.g. per-image NLL of two models on the
    same images and noise), with a paired percentile bootstrap interval."""
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    d = (a.double() - b.double()).flatten()
    w = _resample_counts(len(d), draws, torch.Generator().manual_seed(seed))
    return _interval(float(d.mean()), (w @ d) / len(d), level)


@dataclass(frozen=True)
class FeatureNetConfig:
    in_channels: int = 1
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 64


class FeatureNet(nn.Module):
    """A small CNN classifier on [−1, 1] images of any size ≥ 8; ``features(x)`` is the
    penultimate activation used for Fréchet distances."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * w, config.feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_feature_net(
    images: Tensor,
    labels: Tensor,
    config: FeatureNetConfig,
    *,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
) -> FeatureNet:
    """Fit :class:`FeatureNet` on [N, C, H, W] images in [−1, 1] with cross-entropy (AdamW),
    with small random shifts as augmentation. Deterministic for a given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter initialisation
    net = FeatureNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    n = images.shape[0]
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g)
        x = images[idx]
        dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        loss = F.cross_entropy(net(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: FeatureNet, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int(
            (net(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum()
        )
    return correct / images.shape[0]


@torch.no_grad()
def extract_features(net: FeatureNet, images: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat(
        [net.features(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    )

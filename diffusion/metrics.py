"""Sample-quality metrics: the Fréchet distance between Gaussian fits of feature sets, and a small
reference classifier whose penultimate layer gives the features.

    FD = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{½} Σ₂ Σ₁^{½})^{½})      (Fréchet 1957; Heusel et al. 2017)

With Inception-v3 features this is FID. Small datasets (8×8 digits) have no Inception-scale
network, so :class:`FeatureNet` is a compact CNN trained on the dataset's own training split: a
feature space that knows what separates the classes, which is what "looks like a digit" means.
Scores are comparable only between runs that use the same feature network (same weights).
"""

from __future__ import annotations

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

"""The Fréchet distance (the squared 2-Wasserstein distance between Gaussians) and FeatureNet."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.metrics import (
    FeatureNet,
    FeatureNetConfig,
    accuracy,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_features,
    train_feature_net,
)


def random_gaussian(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g, dtype=torch.float64)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return mu, a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def random_rotation(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return q


def test_identical_statistics_have_zero_distance():
    mu, cov = random_gaussian(12, 0)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_symmetric_and_nonnegative():
    for seed in range(5):
        mu1, cov1 = random_gaussian(8, seed)
        mu2, cov2 = random_gaussian(8, seed + 100)
        d12 = frechet_distance(mu1, cov1, mu2, cov2)
        assert d12 > 0
        assert d12 == pytest.approx(frechet_distance(mu2, cov2, mu1, cov1), rel=1e-9)


def test_diagonal_closed_form():
    """For diagonal covariances FD = Σ(μ₁ − μ₂)² + Σ(√v₁ − √v₂)²; a common rotation of both
    Gaussians changes nothing (FD depends only on the geometry)."""
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = (
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    )
    v1 = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.01
    v2 = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.01
    v2[0] = 0.0  # a degenerate direction is allowed (PSD, not PD)
    expected = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(
        expected, rel=1e-9
    )
    q = random_rotation(6, 2)
    rotated = frechet_distance(q @ mu1, q @ torch.diag(v1) @ q.T, q @ mu2, q @ torch.diag(v2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_square_root_is_a_metric():
    """√FD is the 2-Wasserstein distance, so it obeys the triangle inequality."""
    gaussians = [random_gaussian(5, seed) for seed in range(6)]

    def w2(a, b):
        return math.sqrt(frechet_distance(*a, *b))

    for a in gaussians:
        for b in gaussians:
            for c in gaussians[:3]:
                assert w2(a, c) <= w2(a, b) + w2(b, c) + 1e-9


def test_feature_statistics():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    mu, cov = feature_statistics(f)
    assert mu.dtype == cov.dtype == torch.float64
    torch.testing.assert_close(mu, f.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(f.double().T))  # unbiased (N − 1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_statistics(f[:1])
    # same features → 0; shifted features → the squared shift
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, 0.0, -2.0, 0.5])
    assert frechet_distance_features(f, f + shift) == pytest.approx(
        float((shift**2).sum()), rel=1e-6
    )


@pytest.mark.parametrize("size", [8, 32])
def test_feature_net_shapes(size):
    torch.manual_seed(0)
    cfg = FeatureNetConfig(in_channels=3, num_classes=5, width=8, feature_dim=12)
    net = FeatureNet(cfg).eval()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert net(x).shape == (4, 5)
    assert net.features(x).shape == (4, 12)
    assert extract_features(net, x, batch_size=3).shape == (4, 12)


def test_train_feature_net_separates_a_toy_problem():
    """Bright vs dark 8×8 images (plus noise) are linearly separable: accuracy must reach 1."""
    g = torch.Generator().manual_seed(0)
    n = 128
    labels = torch.arange(n) % 2
    level = torch.where(labels == 1, 0.5, -0.5).reshape(n, 1, 1, 1)
    images = (level + 0.2 * torch.randn(n, 1, 8, 8, generator=g)).clamp(-1, 1)
    cfg = FeatureNetConfig(in_channels=1, num_classes=2, width=8, feature_dim=16)
    net = train_feature_net(images, labels, cfg, steps=60, batch_size=32, seed=0)
    assert not net.training
    assert accuracy(net, images, labels, batch_size=50) == 1.0
    again = train_feature_net(images, labels, cfg, steps=60, batch_size=32, seed=0)
    for p, q in zip(net.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)  # deterministic for a seed

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


# -- uncertainty: bootstrap intervals of FD and of paired differences --------------------------


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) + shift


def test_the_fd_interval_matches_how_fd_moves_between_independent_draws():
    """Bootstrap from one draw of samples vs the spread over 40 independent draws of the same
    distribution: the interval's width is that spread's (within a factor of 2), it holds the
    value, and it is the same for the same seed."""
    from diffusion.metrics import frechet_distance_interval

    ref = gaussian(400, 6, seed=0)
    spread = torch.tensor([frechet_distance_features(gaussian(300, 6, seed=s, shift=0.3), ref)
                           for s in range(1, 41)]).std()
    ci = frechet_distance_interval(gaussian(300, 6, seed=99, shift=0.3), ref, draws=400,
                                   resample_reference=False)
    assert ci.low < ci.value < ci.high and ci.draws == 400 and ci.level == 0.95
    assert 0.5 < (ci.high - ci.low) / 3.92 / float(spread) < 2.0
    assert frechet_distance_interval(gaussian(300, 6, seed=99, shift=0.3), ref, draws=400,
                                     resample_reference=False) == ci
    # the reference's own noise widens it
    both = frechet_distance_interval(gaussian(300, 6, seed=99, shift=0.3), ref, draws=400)
    assert both.value == ci.value and both.high - both.low > ci.high - ci.low


def test_a_paired_difference_separates_what_two_separate_intervals_cannot():
    """Two models sampled with the same noise: b is a with a small shift. Their separate FD
    intervals overlap; the paired interval of FD(a) − FD(b) lies clearly below zero. Identical
    samples differ by exactly zero."""
    from diffusion.metrics import frechet_distance_interval, paired_frechet_difference

    ref = gaussian(300, 6, seed=0)
    a = gaussian(300, 6, seed=1)
    b = a + 0.15
    ia, ib = (frechet_distance_interval(x, ref, draws=300) for x in (a, b))
    assert ia.high > ib.low  # separately: not distinguishable
    d = paired_frechet_difference(a, b, ref, draws=300)
    assert d.high < 0 and abs(d.value - (ia.value - ib.value)) < 1e-9
    same = paired_frechet_difference(a, a.clone(), ref, draws=50)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"paired features need equal shapes"):
        paired_frechet_difference(a, b[:10], ref)


def test_paired_mean_difference():
    from diffusion.metrics import paired_mean_difference

    # A constant difference of 0.05 gives a degenerate interval at 0.05, whose ends are 0.05 only
    # up to rounding, and which side of 0.05 each lands on varies with the data (3 of these 20
    # draws on one machine) and with the BLAS kernel that sums the resamples. Bound: each
    # d_i = (a_i + 0.05) − a_i is off by ≤ ε(|a_i| + 0.05) (two roundings); a resample's mean sums
    # n terms and the bias correction averages `draws` resamples, each sum off by ≤ its length·ε
    # relative in any order (Higham, recursive summation); the quantile interpolates between two
    # such means. Measured: ≤ 6 ulps of 0.05 (4e-17), the bound ≈ 1e-14.
    n, draws, eps = 200, 200, torch.finfo(torch.float64).eps
    for seed in range(20):
        a = gaussian(n, 1, seed=seed).flatten()
        d = paired_mean_difference(a + 0.05, a, draws=draws)
        tol = eps * (float(a.abs().max()) + 0.05) + 2 * eps * 0.05 * (n + draws)
        assert abs(d.value - 0.05) < 1e-12 and d.high - d.low < 1e-9
        assert d.low - tol <= 0.05 <= d.high + tol, (seed, d)
    a = gaussian(n, 1, seed=3).flatten()
    noisy = paired_mean_difference(a, gaussian(200, 1, seed=4).flatten(), draws=500)
    assert noisy.low < noisy.value < noisy.high and str(noisy).count("[") == 1


def test_wide_features_take_the_gram_form_with_the_same_values():
    """Features wider than the samples (Inception's 2048 against a few hundred samples) with a
    fixed reference: the N×N Gram form gives each resample's FD as the direct F×F form does."""
    from diffusion.metrics import (
        _resample_counts,
        _ResampledFD,
        _weighted_statistics,
        frechet_distance_interval,
        paired_frechet_difference,
    )

    x, ref = gaussian(30, 80, seed=1), gaussian(200, 80, seed=2, shift=0.1)
    stats = feature_statistics(ref)
    gram = _ResampledFD(x, stats)
    for w in _resample_counts(30, 4, torch.Generator().manual_seed(0)):
        direct = frechet_distance(*_weighted_statistics(x, w), *stats)
        assert gram(w) == pytest.approx(direct, rel=1e-6)
    ci = frechet_distance_interval(x, ref, draws=50, resample_reference=False)  # Gram form
    assert ci.value == pytest.approx(frechet_distance_features(x, ref), rel=1e-9)
    # 30 samples in 80-d: the plain FD is mostly small-sample bias, which the interval removes
    assert ci.low < ci.corrected < ci.high < ci.value
    d = paired_frechet_difference(x, x + 0.05, ref, draws=50, resample_reference=False)
    assert d.low > 0  # x + 0.05 is nearer the reference, shifted by 0.1


def test_many_resamples_at_once_give_each_resample_s_fd():
    """The batched moments (one product of counts and the rows' outer products) and the
    Cholesky form of the trace term give each resample's FD as the direct formula does, for a
    resampled reference and a fixed one."""
    from diffusion.metrics import (
        _batched_frechet,
        _Moments,
        _resample_counts,
        _weighted_statistics,
    )

    x, ref = gaussian(120, 8, seed=1, shift=0.2), gaussian(90, 8, seed=2)
    g = torch.Generator().manual_seed(0)
    w, wr = _resample_counts(120, 5, g), _resample_counts(90, 5, g)
    mu, cov = _Moments(x)(w)
    mur, covr = _Moments(ref)(wr)
    batched = _batched_frechet(mu, cov, mur, covr)
    fixed = _batched_frechet(mu, cov, *feature_statistics(ref))
    for i in range(5):
        own = _weighted_statistics(x, w[i])
        assert float(batched[i]) == pytest.approx(
            frechet_distance(*own, *_weighted_statistics(ref, wr[i])), rel=1e-9, abs=1e-12)
        assert float(fixed[i]) == pytest.approx(
            frechet_distance(*own, *feature_statistics(ref)), rel=1e-9, abs=1e-12)


def test_stratified_resamples_keep_every_label_s_count():
    """With labels, a resample (and a resample of a resample) draws each label's rows among
    themselves: every label keeps its count, and a second-level resample only takes rows its
    first-level resample holds."""
    from diffusion.metrics import _resample_again, _resample_counts

    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5 + [-1] * 2)
    g = torch.Generator().manual_seed(0)
    w = _resample_counts(len(labels), 50, g, labels)
    again = _resample_again(w, g, labels)
    for counts in (w, again):
        for v, n in ((0, 7), (1, 3), (2, 5), (-1, 2)):
            assert (counts[:, labels == v].sum(1) == n).all()
    assert ((again > 0) <= (w > 0)).all()
    free = _resample_counts(len(labels), 50, g)
    assert (free.sum(1) == len(labels)).all() and not (free[:, labels == 1].sum(1) == 3).all()
    with pytest.raises(ValueError, match="one label per row"):
        _resample_counts(5, 2, g, labels)


def test_class_mix_noise_is_not_counted_where_samples_are_dealt_from_the_labels():
    """Class-structured features (the class means far apart, as in a classifier's feature
    space) whose samples are dealt from the reference's labels: resampling rows freely mixes
    the classes anew in each resample and inflates the paired interval several times over;
    resampling within label does not."""
    from diffusion.metrics import paired_frechet_difference

    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.arange(300) % 5, torch.arange(200) % 5
    a = centres[labels] + torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(300, 6, generator=g, dtype=torch.float64)
    ref = centres[ref_labels] + torch.randn(200, 6, generator=g, dtype=torch.float64)
    free = paired_frechet_difference(a, b, ref, draws=200)
    strat = paired_frechet_difference(a, b, ref, draws=200, labels=labels,
                                      reference_labels=ref_labels)
    assert strat.value == free.value
    assert (free.high - free.low) > 2 * (strat.high - strat.low)
    with pytest.raises(ValueError, match="labels of the samples and of the reference"):
        paired_frechet_difference(a, b, ref, draws=10, labels=labels)

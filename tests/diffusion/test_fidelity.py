"""KID, FD∞ and precision/recall (diffusion.fidelity) on Gaussians whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion.fidelity import fd_infinity, kid, paired_kid_difference, precision_recall
from diffusion.metrics import frechet_distance_features

D = 64  # the reference network's feature width


def gaussian(n: int, g: torch.Generator, shift: torch.Tensor | None = None,
             scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * scale
    return x if shift is None else x + shift


def shift_of(a: float) -> torch.Tensor:
    """A mean shift with squared norm ``a``."""
    mu = torch.zeros(D, dtype=torch.float64)
    mu[0] = math.sqrt(a)
    return mu


def kid_closed_form(a: float, d: int) -> float:
    """MMD² of N(0, I) and N(μ, I), |μ|² = a, under k(x, y) = (xᵀy/d + 1)³. With s = xᵀy/d,
    E k = 1 + 3 E s + 3 E s² + E s³, and for independent Gaussian x, y:
    E_{x,x'~N(0,I)} k = 1 + 3/d;  E_{x~N(0,I), y~N(μ,I)} k = 1 + 3(d + a)/d²;
    E_{y,y'~N(μ,I)} k = 1 + 3a/d + 3(d + 2a + a²)/d² + (a³ + 6a² + 3ad + 6a)/d³
    (E (yᵀy')³ by conditioning on y': yᵀy' ~ N(μᵀy', |y'|²)). Their MMD² combination is:"""
    return (1 + a / d) ** 3 - 1 + 3 * a / d**2 + 6 * a**2 / d**3 + 6 * a / d**3


def test_kid_is_unbiased_for_equal_distributions():
    """Mean KID over 120 draws of 40 against 40 rows from the SAME Gaussian is 0 within 3 of its
    standard errors (the U-statistic leaves out the diagonal; a V-statistic would read about
    3 k(x,x)/n-ish above 0), and each draw's jackknife standard error is not too small."""
    g = torch.Generator().manual_seed(0)
    draws = [kid(gaussian(40, g), gaussian(40, g)) for _ in range(120)]
    values = torch.tensor([e.value for e in draws])
    se_of_mean = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean())) < 3 * se_of_mean
    # the jackknife is conservative at the null (Efron–Stein): mean se ≥ the observed spread
    assert sum(e.se for e in draws) / len(draws) > 0.9 * float(values.std())


def test_kid_of_shifted_gaussians_matches_the_closed_form_and_its_interval_covers():
    """N(0, I) against N(μ, I), |μ|² = 1.25, d = 64: MMD² = 0.0607 (kid_closed_form). The mean
    of 60 draws (200 against 150 rows) is within 3 standard errors of it (measured once:
    0.0598, draw sd 0.0148), the jackknife se is within 30 % of the draws' sd, and the 95 %
    intervals cover the true value in at least 85 % of the draws (measured 94 % of 200)."""
    a = 1.25
    truth = kid_closed_form(a, D)
    assert truth == pytest.approx(0.0607, abs=5e-4)
    g = torch.Generator().manual_seed(1)
    draws = [kid(gaussian(200, g), gaussian(150, g, shift_of(a))) for _ in range(60)]
    values = torch.tensor([e.value for e in draws])
    sd = float(values.std())
    assert abs(float(values.mean()) - truth) < 3 * sd / math.sqrt(len(values))
    assert 0.7 * sd < sum(e.se for e in draws) / len(draws) < 1.3 * sd
    assert sum(e.low <= truth <= e.high for e in draws) >= 0.85 * len(draws)


def test_kid_is_symmetric_and_does_not_grow_as_n_shrinks():
    """KID(x, y) = KID(y, x). Shrinking N from 600 to 60 leaves KID's mean where it was (within
    3 standard errors of the difference) while FD at 60 rows is more than twice FD at 600
    (its O(d/N) bias)."""
    g = torch.Generator().manual_seed(2)
    x, y = gaussian(50, g), gaussian(70, g, shift_of(1.0))
    assert kid(x, y).value == pytest.approx(kid(y, x).value, rel=1e-10)
    assert kid(x, y).se == pytest.approx(kid(y, x).se, rel=1e-10)

    mu = shift_of(1.0)
    big = [kid(gaussian(600, g), gaussian(600, g, mu)).value for _ in range(4)]
    small = [kid(gaussian(60, g), gaussian(60, g, mu)).value for _ in range(40)]
    big_t, small_t = torch.tensor(big), torch.tensor(small)
    se = math.sqrt(float(big_t.var()) / len(big) + float(small_t.var()) / len(small))
    assert abs(float(small_t.mean()) - float(big_t.mean())) < 3 * se
    fd_small = frechet_distance_features(gaussian(60, g), gaussian(60, g, mu))
    fd_big = frechet_distance_features(gaussian(600, g), gaussian(600, g, mu))
    assert fd_small > 2 * fd_big


def test_paired_kid_difference_cancels_what_the_rows_share():
    """Two 'models' whose rows share their noise (b = a + a small perturbation and shift): the
    paired difference's value is the difference of the two KIDs, it is antisymmetric, its
    standard error is far below the unpaired √(se_a² + se_b²), and it matches the spread of the
    difference over 40 independent draws of the samples and the reference (within 35 %)."""
    g = torch.Generator().manual_seed(3)

    def draw():
        ref, a = gaussian(150, g), gaussian(200, g, shift_of(0.5))
        b = a + 0.1 * torch.randn(a.shape, generator=g, dtype=torch.float64) + shift_of(0.05)
        return a, b, ref

    a, b, ref = draw()
    d = paired_kid_difference(a, b, ref)
    ka, kb = kid(a, ref), kid(b, ref)
    assert d.value == pytest.approx(ka.value - kb.value, rel=1e-9, abs=1e-12)
    assert d.se < 0.5 * math.hypot(ka.se, kb.se)
    assert d.low < d.value < d.high
    assert paired_kid_difference(b, a, ref).value == pytest.approx(-d.value, rel=1e-9)
    draws = [paired_kid_difference(*draw()) for _ in range(40)]
    sd = float(torch.tensor([e.value for e in draws]).std())
    assert 0.65 * sd < sum(e.se for e in draws) / len(draws) < 1.35 * sd
    with pytest.raises(ValueError, match="equal shapes"):
        paired_kid_difference(a, b[:-1], ref)
    with pytest.raises(ValueError, match="at least 3 rows"):
        kid(a[:2], ref)


def test_fd_infinity_removes_most_of_the_small_sample_bias():
    """N(0, I) against N(μ, diag(s²)), d = 64, |μ|² = 0.36 and s evenly from 0.7 to 1.3: true
    FD = |μ|² + Σ(1 − sᵢ)² = 2.341. From 1000 samples against a 324-row reference (the digits'
    sizes; the reference subsampled alongside), plain FD reads about 6.8 (measured over 20
    seeds: 6.88 ± 0.20) and FD∞ about 2.3 (2.33 ± 0.24). Against a 5000-row reference kept
    whole (the paper's setting) plain FD reads about 3.5, FD∞ about 2.35."""
    truth = 0.36 + float(((1 - torch.linspace(0.7, 1.3, D, dtype=torch.float64)) ** 2).sum())
    assert truth == pytest.approx(2.341, abs=1e-3)
    scale = torch.linspace(0.7, 1.3, D, dtype=torch.float64)
    mu = torch.zeros(D, dtype=torch.float64)
    mu[:4] = 0.3
    g = torch.Generator().manual_seed(4)
    for m, scale_reference in ((324, True), (5000, False)):
        for seed in range(2):
            ref, x = gaussian(m, g), gaussian(1000, g, mu, scale)
            plain = frechet_distance_features(x, ref)
            inf = fd_infinity(x, ref, seed=seed, scale_reference=scale_reference)
            assert plain - truth > 0.8, (m, plain)
            assert abs(inf.value - truth) < 0.8, (m, inf)
            assert abs(inf.value - truth) < 0.4 * (plain - truth), (m, plain, inf)
            assert inf.slope > 0 and len(inf.sizes) == len(inf.fds) >= 3


def test_fd_infinity_is_deterministic_for_a_seed_and_refuses_too_few_rows():
    g = torch.Generator().manual_seed(5)
    x, ref = gaussian(300, g), gaussian(200, g, shift_of(1.0))
    one, two = fd_infinity(x, ref, seed=3), fd_infinity(x, ref, seed=3)
    assert one.sizes == two.sizes
    assert one.value == pytest.approx(two.value, rel=1e-12)
    assert fd_infinity(x, ref, seed=4).value != pytest.approx(one.value, rel=1e-9)
    assert one.sizes[0] == 150 and one.sizes[-1] == 300  # min_fraction 0.5 of N to N
    with pytest.raises(ValueError, match="at least 3 distinct subset sizes"):
        fd_infinity(x[:3], ref)


def test_precision_and_recall_separate_fidelity_from_diversity():
    """Same distribution: both high. Samples collapsed onto 5 reference points: every sample is
    inside the reference's manifold (precision 1) but it covers few reference points (recall
    low). Disjoint distributions: both 0. Swapping the sets swaps the two figures."""
    g = torch.Generator().manual_seed(6)
    ref = gaussian(400, g)
    same = precision_recall(gaussian(400, g), ref)
    assert same.precision > 0.6 and same.recall > 0.6 and same.k == 3

    centres = ref[:5].repeat(80, 1)
    collapsed = centres + 1e-3 * torch.randn(centres.shape, generator=g, dtype=torch.float64)
    c = precision_recall(collapsed, ref)
    assert c.precision > 0.95 and c.recall < 0.1

    far = precision_recall(gaussian(400, g, shift_of(400.0)), ref)
    assert far.precision < 0.02 and far.recall < 0.02

    x = gaussian(300, g, shift_of(1.0))
    pr, rp = precision_recall(x, ref), precision_recall(ref, x)
    assert (pr.precision, pr.recall) == pytest.approx((rp.recall, rp.precision))


def _dealt_draws(reps: int):
    """Class-conditional features shaped like the digits' (diffusion.coverage's simulated gate:
    64-d, 10 classes, 1000 samples dealt in fixed class counts against 324 reference rows in
    the same proportions): the 'equal' scenario's draws, and its model's true FD to the
    reference."""
    from diffusion.coverage import Setup, draw, world

    w = world("equal", Setup(), 3)
    return w.fd_a, [draw(w, torch.Generator().manual_seed(s)) for s in range(reps)]


def test_kid_stratified_by_class_is_unbiased_where_labels_are_dealt():
    """Samples dealt in fixed class counts hold fewer same-class pairs than independent draws,
    and same-class pairs are the close ones: the plain KID of such samples reads below 0 (the
    digits demo printed −1.22; here about −0.22 over 20 draws, sd 0.012), the stratified KID
    does not (about +0.019, and a 6000-row draw of the same world read 0.0156 ± 0.0014). Its
    stratified jackknife se is not below the draws' spread. With a single class, the stratified
    statistic is the plain one."""
    _, draws = _dealt_draws(20)
    plain = torch.tensor([kid(a, ref).value for a, _, ref, _, _ in draws])
    strat = [kid(a, ref, labels=lab, reference_labels=rl) for a, _, ref, lab, rl in draws]
    values = torch.tensor([e.value for e in strat])
    se_mean = float(values.std()) / math.sqrt(len(values))
    assert float(plain.mean()) < -0.1
    assert float(values.mean()) > -2 * se_mean
    assert float(values.mean()) < 0.05  # the equal world's true MMD² is small
    assert sum(e.se for e in strat) / len(strat) > 0.9 * float(values.std())

    a, b, ref, lab, rl = draws[0]
    one, one_ref = torch.zeros(len(a)), torch.zeros(len(ref))
    assert kid(a, ref, labels=one, reference_labels=one_ref).value == pytest.approx(
        kid(a, ref).value, rel=1e-9)
    d = paired_kid_difference(a, b, ref, labels=lab, reference_labels=rl)
    ka = kid(a, ref, labels=lab, reference_labels=rl)
    kb = kid(b, ref, labels=lab, reference_labels=rl)
    assert d.value == pytest.approx(ka.value - kb.value, rel=1e-9, abs=1e-12)
    assert d.se < 0.75 * math.hypot(ka.se, kb.se)  # rows share 70 % of their noise


def test_stratified_kid_refuses_a_class_too_small_and_half_the_labels():
    g = torch.Generator().manual_seed(7)
    x, ref = gaussian(30, g), gaussian(30, g)
    labels = torch.arange(30) % 3
    few = labels.clone()
    few[few == 2] = 1
    few[0] = 2  # class 2 holds one sample row
    with pytest.raises(ValueError, match=r"at least 3 rows of every class.*samples"):
        kid(x, ref, labels=few, reference_labels=labels)
    with pytest.raises(ValueError, match="labels of the samples and of the reference"):
        kid(x, ref, labels=labels)
    with pytest.raises(ValueError, match="one label per row"):
        kid(x, ref, labels=labels[:-1], reference_labels=labels)


def test_fd_infinity_with_class_strata_where_labels_are_dealt():
    """Free subsets of a set dealt in fixed class counts wander in class mix by an amount that
    vanishes at the full size; the line reads it as slope and its intercept falls far below
    the truth (about −1.9 for a true FD of 0.18 here). Subsets drawn class by class keep the
    mix: FD∞ lands near the truth (about 0.06 ± 0.04 over 30 draws; its residual bias is the
    reference's 1/M² terms at 324 rows in 64-d)."""
    truth, draws = _dealt_draws(12)
    free = torch.tensor([fd_infinity(a, ref, seed=s).value
                         for s, (a, _, ref, _, _) in enumerate(draws)])
    strat = torch.tensor([fd_infinity(a, ref, seed=s, labels=lab, reference_labels=rl).value
                          for s, (a, _, ref, lab, rl) in enumerate(draws)])
    assert float(free.mean()) < truth - 1.0
    assert abs(float(strat.mean()) - truth) < 0.35

"""Does the promotion gate's interval mean what it says? Simulations with a known truth.

Two "models" and a "reference" are class-conditional Gaussian mixtures in the gate's feature
dimension (64, the reference network's), sampled at the gate's sizes (1000 samples per model,
324 reference rows: the digits' held-out split), so the population Fréchet distance of each model
to the reference is known exactly (the FD between the mixtures' mean and covariance at the class
proportions the samples are dealt with). Each repetition draws fresh samples and a fresh
reference, forms the paired interval of FD(a) − FD(b) exactly as the gate does
(:func:`diffusion.metrics.paired_frechet_difference`'s resampling), and records whether the
interval covers the true difference and whether the gate would promote ``a`` (the interval lies
below 0).

Scenarios (``a`` is the challenger, ``b`` the champion):

- ``equal``: two draws of one model (same recipe, other seed: equal spread, equal FD); the true
  difference is 0, and a promotion is a false one.
- ``diverse``: ``a`` is less diverse (its class covariances scaled by 0.8) and ``b`` is shifted
  so that both have the same true FD; the plain difference is biased in ``a``'s favour (an FD's
  small-sample bias grows with the samples' spread), so a promotion is a false one that the old,
  re-centred percentile interval made 23 % of the time.
- ``better``: ``a``'s class means are nearer the reference's than ``b``'s (equal spread): the
  true difference is negative, and a promotion is a true one (the gate's power).

Rows i of ``a`` and ``b`` share a label and part of their noise (correlation ``pairing``), as two
models sampled from the same noise streams do. ``tests/diffusion/test_coverage.py`` runs a few
hundred repetitions; ``benchmarks/interval_coverage.py`` runs thousands and compares the methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffusion.metrics import _interval, _resampled_fds, frechet_distance

SCENARIOS = ("equal", "diverse", "better")


@dataclass(frozen=True)
class Setup:
    """Sizes as the gate uses them on the digits, and the shape of the simulated features: the
    defaults follow the digits' reference-network features (64-d; of a trace of 195, 25 is
    within-class spread and the rest between the class means; two samplers of one model agree
    on row i with cosine 0.97; FD of a model's 1000 samples to the 324 held-out images 0.6)."""

    samples: int = 1000
    reference: int = 324
    features: int = 64
    classes: int = 10
    within: float = 25.0    # trace of a class's covariance
    between: float = 170.0  # trace of the covariance of the class means
    error: float = 0.2      # the size of a model's class-mean errors (‖δ_c‖²)
    pairing: float = 0.7    # correlation of row i of a and b (shared noise)
    draws: int = 200
    level: float = 0.95
    stratified: bool = True


@dataclass
class _Mixture:
    means: Tensor    # [K, F]
    roots: Tensor    # [K, F, F]: class covariance = root @ root.T


def _class_roots(setup: Setup, g: torch.Generator) -> Tensor:
    """Class covariances with decaying spectra (as learned features have), trace ``within``,
    as square roots."""
    f = setup.features
    spectrum = torch.arange(1, f + 1, dtype=torch.float64) ** -0.5
    spectrum = spectrum * math.sqrt(setup.within / float((spectrum ** 2).sum()))
    roots = []
    for _ in range(setup.classes):
        q, _ = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))
        roots.append(q * spectrum)
    return torch.stack(roots)


def _moments(m: _Mixture, p: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance of the mixture with class proportions ``p``."""
    mu = p @ m.means
    second = torch.einsum("k,kij->ij", p, m.roots @ m.roots.transpose(1, 2))
    second = second + torch.einsum("k,ki,kj->ij", p, m.means, m.means)
    return mu, second - torch.outer(mu, mu)


@dataclass
class World:
    """One scenario's populations: the reference and the two models, and the true FDs."""

    name: str
    setup: Setup
    reference: _Mixture
    a: _Mixture
    b: _Mixture
    proportions: Tensor
    fd_a: float = field(init=False)
    fd_b: float = field(init=False)

    def __post_init__(self):
        ref = _moments(self.reference, self.proportions)
        self.fd_a = frechet_distance(*_moments(self.a, self.proportions), *ref)
        self.fd_b = frechet_distance(*_moments(self.b, self.proportions), *ref)

    @property
    def difference(self) -> float:
        return self.fd_a - self.fd_b


def world(name: str, setup: Setup = Setup(), seed: int = 0) -> World:
    """The populations of scenario ``name`` (:data:`SCENARIOS`)."""
    if name not in SCENARIOS:
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {name!r}")
    g = torch.Generator().manual_seed(seed)
    k, f = setup.classes, setup.features
    means = torch.randn(k, f, generator=g, dtype=torch.float64)
    means = means * math.sqrt(setup.between / float((means - means.mean(0)).pow(2).sum(1).mean()))
    roots = _class_roots(setup, g)
    raw = 1 + 0.3 * torch.rand(k, generator=g, dtype=torch.float64)
    proportions = raw / raw.sum()
    error = math.sqrt(setup.error) * torch.randn(k, f, generator=g,
                                                 dtype=torch.float64) / math.sqrt(f)
    ref = _Mixture(means, roots)
    if name == "equal":
        a = b = _Mixture(means + error, roots)
    elif name == "better":
        a, b = _Mixture(means + 0.8 * error, roots), _Mixture(means + error, roots)
    else:  # diverse: a less diverse, b shifted to the same true FD
        a = _Mixture(means + error, roots * math.sqrt(0.8))
        ref_moments = _moments(ref, proportions)
        fd_a = frechet_distance(*_moments(a, proportions), *ref_moments)
        fd_err = frechet_distance(*_moments(_Mixture(means + error, roots), proportions),
                                  *ref_moments)
        # a common shift t·u of every class mean adds t² to b's FD (its covariance is unchanged)
        u = torch.randn(f, generator=g, dtype=torch.float64)
        mean_err = proportions @ error
        u = u - (u @ mean_err) / (mean_err @ mean_err) * mean_err  # orthogonal to b's mean error
        t = math.sqrt(max(fd_a - fd_err, 0.0))
        b = _Mixture(means + error + t * u / u.norm(), roots)
    return World(name, setup, ref, a, b, proportions)


def _deal(p: Tensor, n: int) -> Tensor:
    """n labels with proportions as close to ``p`` as whole counts allow."""
    counts = torch.floor(p * n).long()
    rest = n - int(counts.sum())
    counts[torch.argsort(p * n - counts, descending=True)[:rest]] += 1
    return torch.repeat_interleave(torch.arange(len(p)), counts)


def _draw(m: _Mixture, labels: Tensor, z: Tensor) -> Tensor:
    x = m.means[labels].clone()
    for c in range(len(m.means)):
        rows = labels == c
        x[rows] += z[rows] @ m.roots[c].T
    return x


def draw(w: World, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One repetition's paired samples of a and b, the reference and their labels."""
    s = w.setup
    labels = _deal(w.proportions, s.samples)
    ref_labels = _deal(w.proportions, s.reference)
    shared = torch.randn(s.samples, s.features, generator=g, dtype=torch.float64)
    own = torch.randn(2, s.samples, s.features, generator=g, dtype=torch.float64)
    rho = s.pairing
    za, zb = (rho * shared + math.sqrt(1 - rho ** 2) * own[i] for i in (0, 1))
    ref = _draw(w.reference, ref_labels,
                torch.randn(s.reference, s.features, generator=g, dtype=torch.float64))
    return _draw(w.a, labels, za), _draw(w.b, labels, zb), ref, labels, ref_labels


@dataclass
class Repetition:
    """One repetition: the plain difference, and each method's interval."""

    value: float
    intervals: dict[str, tuple[float, float]]


def _recentred(value: float, stats: Tensor, level: float) -> tuple[float, float]:
    """The interval the gate used before: the percentile interval shifted by the resamples' mean
    bias, centred on the plain estimate (kept here only to measure it against)."""
    lo, hi = torch.quantile(stats, torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                 dtype=stats.dtype)).tolist()
    bias = float(stats.mean()) - value
    return lo - bias, hi - bias


def repetition(w: World, seed: int) -> Repetition:
    """Draw one repetition of ``w`` and bootstrap its paired difference as the gate does (the
    ``extrapolated`` interval), and with the two intervals the gate used before: ``recentred``
    (the percentile interval moved onto the plain estimate) and ``basic`` (reflected about it)."""
    s = w.setup
    a, b, ref, labels, ref_labels = draw(w, torch.Generator().manual_seed(seed))
    strata = (labels, ref_labels) if s.stratified else (None, None)
    (va, vb), stats, twice = _resampled_fds([a, b], ref, draws=s.draws, seed=seed,
                                            resample_reference=True, labels=strata[0],
                                            reference_labels=strata[1], again=True)
    diff = stats[0] - stats[1]
    basic = _interval(va - vb, diff, s.level)
    new = _interval(va - vb, diff, s.level, twice[0] - twice[1])
    return Repetition(va - vb, {"extrapolated": (new.low, new.high),
                                "basic": (basic.low, basic.high),
                                "recentred": _recentred(va - vb, diff, s.level)})


@dataclass
class Rates:
    """Coverage of the true difference and promotions (interval below 0) over ``reps``."""

    scenario: str
    method: str
    truth: float
    reps: int
    covered: int
    promoted: int
    widths: list[float]

    @property
    def coverage(self) -> float:
        return self.covered / self.reps

    @property
    def promotion(self) -> float:
        return self.promoted / self.reps


def rates(w: World, reps: list[Repetition]) -> dict[str, Rates]:
    """Per method: how often the interval covered ``w``'s true difference and lay below 0."""
    out = {}
    for method in reps[0].intervals:
        ivs = [r.intervals[method] for r in reps]
        out[method] = Rates(w.name, method, w.difference, len(reps),
                            sum(lo <= w.difference <= hi for lo, hi in ivs),
                            sum(hi < 0 for _, hi in ivs), [hi - lo for lo, hi in ivs])
    return out


_WORLDS: dict = {}


def _repetition_of(name: str, setup: Setup, world_seed: int, seed: int) -> Repetition:
    """:func:`repetition` of the world ``(name, setup, world_seed)``, built once per process
    (workers get the world's recipe, not its tensors)."""
    key = (name, setup, world_seed)
    if key not in _WORLDS:
        _WORLDS[key] = world(name, setup, world_seed)
    return repetition(_WORLDS[key], seed)


def simulate(name: str, reps: int, setup: Setup = Setup(), *, seed: int = 0,
             world_seed: int = 0, workers: int = 1) -> dict[str, Rates]:
    """``reps`` repetitions of scenario ``name`` (seeds ``seed`` … ``seed + reps − 1``), on
    ``workers`` processes; the rates per method (:func:`rates`)."""
    w = world(name, setup, world_seed)
    seeds = list(range(seed, seed + reps))
    if workers <= 1:
        return rates(w, [repetition(w, s) for s in seeds])
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch's threads
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        out = list(pool.map(_repetition_of, [name] * reps, [setup] * reps,
                            [world_seed] * reps, seeds,
                            chunksize=max(1, reps // (4 * workers))))
    return rates(w, out)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (two-sided, ``z``: 1.96 for 95 %)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)

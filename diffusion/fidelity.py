"""Sample-quality figures that can be compared across sample sizes: KID, FD∞, precision/recall.

A Fréchet distance measured on N samples is biased upwards by O(1/N): in a 64-d feature space
at N = 500 that bias is most of the figure, so FDs are comparable only at equal N (which is how
the promotion gate uses them: a paired FD difference of two models at the same N, whose shared
bias cancels). For a figure a reader can hold next to another measured at a different size:

- **KID** (Bińkowski et al. 2018, "Demystifying MMD GANs", §4): the squared maximum mean
  discrepancy with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, by its *unbiased*
  estimator (a U-statistic: the within-set sums leave out the diagonal). Its expectation is the
  population MMD² at every N, so it does not drift with the sample size; it can read slightly
  below 0 when the two distributions are equal.
- **FD∞** (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find
  them", §3): FD on random subsets of several sizes N_i, a least-squares line in 1/N_i, and its
  intercept, the FD of infinitely many samples.
- **precision and recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", §2): the share of samples inside the reference's k-NN manifold
  (fidelity) and of reference points inside the samples' (diversity).

Every function takes [N, F] feature tensors (any float dtype; computed in float64) and is
deterministic for a given seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion.metrics import RESAMPLE_REFERENCE_BELOW, feature_statistics, frechet_distance

# --------------------------------------------------------------------------------------------
# KID: the unbiased MMD² with the cubic polynomial kernel
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A statistic on all the rows, its standard error and the normal interval
    value ± z·se at ``level``."""

    value: float
    se: float
    low: float
    high: float
    level: float

    def __str__(self) -> str:
        return f"{self.value:.4f} ± {self.se:.4f}"


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """k(x, y) = (xᵀy / d + 1)³ for the rows of ``x`` [N, d] and ``y`` [M, d]: [N, M]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def polynomial_kernel_diag(x: Tensor) -> Tensor:
    """k(xᵢ, xᵢ) for each row: [N]."""
    return ((x * x).sum(1) / x.shape[1] + 1) ** 3


def _rows(x: Tensor) -> Tensor:
    return x.double().reshape(x.shape[0], -1)


def _within_class_sums(x: Tensor, onehot: Tensor, chunk: int = 2048) -> Tensor:
    """[len(x), C]: for each row of ``x``, the sum of k(xᵢ, xⱼ) over the other rows j of ``x``
    in each class (``onehot`` [len(x), C]), ``chunk`` rows at a time (never the whole kernel
    matrix at once)."""
    out = torch.empty(len(x), onehot.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        out[i:i + chunk] = polynomial_kernel(x[i:i + chunk], x) @ onehot
    return out - polynomial_kernel_diag(x)[:, None] * onehot


def _cross_class_sums(x: Tensor, onehot_x: Tensor, y: Tensor, onehot_y: Tensor,
                      chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """Both ways of summing k(x, y) by class, from one pass over the kernel (``chunk`` rows of
    ``x`` at a time): [len(x), C], row i's sums over the rows of ``y`` in each class, and
    [len(y), C], row j's sums over the rows of ``x`` in each class."""
    by_y = torch.empty(len(x), onehot_y.shape[1], dtype=torch.float64)
    by_x = torch.zeros(len(y), onehot_x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), chunk):
        k = polynomial_kernel(x[i:i + chunk], y)
        by_y[i:i + chunk] = k @ onehot_y
        by_x += k.T @ onehot_x[i:i + chunk]
    return by_y, by_x


def _onehot(labels: Tensor, classes: Tensor) -> Tensor:
    return (labels[:, None] == classes[None, :]).double()


@dataclass(frozen=True)
class _Side:
    """One set's share of a (class-stratified) MMD²: its rows' per-class kernel sums within the
    set (``within`` [n, C], own pair left out), its one-hot labels and class counts."""

    within: Tensor
    onehot: Tensor
    counts: Tensor

    @classmethod
    def of(cls, x: Tensor, labels: Tensor, classes: Tensor) -> _Side:
        onehot = _onehot(labels, classes)
        return cls(_within_class_sums(x, onehot), onehot, onehot.sum(0))


def _block_means(within: Tensor, counts: Tensor) -> Tensor:
    """[..., C, C]: a set's mean kernel per class pair, from its block sums and class counts (a
    class pair with itself has n_c(n_c − 1) ordered pairs, another n_c·n_d)."""
    pairs = counts[..., :, None] * counts[..., None, :]
    pairs = pairs - torch.diag_embed(counts)
    return within / pairs


class _Stratified:
    """MMD²_u of two sets with class labels, stratified (Gretton et al. 2012, eq. 3, per class
    pair): Σ_{c,d} w_c w_d [k̄_xx(c, d) + k̄_yy(c, d) − 2 k̄_xy(c, d)], where k̄_xx(c, d) is
    the mean kernel over pairs of distinct x rows of classes c and d, and w the class weights.
    With one class (no labels) it is the plain unbiased MMD². With labels it is unbiased for
    the class mixture at weights w even where the rows' class counts are fixed by design (samples
    dealt from the reference's labels), which the plain statistic is not: fixed counts hold
    fewer same-class pairs than independent draws would, and same-class pairs are the close
    ones, so the plain within-set means read low and KID below 0.

    Each delete-one value (for the jackknife) is computed exactly from per-row, per-class kernel
    sums: O(n² + nm + m²) kernel evaluations in all."""

    def __init__(self, x: _Side, y: _Side, cross: Tensor, weights: Tensor):
        self.x, self.y, self.cross, self.w = x, y, cross, weights  # cross: [n, C] sums over y

    def _value(self, bxx, nx, byy, ny, bxy) -> Tensor:
        ww = self.w[:, None] * self.w[None, :]
        kxx = _block_means(bxx, nx)
        kyy = _block_means(byy, ny)
        kxy = bxy / (nx[..., :, None] * ny[..., None, :])
        return ((kxx + kyy - 2 * kxy) * ww).sum((-2, -1))

    def _blocks(self):
        bxx = self.x.onehot.T @ self.x.within
        byy = self.y.onehot.T @ self.y.within
        bxy = self.x.onehot.T @ self.cross
        return bxx, byy, bxy

    def value(self) -> float:
        bxx, byy, bxy = self._blocks()
        return float(self._value(bxx, self.x.counts, byy, self.y.counts, bxy))

    def without_x(self) -> Tensor:
        """[n]: the statistic with row i of x left out (its class's blocks lose its sums)."""
        bxx, byy, bxy = self._blocks()
        e = self.x.onehot                                        # [n, C]
        s = self.x.within                                        # [n, C]
        bxx_i = bxx - e[:, :, None] * s[:, None, :] - s[:, :, None] * e[:, None, :]
        bxy_i = bxy - e[:, :, None] * self.cross[:, None, :]
        return self._value(bxx_i, self.x.counts - e, byy, self.y.counts, bxy_i)

    def without_y(self, cross_y: Tensor) -> Tensor:
        """[m]: the statistic with row j of y left out; ``cross_y`` [m, C]: row j's kernel sums
        over x per class."""
        bxx, byy, bxy = self._blocks()
        e = self.y.onehot
        s = self.y.within
        byy_j = byy - e[:, :, None] * s[:, None, :] - s[:, :, None] * e[:, None, :]
        bxy_j = bxy - cross_y[:, :, None] * e[:, None, :]
        return self._value(bxx, self.x.counts, byy_j, self.y.counts - e, bxy_j)


def _checked_labels(labels, n: int, what: str) -> Tensor | None:
    """``labels`` as a flat tensor, checked to give one per row (None stays None)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"{what} must give one label per row: {labels.numel()} labels for "
                         f"{n} rows")
    return labels


def _labels_of(labels, n: int, what: str) -> Tensor:
    """:func:`_checked_labels` as int64, and one class for all rows where there are none."""
    labels = _checked_labels(labels, n, what)
    return torch.zeros(n, dtype=torch.long) if labels is None else labels.long()


# A stratified KID's within-class pairs and their delete-one values need this many rows of
# every class in each set.
MIN_CLASS_ROWS = 3


def _classes(labels: Tensor, reference_labels: Tensor, least: int) -> Tensor:
    """The classes both sets hold, after checking each holds every class at least ``least``
    times (a stratum's within-class pairs and its delete-one values need that)."""
    classes = torch.unique(torch.cat([labels, reference_labels]))
    for name, lab in (("samples", labels), ("reference", reference_labels)):
        counts = (lab[:, None] == classes[None, :]).sum(0)
        short = [(int(c), int(k)) for c, k in zip(classes, counts, strict=True) if k < least]
        if short:
            raise ValueError(
                f"a class-stratified KID needs at least {least} rows of every class in both "
                f"sets; the {name} hold (class, rows) {short[:5]}: pass no labels for the "
                f"unstratified KID, or draw more rows")
    return classes


def _jackknife_variance(*leave_one_out: tuple[Tensor, Tensor]) -> float:
    """The stratified multi-sample delete-one jackknife variance (Arvesen 1969; for strata,
    Jones 1974): for each independently drawn set and each stratum of n_h rows in it,
    (n_h−1)/n_h · Σ_{i∈h} (θ₋ᵢ − mean_{h} θ₋·)², summed. Each argument is (θ₋ᵢ [n], the
    rows' stratum [n]); one stratum is the plain jackknife. Rows whose count per stratum is
    fixed by design vary only within their stratum, hence the per-stratum means."""
    total = 0.0
    for t, strata in leave_one_out:
        for h in torch.unique(strata):
            th = t[strata == h]
            n = len(th)
            total += float((n - 1) / n * (th - th.mean()).pow(2).sum())
    return total


def _estimate(value: float, variance: float, level: float) -> Estimate:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    se = math.sqrt(max(variance, 0.0))
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))
    return Estimate(value, se, value - z * se, value + z * se, level)


def _prepared(sets: list[Tensor], reference: Tensor, labels, reference_labels):
    """Rows in float64, labels (one class where none are given), the classes, the reference's
    side of the statistic and the class weights (the reference's class shares)."""
    if (labels is None) != (reference_labels is None):
        raise ValueError("a class-stratified KID needs the labels of the samples and of the "
                         "reference (or neither)")
    xs, r = [_rows(s) for s in sets], _rows(reference)
    n, m = len(xs[0]), len(r)
    if n < 3 or m < 3:
        raise ValueError(f"KID and its standard error need at least 3 rows in each set, "
                         f"got {n} and {m}")
    if xs[0].shape[1] != r.shape[1]:
        raise ValueError(f"feature widths differ: {xs[0].shape[1]} and {r.shape[1]}")
    lx = _labels_of(labels, n, "labels")
    ly = _labels_of(reference_labels, m, "reference_labels")
    classes = _classes(lx, ly, MIN_CLASS_ROWS)
    ref = _Side.of(r, ly, classes)
    return xs, r, lx, ly, classes, ref, ref.counts / m


def _one(x: Tensor, lx: Tensor, r: Tensor, ref: _Side, classes: Tensor, weights: Tensor):
    """The stratified statistic of ``x`` against the reference, and the reference rows' kernel
    sums over ``x`` per class (for the reference's delete-one values)."""
    side = _Side.of(x, lx, classes)
    cross, cross_y = _cross_class_sums(x, side.onehot, r, ref.onehot)
    return _Stratified(side, ref, cross, weights), cross_y


def kid(samples: Tensor, reference: Tensor, *, labels: Tensor | None = None,
        reference_labels: Tensor | None = None, level: float = 0.95) -> Estimate:
    """KID between ``samples`` [N, F] and ``reference`` [M, F]: the unbiased MMD² with the cubic
    polynomial kernel on the full sets (:class:`_Stratified`), with a standard error and normal
    interval at ``level``. Needs N, M ≥ 3.

    With ``labels`` and ``reference_labels`` (one per row) the statistic is stratified by class
    and weighted by the reference's class shares: use it where the samples' labels are dealt
    from the reference's (class-conditional samples in fixed class counts), where the plain
    statistic is biased below 0 (on the gate's simulated digits features, −0.22 for two equal
    distributions). Each class needs 3 rows in each set. Without labels it is the plain
    statistic, symmetric in its two arguments.

    The standard error is the delete-one jackknife's (stratified where labels are given),
    computed exactly from the kernel's row sums, not a bootstrap: a bootstrap resample repeats
    rows, and a repeated row's k(xᵢ, xᵢ) (large for this kernel) then enters the U-statistic's
    off-diagonal sums, so resampled KIDs are biased upwards and their spread is not the
    estimator's. The jackknife is consistent for U-statistics and, by the Efron–Stein
    inequality, errs on the wide side; it needs no draws or seed. Bińkowski et al.'s subset
    standard deviation (KID on subsets of 1000) describes a 1000-sample estimate, not this
    full-set one."""
    (x,), r, lx, ly, classes, ref, w = _prepared([samples], reference, labels, reference_labels)
    t, cross_y = _one(x, lx, r, ref, classes, w)
    return _estimate(t.value(), _jackknife_variance((t.without_x(), lx),
                                                    (t.without_y(cross_y), ly)), level)


def paired_kid_difference(a: Tensor, b: Tensor, reference: Tensor, *,
                          labels: Tensor | None = None, reference_labels: Tensor | None = None,
                          level: float = 0.95) -> Estimate:
    """KID(a) − KID(b) against one ``reference``, paired: row i of ``a`` and of ``b`` come from
    the same noise and label (two models sampled with the same seeds), so the jackknife leaves
    out row i of both at once, and reference row j from both (the reference's within-set term
    cancels in the difference). ``labels`` (shared by a and b) and ``reference_labels``
    stratify as in :func:`kid`. Negative: ``a`` is closer to the reference. Needs equal shapes
    of ``a`` and ``b``, and at least 3 rows in each set."""
    if a.shape != b.shape:
        raise ValueError(f"paired features need equal shapes, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    (fa, fb), r, lx, ly, classes, ref, w = _prepared([a, b], reference, labels,
                                                     reference_labels)
    ta, ya = _one(fa, lx, r, ref, classes, w)
    tb, yb = _one(fb, lx, r, ref, classes, w)
    return _estimate(ta.value() - tb.value(),
                     _jackknife_variance((ta.without_x() - tb.without_x(), lx),
                                         (ta.without_y(ya) - tb.without_y(yb), ly)), level)


# --------------------------------------------------------------------------------------------
# FD∞: FD extrapolated to infinitely many samples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extrapolation:
    """FD∞ (``value``, the intercept), the fitted line's slope in 1/N, and the subset sizes and
    FDs it was fitted to."""

    value: float
    slope: float
    sizes: tuple[int, ...]
    fds: tuple[float, ...]


def _subset(n: int, labels: Tensor | None, fraction: float, g: torch.Generator) -> Tensor:
    """Rows of a random subset of ``fraction`` of ``n`` rows (without replacement); with
    ``labels``, ``fraction`` of each class's rows, so every subset keeps the set's class mix."""
    if labels is None:
        return torch.randperm(n, generator=g)[:max(2, round(fraction * n))]
    picked = []
    for c in torch.unique(labels):
        rows = torch.nonzero(labels == c).flatten()
        keep = max(1, round(fraction * len(rows)))
        picked.append(rows[torch.randperm(len(rows), generator=g)[:keep]])
    return torch.cat(picked)


def fd_infinity(samples: Tensor, reference: Tensor, *, points: int = 15,
                min_fraction: float = 0.5, seed: int = 0,
                scale_reference: bool | None = None, labels: Tensor | None = None,
                reference_labels: Tensor | None = None) -> Extrapolation:
    """FD∞ (Chong & Forsyth 2020, §3.2): FD of a random subset of N_i samples (without
    replacement; each subset drawn afresh) for ``points`` sizes N_i evenly spaced from
    ``min_fraction``·N to N, against the reference's statistics; a least-squares line
    FD(N_i) ≈ FD∞ + slope / N_i; its intercept. Deterministic for a given ``seed``.

    FD's bias is, to first order, a sum of terms in 1/N (the samples) and 1/M (the reference).
    With ``scale_reference`` the reference is subsampled at the same fractions, so both shrink
    together and the intercept removes both; by default it is where the reference is small
    (below :data:`diffusion.metrics.RESAMPLE_REFERENCE_BELOW` rows, like the digits' 324
    images). Otherwise the reference is used whole and its own 1/M bias remains, as in the
    paper, whose reference (the training set) is large. The line holds where N ≫ d, hence
    ``min_fraction`` 0.5 (the paper spans 5k to 50k Inception samples): on 64-d Gaussians,
    1000 samples against 324 reference rows, it gave FD∞ 2.33 ± 0.24 (20 seeds) for a true
    FD of 2.34 against a plain FD of 6.88, with a smaller spread than at 0.2 or 0.7. The
    intercept can fall below 0 when the true FD is near 0; it is not clipped.

    With ``labels`` (and ``reference_labels`` where the reference is subsampled) every subset
    is drawn class by class, keeping the full set's class mix. Use them where the samples'
    labels are dealt in fixed counts: a free subset's class mix wanders by an amount that
    vanishes at the full size (a finite-population term in 1/N_i − 1/N), which the line reads
    as slope and which then pulls the intercept down (on the gate's simulated digits features,
    FD∞ −1.93 for a true FD of 0.18, free subsets; the stratified subsets remove it)."""
    x, r = _rows(samples), _rows(reference)
    if scale_reference is None:
        scale_reference = len(r) < RESAMPLE_REFERENCE_BELOW
    if not 0 < min_fraction < 1:
        raise ValueError(f"min_fraction must be in (0, 1), got {min_fraction}")
    fractions = torch.linspace(min_fraction, 1.0, points, dtype=torch.float64)
    sizes = sorted({round(float(f) * len(x)) for f in fractions})
    if len(sizes) < 3 or sizes[0] < 2 or (scale_reference and min_fraction * len(r) < 2):
        raise ValueError(f"FD∞ needs at least 3 distinct subset sizes of 2 or more rows; "
                         f"{len(x)} samples at min_fraction {min_fraction} give {sizes}")
    labels = _checked_labels(labels, len(x), "labels")
    reference_labels = _checked_labels(reference_labels, len(r), "reference_labels")
    g = torch.Generator().manual_seed(seed)
    ref_stats = feature_statistics(r)
    fds, used = [], []
    for n in sizes:
        fraction = n / len(x)
        rows = _subset(len(x), labels, fraction, g)
        stats = ref_stats
        if scale_reference:
            stats = feature_statistics(r[_subset(len(r), reference_labels, fraction, g)])
        used.append(len(rows))
        fds.append(frechet_distance(*feature_statistics(x[rows]), *stats))
    sizes = used
    inv = 1.0 / torch.tensor(sizes, dtype=torch.float64)
    design = torch.stack([torch.ones_like(inv), inv], 1)
    coef = torch.linalg.lstsq(design, torch.tensor(fds, dtype=torch.float64)[:, None]).solution
    return Extrapolation(float(coef[0]), float(coef[1]), tuple(sizes), tuple(fds))


# --------------------------------------------------------------------------------------------
# Precision and recall: k-NN manifolds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def _knn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Each row's distance to its k-th nearest other row of ``x``."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} rows, got {len(x)}")
    radii = torch.empty(len(x), dtype=torch.float64)
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        # the (k+1)-th smallest: the row itself is at distance 0
        radii[i:i + chunk] = d.kthvalue(k + 1, dim=1).values
    return radii


def _inside(queries: Tensor, points: Tensor, radii: Tensor, chunk: int) -> Tensor:
    """For each query, whether it lies in some ball B(pointⱼ, radiusⱼ): [Q] bool."""
    hit = torch.empty(len(queries), dtype=torch.bool)
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], points)
        hit[i:i + chunk] = (d <= radii[None, :]).any(1)
    return hit


def precision_recall(samples: Tensor, reference: Tensor, *, k: int = 3,
                     chunk: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1–2): each set's manifold
    is the union of balls around its points with radius the distance to the point's k-th
    nearest neighbour in the same set; precision is the share of ``samples`` inside the
    reference's manifold, recall the share of ``reference`` points inside the samples'.

    Both depend on the set sizes (a denser set has smaller balls), so compare them at equal
    sizes, as the paper does."""
    x, r = _rows(samples), _rows(reference)
    precision = _inside(x, r, _knn_radii(r, k, chunk), chunk).double().mean()
    recall = _inside(r, x, _knn_radii(x, k, chunk), chunk).double().mean()
    return PrecisionRecall(float(precision), float(recall), k)

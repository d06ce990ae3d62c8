"""How sure a top-1 difference is: bootstrap intervals over test images, McNemar's test on the
images two models disagree on, and t intervals over training seeds.

Top-1 outcomes are 0/1 per image. Resampling n images with replacement then only changes how many
images fall in each outcome, and those counts are multinomial: drawing the counts directly is the
same percentile bootstrap, exactly, without an n x resamples index matrix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from effdeploy.metrics import snr_db

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (same units as the estimate)."""

    estimate: float
    low: float
    high: float
    level: float
    n: int  # images (bootstrap) or seeds (t interval)
    method: str

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return asdict(self)


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image top-1 outcome (ties to the lower class index, as ``metrics.topk_accuracy``)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not describe the same images")
    return np.argmax(logits, axis=1) == labels


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _as_bool(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name}: a non-empty 1-D array of per-image outcomes is needed")
    return x.astype(bool)


def bootstrap_ci(outcomes, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed=0) -> Interval:
    """Percentile-bootstrap interval of top-1 (the mean of 0/1 ``outcomes``) over the images."""
    x = _as_bool(outcomes, "outcomes")
    n = x.size
    p = float(x.mean())
    draws = _rng(seed).binomial(n, p, size=resamples) / n
    low, high = _percentiles(draws, level)
    return Interval(p, low, high, level, n, f"percentile bootstrap, {resamples} resamples of {n} images")


def paired_bootstrap_ci(
    outcomes_a, outcomes_b, *, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL, seed=0
) -> Interval:
    """Interval of top-1(a) - top-1(b) on the same images, the images resampled together."""
    a = _as_bool(outcomes_a, "outcomes_a")
    b = _as_bool(outcomes_b, "outcomes_b")
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same images: {a.size} vs {b.size}")
    n = a.size
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    same = n - only_a - only_b
    counts = _rng(seed).multinomial(n, [only_a / n, only_b / n, same / n], size=resamples)
    draws = (counts[:, 0] - counts[:, 1]) / n
    low, high = _percentiles(draws, level)
    return Interval(
        (only_a - only_b) / n, low, high, level, n, f"paired percentile bootstrap, {resamples} resamples of {n} images"
    )


@dataclass(frozen=True)
class McNemar:
    """McNemar's test: only the images exactly one model gets right say which model is better."""

    only_a: int  # a right, b wrong
    only_b: int  # a wrong, b right
    p_exact: float  # two-sided binomial test of only_a against Binomial(only_a + only_b, 1/2)
    chi2: float  # (|only_a - only_b| - 1)^2 / (only_a + only_b), continuity-corrected
    p_chi2: float  # its chi-square (1 df) tail: the large-count approximation of p_exact

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b

    def to_dict(self) -> dict:
        return {**asdict(self), "discordant": self.discordant}


def binomial_two_sided_half(k: int, n: int) -> float:
    """Two-sided exact p of k successes in n fair trials: 2 * P(X <= min(k, n - k)), at most 1.
    Exact integer arithmetic, so it holds for any n (no underflow of 2**-n)."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    term, tail = 1, 1
    for i in range(1, m + 1):
        term = term * (n - i + 1) // i
        tail += term
    from fractions import Fraction

    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


def mcnemar(outcomes_a, outcomes_b) -> McNemar:
    a = _as_bool(outcomes_a, "outcomes_a")
    b = _as_bool(outcomes_b, "outcomes_b")
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same images: {a.size} vs {b.size}")
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(~a & b))
    return mcnemar_from_counts(only_a, only_b)


def mcnemar_from_counts(only_a: int, only_b: int) -> McNemar:
    n = only_a + only_b
    if n == 0:
        return McNemar(only_a, only_b, 1.0, 0.0, 1.0)
    chi2 = max(abs(only_a - only_b) - 1, 0) ** 2 / n
    # chi-square with 1 df: P(X > x) = P(|Z| > sqrt(x)) = erfc(sqrt(x / 2))
    return McNemar(only_a, only_b, binomial_two_sided_half(only_a, n), chi2, math.erfc(math.sqrt(chi2 / 2)))


# ---- Student t, for intervals over a handful of training seeds -------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t with ``df`` (possibly fractional) degrees of freedom."""
    if not 0.0 < q < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < q < 1 and df > 0 (got q={q}, df={df})")
    if q < 0.5:
        return -t_quantile(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class SeedSpread:
    """One configuration measured on several training seeds."""

    values: tuple[float, ...]
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for one seed
    ci: Interval | None  # t interval of the mean; None for one seed
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "values": list(self.values),
            "mean": self.mean,
            "sd": self.sd,
            "ci": self.ci.to_dict() if self.ci else None,
            "note": self.note,
        }


ONE_SEED = "n<2 seeds: the spread over training seeds is not measured"


def seed_spread(values, *, level: float = DEFAULT_LEVEL) -> SeedSpread:
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("seed_spread needs at least one value")
    mean = float(x.mean())
    if x.size < 2:
        return SeedSpread(tuple(x.tolist()), mean, None, None, ONE_SEED)
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, x.size - 1) * sd / math.sqrt(x.size)
    ci = Interval(mean, mean - half, mean + half, level, int(x.size), f"t interval over {x.size} seeds")
    return SeedSpread(tuple(x.tolist()), mean, sd, ci, "")


@dataclass(frozen=True)
class SeedComparison:
    """mean(a) - mean(b) over independently trained seeds, with Welch's t interval."""

    a: tuple[float, ...]
    b: tuple[float, ...]
    difference: float
    ci: Interval | None  # None when either side has fewer than 2 seeds
    df: float | None
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "a": list(self.a),
            "b": list(self.b),
            "difference": self.difference,
            "ci": self.ci.to_dict() if self.ci else None,
            "df": self.df,
            "note": self.note,
        }


def compare_seeds(values_a, values_b, *, level: float = DEFAULT_LEVEL) -> SeedComparison:
    """Welch's interval: the two placements are different networks, so seeds are not paired."""
    a = np.asarray(list(values_a), dtype=np.float64)
    b = np.asarray(list(values_b), dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("compare_seeds needs at least one value on each side")
    diff = float(a.mean() - b.mean())
    ta, tb = tuple(a.tolist()), tuple(b.tolist())
    if a.size < 2 or b.size < 2:
        return SeedComparison(ta, tb, diff, None, None, ONE_SEED)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0.0:
        ci = Interval(diff, diff, diff, level, int(a.size + b.size), "Welch t interval (no spread)")
        return SeedComparison(ta, tb, diff, ci, None, "every seed gave the same value")
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    ci = Interval(
        diff, diff - half, diff + half, level, int(a.size + b.size), f"Welch t interval, {a.size} + {b.size} seeds"
    )
    return SeedComparison(ta, tb, diff, ci, float(df), "")


def output_snr_db(float_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """Output SNR of quantized logits against the float model's, over all images (metrics.snr_db)."""
    return snr_db(float_logits, test_logits)

"""Calibration observers: from the statistics of one tensor over the calibration set to its
quantization range [lo, hi].

Statistics are gathered in two passes: exact min/max, then a histogram over [min, max]. Every
observer then chooses a range from the same histogram, so they can be compared on equal terms.
A new observer is one function registered with ``@register_observer``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from effdeploy.errors import EffdeployError

BINS = 2048


@dataclass
class TensorStats:
    """Running min/max (pass 1) and a histogram on [min, max] (pass 2) of one tensor."""

    lo: float = float("inf")
    hi: float = float("-inf")
    hist: np.ndarray | None = None
    count: int = 0
    extra: dict = field(default_factory=dict)

    def update_range(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += x.numel()

    def update_hist(self, x: torch.Tensor) -> None:
        lo, hi = self.edges_range
        h = torch.histc(x.detach().float().flatten(), bins=BINS, min=lo, max=hi).numpy().astype(np.float64)
        self.hist = h if self.hist is None else self.hist + h

    @property
    def edges_range(self) -> tuple[float, float]:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        return lo, hi

    @property
    def centers(self) -> np.ndarray:
        lo, hi = self.edges_range
        w = (hi - lo) / BINS
        return lo + w * (np.arange(BINS) + 0.5)


Observer = Callable[[TensorStats, int], tuple[float, float]]
OBSERVERS: dict[str, Observer] = {}


def register_observer(name: str) -> Callable[[Observer], Observer]:
    def deco(fn: Observer) -> Observer:
        OBSERVERS[name] = fn
        return fn

    return deco


def get_observer(name: str) -> Observer:
    if name not in OBSERVERS:
        raise EffdeployError(f"unknown observer {name!r} (available: {', '.join(sorted(OBSERVERS))})")
    return OBSERVERS[name]


@register_observer("minmax")
def minmax(stats: TensorStats, bits: int) -> tuple[float, float]:
    """The exact range seen over the whole calibration set (not a moving average of batches)."""
    return stats.lo, stats.hi


def quantile(stats: TensorStats, q: float) -> float:
    """The q-quantile (0..1) of the calibration histogram, to one bin."""
    cdf = np.cumsum(stats.hist)
    cdf /= cdf[-1]
    idx = int(np.searchsorted(cdf, q))
    lo, hi = stats.edges_range
    return lo + (hi - lo) * min(idx + 1, BINS) / BINS


@register_observer("percentile")
def percentile(stats: TensorStats, bits: int, pct: float = 99.99) -> tuple[float, float]:
    """Clip the outer (100 - pct)% of values on each side that has any."""
    tail = (100.0 - pct) / 100.0
    lo = quantile(stats, tail) if stats.lo < 0 else 0.0
    hi = quantile(stats, 1.0 - tail) if stats.hi > 0 else 0.0
    return min(lo, 0.0), max(hi, 0.0)


def _expected_sq_error(stats: TensorStats, lo: float, hi: float, bits: int) -> float:
    from effdeploy.quant.fakequant import act_qparams

    qp = act_qparams(lo, hi, bits)
    c = stats.centers
    q = np.clip(np.round(c / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
    return float(np.sum(stats.hist * ((q - qp.zero_point) * qp.scale - c) ** 2))


@register_observer("mse")
def mse(stats: TensorStats, bits: int, steps: int = 100) -> tuple[float, float]:
    """The clipping range (a common shrink factor on both sides) with the least expected
    squared quantization error over the calibration histogram."""
    best, best_err = (stats.lo, stats.hi), float("inf")
    for r in np.linspace(0.2, 1.0, steps):
        lo, hi = min(stats.lo, 0.0) * r, max(stats.hi, 0.0) * r
        err = _expected_sq_error(stats, lo, hi, bits)
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


@register_observer("entropy")
def entropy(stats: TensorStats, bits: int, steps: int = 64) -> tuple[float, float]:
    """KL-divergence calibration (TensorRT style): the clipping range whose quantized
    distribution, expanded back, is closest in KL divergence to the observed one."""
    h = stats.hist
    c = stats.centers
    levels = 2**bits
    best, best_kl = (stats.lo, stats.hi), float("inf")
    for r in np.linspace(0.2, 1.0, steps):
        lo, hi = min(stats.lo, 0.0) * r, max(stats.hi, 0.0) * r
        inside = (c >= lo) & (c <= hi)
        p = h.copy()
        # outliers are clipped onto the edge bins, as quantization would do
        first, last = np.flatnonzero(inside)[[0, -1]] if inside.any() else (0, len(h) - 1)
        p[first] += h[:first].sum()
        p[last] += h[last + 1 :].sum()
        p[:first] = 0
        p[last + 1 :] = 0
        # the quantized distribution: the window's bins (without the clipped mass) merged into
        # `levels` groups and spread back; the clipped mass piled on the edges of p is what it
        # cannot represent, which is how KL penalises clipping too much
        q = np.zeros_like(p)
        idx = np.arange(first, last + 1)
        groups = np.array_split(idx, min(levels, len(idx)))
        for g in groups:
            nz = h[g] > 0
            if nz.any():
                q[g[nz]] = h[g].sum() / nz.sum()
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-30)
        m = ps > 0
        kl = float(np.sum(ps[m] * np.log(ps[m] / np.maximum(qs[m], 1e-30))))
        if kl < best_kl:
            best, best_kl = (lo, hi), kl
    return best


@register_observer("auto")
def auto(stats: TensorStats, bits: int) -> tuple[float, float]:
    """Percentile (99.99%) at 8 bits and more, MSE-optimal clipping below. Chosen on the
    validation split (never test) of the 30-epoch SE-after CIFAR model, W8A8 with min-max weights
    and bias correction: min-max ranges 19.0 dB, entropy 19.8 dB, percentile 21.7 dB. Below 8
    bits the grid is coarse enough that the MSE optimum's harder clipping pays."""
    return percentile(stats, bits) if bits >= 8 else mse(stats, bits)

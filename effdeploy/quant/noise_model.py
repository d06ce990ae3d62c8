"""Where quantization noise comes from and how it grows: an analytic SNR budget of a network.

Each tensor is described by two powers per element: the float signal ``E[s^2]`` and the error
``E[n^2]`` the quantized network has added to it so far (SNR = 10*log10(signal / noise), the same
dB as metrics.snr_db). A uniform quantizer with step ``d`` adds ``d^2 / 12`` (rounding error,
uniform over one step), or the measured error power where clipping dominates. The rules assume
what makes powers add: elements of a tensor uncorrelated with each other, errors uncorrelated with
signals and with each other (random-like weights, steps small against the signal).

>>> x = quantize(Tensor(signal=1.0, noise=0.0), step=0.05)
>>> round(x.snr_db, 1)
36.8
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effdeploy.metrics import snr_from_sums


@dataclass(frozen=True)
class Tensor:
    """Per-element power of the float signal and of the accumulated quantization error."""

    signal: float
    noise: float

    @property
    def snr_db(self) -> float:
        return snr_from_sums(self.signal, self.noise)

    @property
    def power(self) -> float:
        """E[x_q^2] of the quantized tensor (signal and error uncorrelated)."""
        return self.signal + self.noise


def uniform_step(lo: float, hi: float, bits: int) -> float:
    """The grid step of ``bits``-bit uniform quantization over [lo, hi]."""
    return (hi - lo) / (2**bits - 1)


def rounding_noise(step: float) -> float:
    """Error power of rounding to a grid of ``step``: uniform on [-step/2, step/2]."""
    return step * step / 12.0


def clipping_noise(x: np.ndarray, lo: float, hi: float) -> float:
    """Measured error power of clamping samples ``x`` to [lo, hi]: what step^2/12 misses when a
    range cuts into the tails."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean((x - np.clip(x, lo, hi)) ** 2))


def quantizer_noise(step: float, inside: float = 1.0, clipped: float = 0.0) -> float:
    """Error power of a uniform quantizer: rounding on the fraction ``inside`` of values within
    its range, plus the clipping error power of the rest (``clipping_noise``)."""
    return inside * rounding_noise(step) + clipped


def quantize(x: Tensor, step: float, *, inside: float = 1.0, clipped: float = 0.0) -> Tensor:
    """A quantizer adds its own error to what the tensor carries."""
    return Tensor(x.signal, x.noise + quantizer_noise(step, inside, clipped))


def linear(x: Tensor, weight: np.ndarray, weight_step: float | None = None) -> Tensor:
    """y = W x (a conv is the same with W reshaped to (out, fan_in)). Signal and error pass with
    the gain ||W||_F^2 / out; weights rounded to ``weight_step`` add fan_in * step^2/12 times
    E[x_q^2] (the weight error E multiplies the whole quantized input)."""
    w = np.asarray(weight, dtype=np.float64)
    w = w.reshape(w.shape[0], -1)
    out_features, fan_in = w.shape
    gain = float(np.sum(w * w)) / out_features
    noise = gain * x.noise
    if weight_step is not None:
        noise += fan_in * rounding_noise(weight_step) * x.power
    return Tensor(gain * x.signal, noise)


def add(a: Tensor, b: Tensor) -> Tensor:
    """A residual add of uncorrelated branches: signal powers add, error powers add."""
    return Tensor(a.signal + b.signal, a.noise + b.noise)


def gate(x: Tensor, g: Tensor) -> Tensor:
    """y = g * x elementwise (an SE gate, a SiLU's sigmoid), g independent of x: the signal and
    the error x carries are scaled by E[g^2]; the gate's own error multiplies E[x_q^2]."""
    return Tensor(g.signal * x.signal, g.signal * x.noise + g.noise * x.power)

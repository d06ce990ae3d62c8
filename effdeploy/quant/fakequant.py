"""Uniform affine quantization, the arithmetic every runtime implements.

Weights: symmetric, per output channel, signed ``bits`` (zero-point 0, range [-(2^(b-1)-1), 2^(b-1)-1],
the narrow range TFLite and onnxruntime use for weights).
Activations: per tensor, asymmetric, ``bits`` levels over [lo, hi] with lo <= 0 <= hi so that
zero is exactly representable (padding, ReLU) -- a one-sided range simply has lo = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActQParams:
    """Per-tensor activation quantization: real = scale * (q - zero_point), q in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def lo(self) -> float:
        return self.scale * (self.qmin - self.zero_point)

    @property
    def hi(self) -> float:
        return self.scale * (self.qmax - self.zero_point)


def act_qparams(lo: float, hi: float, bits: int, signed: bool = True) -> ActQParams:
    """Scale and zero-point covering [lo, hi] (widened to include 0) with 2^bits levels."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if hi - lo < 1e-12:
        return ActQParams(1.0, qmin if lo == 0 else 0, qmin, qmax)
    scale = (hi - lo) / (qmax - qmin)
    zero_point = int(round(qmin - lo / scale))
    zero_point = max(qmin, min(qmax, zero_point))
    return ActQParams(scale, zero_point, qmin, qmax)


def fixed_unit_qparams(bits: int, signed: bool = True) -> ActQParams:
    """[0, 1) with scale 1/2^bits: the fixed output quantization TFLite uses for LOGISTIC."""
    qmin = -(2 ** (bits - 1)) if signed else 0
    return ActQParams(1.0 / 2**bits, qmin, qmin, qmin + 2**bits - 1)


def sigmoid_saturation(bits: int) -> float:
    """The |x| past which sigmoid(x) lies within a quarter step of an end of the fixed output grid
    of ``bits`` (``fixed_unit_qparams``), so that it rounds to that end: a sigmoid's input needs no
    range beyond it. ln(2^(bits+2) - 1): 6.93 at 8 bits (the grid's ends are reached from 6.24 on;
    the quarter step is a margin for the runtimes' own sigmoid approximations), 4.14 at 4 bits."""
    return math.log(2 ** (bits + 2) - 1)


def fake_quant_act(x: torch.Tensor, qp: ActQParams) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        q = torch.clamp(torch.round(x / qp.scale) + qp.zero_point, qp.qmin, qp.qmax)
        return (q - qp.zero_point) * qp.scale
    # the same operations in place on one new tensor: a fresh buffer per step costs more than the
    # arithmetic on activation-sized tensors (page faults), and the values are the same bits
    q = torch.div(x, qp.scale).round_().add_(qp.zero_point).clamp_(qp.qmin, qp.qmax)
    return q.sub_(qp.zero_point).mul_(qp.scale)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def _on_grid(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(x / scale) + zero_point`` clamped to [qmin, qmax] (computed in place on one new
    tensor), and the mask of the values that were inside the grid before clamping."""
    qu = torch.div(x, scale).round_().add_(zero_point)
    inside = (qu >= qmin).logical_and_(qu <= qmax)
    return qu.clamp_(qmin, qmax), inside


class _FakeQuantSTE(torch.autograd.Function):
    """``fake_quant_act`` on a fixed grid, with the straight-through gradient as one fused op
    (the composed ops build a graph of eight elementwise nodes per activation point)."""

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int):
        q, inside = _on_grid(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(inside)
        return q.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, 0.0), None, None, None, None


def fake_quant_act_ste(x: torch.Tensor, qp: ActQParams) -> torch.Tensor:
    """``fake_quant_act`` with straight-through rounding: gradients pass to x inside the range."""
    return _FakeQuantSTE.apply(x, qp.scale, qp.zero_point, qp.qmin, qp.qmax)


class _LearnableFakeQuant(torch.autograd.Function):
    """``fake_quant_act`` over a range [lo, hi] given as 0-d tensors, with the gradients of the
    composed LSQ+ expression (straight-through rounding of the input and of the zero point, the
    clamps' masks) written out, so that each activation point is one node of the graph, not twenty.
    ``tests/test_quant_core.py`` checks them against autograd through the composed expression."""

    @staticmethod
    def forward(ctx, x, lo, hi, qmin: int, qmax: int):
        scale = (hi - lo) / (qmax - qmin)
        z_round = torch.round(qmin - lo / scale)
        zero_point = z_round.clamp(qmin, qmax)
        q, inside = _on_grid(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(x, q, inside, lo, scale, zero_point, z_round)
        ctx.qrange = (qmin, qmax)
        return (q - zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, g):
        x, q, inside, lo, scale, zero_point, z_round = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        g_q = torch.where(inside, g, 0.0)  # d out / d q = scale, d q / d (x / scale) = 1 inside: g_x
        # out = (q - z) s with q = round(x / s) + z inside the grid, and q clamped outside it
        g_scale = (g * (q - zero_point)).sum() - (g_q * x).sum() / scale
        g_zero = (g_q - g).sum() * scale
        if qmin <= float(z_round) <= qmax:  # z = round(qmin - lo / s), straight through
            g_scale = g_scale + g_zero * lo / (scale * scale)
            g_lo_direct = -g_zero / scale
        else:
            g_lo_direct = torch.zeros_like(lo)
        n = qmax - qmin
        return g_q, g_lo_direct - g_scale / n, g_scale / n, None, None


def fake_quant_act_learnable(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qp: ActQParams) -> torch.Tensor:
    """``fake_quant_act`` over a range [lo, hi] given as tensors, differentiable in x, lo and hi
    (LSQ+: straight-through rounding; the clamp passes the range's gradient to the clipped values).
    The forward values equal ``fake_quant_act(x, act_qparams(lo, hi, bits))``."""
    return _LearnableFakeQuant.apply(x, lo, hi, qp.qmin, qp.qmax)


def fake_quant_act_learnable_composed(x, lo, hi, qp: ActQParams) -> torch.Tensor:
    """The same as composed autograd ops: the reference the fused gradients are tested against."""
    scale = (hi - lo) / (qp.qmax - qp.qmin)
    zero_point = torch.clamp(_round_ste(qp.qmin - lo / scale), qp.qmin, qp.qmax)
    q = torch.clamp(_round_ste(x / scale) + zero_point, qp.qmin, qp.qmax)
    return (q - zero_point) * scale


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(w: torch.Tensor, bits: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel symmetric scales (dim 0), from max |w| or from a given clip per channel."""
    amax = w.detach().abs().flatten(1).amax(1) if clip is None else clip
    return torch.clamp(amax, min=1e-12) / weight_qmax(bits)


def fake_quant_weight(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    shape = (-1,) + (1,) * (w.ndim - 1)
    s = scales.reshape(shape)
    qmax = weight_qmax(bits)
    return torch.clamp(torch.round(w / s), -qmax, qmax) * s


INT32_MAX = 2**31 - 1


def fake_quant_bias(b: torch.Tensor, input_scale: float, weight_scales: torch.Tensor) -> torch.Tensor:
    """A bias on the int32 grid ``input_scale * weight_scale`` (per output channel), dequantized the
    way a runtime does it: int32 value times the float32 scale."""
    grid = float(input_scale) * weight_scales.detach().double()
    q = torch.round(b.detach().double() / grid).clamp(-INT32_MAX, INT32_MAX)
    return (q.float() * grid.float()).to(b.dtype)


def quantize_weight_int(w: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    shape = (-1,) + (1,) * (w.ndim - 1)
    qmax = weight_qmax(bits)
    return torch.clamp(torch.round(w / scales.reshape(shape)), -qmax, qmax).to(torch.int8)


def mse_weight_clip(w: torch.Tensor, bits: int, grid: int = 100, min_ratio: float = 0.3) -> torch.Tensor:
    """Per-channel clipping value minimising the weight quantization MSE (grid search on max|w|)."""
    flat = w.detach().flatten(1)
    amax = flat.abs().amax(1).clamp(min=1e-12)
    best = amax.clone()
    best_err = torch.full_like(amax, float("inf"))
    qmax = weight_qmax(bits)
    for r in torch.linspace(min_ratio, 1.0, grid):
        clip = amax * r
        s = (clip / qmax)[:, None]
        err = ((torch.clamp(torch.round(flat / s), -qmax, qmax) * s - flat) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, clip, best)
        best_err = torch.where(better, err, best_err)
    return best

"""The analytic noise budget against Monte-Carlo: real rounding of real samples through a linear
layer, a chain of two, a residual add and a gate."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from effdeploy.quant import noise_model as nm

SAMPLES, WIDTH = 20_000, 128


def _round(x: np.ndarray, step: float) -> np.ndarray:
    return np.round(x / step) * step


def _measured(ref: np.ndarray, test: np.ndarray) -> nm.Tensor:
    return nm.Tensor(float(np.mean(ref**2)), float(np.mean((test - ref) ** 2)))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_docstring_example():
    assert doctest.testmod(nm).failed == 0


def test_rounding_noise_is_step_squared_over_12(rng):
    x = rng.normal(0, 1, 1_000_000)
    step = 0.05
    assert np.mean((_round(x, step) - x) ** 2) == pytest.approx(step**2 / 12, rel=0.01)
    assert nm.uniform_step(-1.0, 1.0, 8) == pytest.approx(2 / 255)


def test_clipping_noise_where_rounding_alone_underestimates(rng):
    x = rng.laplace(0, 1, 1_000_000)
    lo, hi, bits = -2.0, 2.0, 4
    step = nm.uniform_step(lo, hi, bits)
    q = lo + np.round((np.clip(x, lo, hi) - lo) / step) * step  # 16 levels from lo to hi
    measured = np.mean((q - x) ** 2)
    inside = float(np.mean((x >= lo) & (x <= hi)))
    predicted = nm.quantizer_noise(step, inside=inside, clipped=nm.clipping_noise(x, lo, hi))
    assert predicted == pytest.approx(measured, rel=0.02)
    assert nm.rounding_noise(step) < 0.5 * measured  # clipping dominates here


def test_one_linear_layer(rng):
    x = rng.normal(0, 1.5, (SAMPLES, WIDTH))
    w = rng.normal(0, 1 / np.sqrt(WIDTH), (64, WIDTH))
    a_step, w_step = 0.1, 0.02
    y_f = x @ w.T
    y_q = _round(x, a_step) @ _round(w, w_step).T
    got = _measured(y_f, y_q)
    model = nm.linear(nm.quantize(nm.Tensor(2.25, 0.0), a_step), w, weight_step=w_step)
    assert model.signal == pytest.approx(got.signal, rel=0.03)
    assert model.noise == pytest.approx(got.noise, rel=0.05)
    assert model.snr_db == pytest.approx(10 * np.log10(got.signal / got.noise), abs=0.25)


def test_chain_of_two_linear_layers_requantized_between(rng):
    x = rng.normal(0, 1, (SAMPLES, WIDTH))
    w1 = rng.normal(0, 1 / np.sqrt(WIDTH), (96, WIDTH))
    w2 = rng.normal(0, 1 / np.sqrt(96), (32, 96))
    a_step, w_step = 0.08, 0.03
    h_f = x @ w1.T
    h_q = _round(_round(x, a_step) @ _round(w1, w_step).T, a_step)
    y_f, y_q = h_f @ w2.T, h_q @ _round(w2, w_step).T
    got = _measured(y_f, y_q)
    t = nm.quantize(nm.Tensor(1.0, 0.0), a_step)
    t = nm.quantize(nm.linear(t, w1, w_step), a_step)
    t = nm.linear(t, w2, w_step)
    assert t.signal == pytest.approx(got.signal, rel=0.05)
    assert t.noise == pytest.approx(got.noise, rel=0.06)


def test_residual_add(rng):
    x = rng.normal(0, 1, (SAMPLES, WIDTH))
    w = rng.normal(0, 0.5 / np.sqrt(WIDTH), (WIDTH, WIDTH))
    a_step, w_step = 0.1, 0.02
    xq = _round(x, a_step)
    branch_f, branch_q = x @ w.T, _round(xq @ _round(w, w_step).T, a_step)
    got = _measured(x + branch_f, xq + branch_q)
    t = nm.quantize(nm.Tensor(1.0, 0.0), a_step)
    model = nm.add(t, nm.quantize(nm.linear(t, w, w_step), a_step))
    assert model.signal == pytest.approx(got.signal, rel=0.03)
    assert model.noise == pytest.approx(got.noise, rel=0.05)


def test_gate(rng):
    x = rng.normal(0, 2, (SAMPLES, WIDTH))
    g = 1 / (1 + np.exp(-rng.normal(0, 1.5, (SAMPLES, WIDTH))))  # sigmoid outputs, independent of x
    x_step, g_step = 0.1, 1 / 31  # a 5-bit gate on [0, 1]
    y_f = g * x
    y_q = _round(g, g_step) * _round(x, x_step)
    got = _measured(y_f, y_q)
    e_g2 = float(np.mean(g**2))
    model = nm.gate(nm.quantize(nm.Tensor(4.0, 0.0), x_step), nm.quantize(nm.Tensor(e_g2, 0.0), g_step))
    assert model.signal == pytest.approx(got.signal, rel=0.03)
    assert model.noise == pytest.approx(got.noise, rel=0.05)
    # the gate's own error dominates here: dropping it would miss most of the noise
    without = nm.gate(nm.quantize(nm.Tensor(4.0, 0.0), x_step), nm.Tensor(e_g2, 0.0))
    assert without.noise < 0.5 * got.noise

"""Quantizer core invariants: fake-quant arithmetic, per-channel weight scales, observers,
BN folding and the simulation's quantization points."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdeploy.metrics import snr_db
from effdeploy.model.efficientnet import build_model
from effdeploy.quant.fakequant import (
    act_qparams,
    fake_quant_act,
    fake_quant_act_learnable,
    fake_quant_act_learnable_composed,
    fake_quant_act_ste,
    fake_quant_weight,
    fixed_unit_qparams,
    mse_weight_clip,
    quantize_weight_int,
    weight_qmax,
    weight_scales,
)
from effdeploy.quant.fold import fold_batchnorm
from effdeploy.quant.observers import OBSERVERS, TensorStats, get_observer
from effdeploy.quant.sim import QuantSim, resolve_bits


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-50, 0, allow_nan=False),
    hi=st.floats(0.01, 50, allow_nan=False),
    bits=st.integers(2, 8),
)
def test_act_qparams_cover_range_and_represent_zero(lo: float, hi: float, bits: int) -> None:
    qp = act_qparams(lo, hi, bits)
    assert qp.qmin <= qp.zero_point <= qp.qmax
    assert qp.qmax - qp.qmin == 2**bits - 1
    assert qp.lo <= lo + qp.scale and qp.hi >= hi - qp.scale  # covers the range (to one step)
    zero = fake_quant_act(torch.zeros(1), qp)
    assert zero.item() == 0.0  # zero is exact (padding, ReLU)


def test_one_sided_range_has_zero_point_at_qmin() -> None:
    qp = act_qparams(0.0, 6.0, 8)
    assert qp.zero_point == qp.qmin == -128
    assert qp.hi == pytest.approx(6.0)


def test_fake_quant_round_trip_and_clipping() -> None:
    qp = act_qparams(-1.0, 3.0, 8)
    grid = (torch.arange(qp.qmin, qp.qmax + 1) - qp.zero_point) * qp.scale
    assert torch.equal(fake_quant_act(grid, qp), grid)  # grid points are fixed points
    x = torch.linspace(qp.lo, qp.hi, 1001)
    assert (fake_quant_act(x, qp) - x).abs().max() <= qp.scale / 2 + 1e-6
    assert fake_quant_act(torch.tensor([100.0]), qp).item() == pytest.approx(qp.hi)
    assert fake_quant_act(torch.tensor([-100.0]), qp).item() == pytest.approx(qp.lo)


def test_ste_fake_quant_passes_gradient_inside_the_grid_only() -> None:
    qp = act_qparams(-1.0, 3.0, 8)
    x = torch.tensor([-5.0, -1.0, 0.3, 2.9, 3.2, 7.0], requires_grad=True)
    y = fake_quant_act_ste(x, qp)
    assert torch.equal(y, fake_quant_act(x.detach(), qp))
    y.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    # scale 4/255, zero point -64: -1 maps to qmin exactly and keeps its gradient; -5, 3.2
    # (round(204.0) - 64 = 140 > 127) and 7 clip
    inside = [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]
    assert x.grad.tolist() == inside


@pytest.mark.parametrize(("lo", "hi", "bits"), [(-1.0, 3.0, 8), (0.0, 6.0, 8), (-0.7, 0.2, 4), (-2.0, 5.0, 4)])
def test_learnable_fake_quant_matches_autograd_of_the_composed_expression(lo: float, hi: float, bits: int) -> None:
    """The fused op's forward equals the composed one bit for bit; its gradients in x, lo and hi
    equal those autograd derives through the composed ops (round straight through, clamps' masks)."""
    gen = torch.Generator().manual_seed(bits)
    x0 = torch.randn(2, 3, 5, 5, generator=gen) * 3  # past both ends of every range
    g = torch.randn(2, 3, 5, 5, generator=gen)
    qp = act_qparams(lo, hi, bits)
    grads = []
    for fn in (fake_quant_act_learnable, fake_quant_act_learnable_composed):
        x = x0.clone().requires_grad_(True)
        lo_t, hi_t = torch.tensor(lo * 0.9, requires_grad=True), torch.tensor(hi * 1.1, requires_grad=True)
        y = fn(x, lo_t, hi_t, qp)
        y.backward(g)
        grads.append((y.detach(), x.grad, lo_t.grad, hi_t.grad))
    (y1, gx1, glo1, ghi1), (y2, gx2, glo2, ghi2) = grads
    assert torch.equal(y1, y2)
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    assert float(ghi2) != 0.0
    assert float(glo1) == pytest.approx(float(glo2), rel=1e-5, abs=1e-6)
    assert float(ghi1) == pytest.approx(float(ghi2), rel=1e-5, abs=1e-6)


def test_fixed_sigmoid_range_is_tflite_logistic() -> None:
    qp = fixed_unit_qparams(8)
    assert qp.scale == 1 / 256 and qp.zero_point == -128
    assert qp.lo == 0.0 and qp.hi == pytest.approx(255 / 256)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_scales_are_per_channel_symmetric(bits: int) -> None:
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).reshape(-1, 1, 1, 1)
    s = weight_scales(w, bits)
    assert s.shape == (16,)
    # each channel's largest magnitude lands exactly on the largest integer
    q = quantize_weight_int(w, s, bits)
    assert torch.equal(q.flatten(1).abs().amax(1), torch.full((16,), weight_qmax(bits), dtype=torch.int8))
    assert q.min() >= -weight_qmax(bits) and q.max() <= weight_qmax(bits)
    # error bounded by half a step per channel
    err = (fake_quant_weight(w, s, bits) - w).flatten(1).abs().amax(1)
    assert torch.all(err <= s / 2 + 1e-7)


def test_mse_clip_never_worse_than_minmax() -> None:
    w = torch.randn(32, 64) * 0.1
    w[:, 0] = 3.0  # an outlier per channel: min-max wastes the grid on it
    for bits in (4, 8):
        clip = mse_weight_clip(w, bits)
        assert torch.all(clip <= w.abs().amax(1) + 1e-6)
        e_mse = ((fake_quant_weight(w, weight_scales(w, bits, clip), bits) - w) ** 2).sum()
        e_mm = ((fake_quant_weight(w, weight_scales(w, bits), bits) - w) ** 2).sum()
        assert e_mse <= e_mm


def _stats(x: torch.Tensor) -> TensorStats:
    s = TensorStats()
    s.update_range(x)
    s.update_hist(x)
    return s


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observers_pick_a_range_inside_minmax(name: str) -> None:
    x = torch.cat([torch.randn(100_000), torch.tensor([25.0, -12.0])])  # heavy outliers
    s = _stats(x)
    lo, hi = get_observer(name)(s, 8)
    assert s.lo - 1e-6 <= lo <= 0 <= hi <= s.hi + 1e-6
    if name != "minmax":
        assert hi < 25.0  # the clipping observers cut the outlier


def test_clipping_observers_beat_minmax_on_heavy_tails() -> None:
    x = torch.cat([torch.randn(200_000), torch.tensor([40.0])])
    s = _stats(x)
    errs = {}
    for name in ("minmax", "mse", "entropy", "percentile"):
        qp = act_qparams(*get_observer(name)(s, 4), 4)
        errs[name] = float(((fake_quant_act(x, qp) - x) ** 2).mean())
    assert errs["mse"] < errs["minmax"]
    assert errs["entropy"] < errs["minmax"]
    assert errs["percentile"] < errs["minmax"]


def _trained_like(tiny_config: dict, placement: str = "after") -> torch.nn.Module:
    """A tiny model whose BN statistics match its data, so activations have real ranges."""
    model = build_model({**tiny_config, "se_placement": placement})
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for _ in range(4):
            model(torch.randn(32, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("placement", ["after", "before", "none"])
def test_fold_batchnorm_is_exact(tiny_config: dict, placement: str) -> None:
    model = _trained_like(tiny_config, placement)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert snr_db(model(x).numpy(), folded(x).numpy()) > 100


def test_fold_refuses_groupnorm(tiny_config: dict) -> None:
    from effdeploy.errors import EffdeployError

    with pytest.raises(EffdeployError, match="GroupNorm"):
        fold_batchnorm(build_model({**tiny_config, "norm": "gn"}))


@pytest.mark.parametrize("placement", ["after", "before", "none"])
def test_sim_w8a8_tracks_float_and_names_every_point(tiny_config: dict, placement: str) -> None:
    model = _trained_like(tiny_config, placement)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    batches = [torch.randn(16, 3, 32, 32) for _ in range(4)]
    sim.calibrate(batches)
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    q, captured = sim.run_capture(x, quantized=True)
    f, captured_f = sim.run_capture(x, quantized=False)
    assert snr_db(ref, f.numpy()) > 100  # quantization off: the folded graph is the float model
    # 8-bit min-max on a Gaussian input is ~40 dB at the input; a random net then loses ~1 dB per
    # layer (random weights do not average noise away), so only a loose floor is meaningful here
    assert snr_db(ref, q.numpy()) > 3
    assert snr_db(captured_f["input"].numpy(), captured["input"].numpy()) > 35
    assert set(captured) == set(sim.points) == set(captured_f)
    names = set(sim.points)
    assert {"input", "classifier", "pool", "stem.conv", "stem.act", "stem.act.sigmoid"} <= names
    se_points = {n for n in names if ".se." in n or n.endswith(".se")}
    assert bool(se_points) == (placement != "none")
    for p in sim.points.values():
        assert p.qparams is not None and p.qparams.qmin <= p.qparams.zero_point <= p.qparams.qmax
        if p.kind == "sigmoid":
            assert p.qparams == fixed_unit_qparams(8)
        # every captured quantized tensor lies on its grid
        t = captured[p.name]
        codes = t / p.qparams.scale + p.qparams.zero_point
        assert torch.allclose(codes, codes.round(), atol=1e-3)


def test_sim_weights_quantized_per_channel_and_restorable(tiny_config: dict) -> None:
    model = _trained_like(tiny_config)
    sim = QuantSim(model, weight_bits=4, act_bits=8, weight_overrides=[(r"^classifier$", 8)])
    sim.calibrate([torch.randn(8, 3, 32, 32)])
    assert sim.weights["classifier"].bits == 8
    assert sim.weights["stem.conv"].bits == 4
    for w in sim.weights.values():
        codes = w.module.weight.detach() / w.scales.reshape((-1,) + (1,) * (w.module.weight.ndim - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= weight_qmax(w.bits) + 1e-4
    sim.set_weights(quantized=False)
    assert all(torch.equal(w.module.weight, w.float_weight) for w in sim.weights.values())


def test_resolve_bits_last_matching_override_wins() -> None:
    ov = [(r"dwconv", 8), (r"block2", 6), (r"block2a", None)]
    assert resolve_bits("blocks.block2a.dwconv.conv", 4, ov) == 6
    assert resolve_bits("blocks.block3a.dwconv.conv", 4, ov) == 8
    assert resolve_bits("head.conv", 4, ov) == 4
    assert np.isfinite(snr_db(np.ones(3), np.ones(3) * 1.01))


def test_sim_converges_to_float_and_degrades_with_fewer_bits(tiny_config: dict) -> None:
    model = _trained_like(tiny_config)
    x = torch.randn(16, 3, 32, 32)
    batches = [x]  # calibrated on the measured inputs: no clipping, so only rounding noise is left
    with torch.no_grad():
        ref = model(x).numpy()
    snr = {}
    for bits in (4, 6, 8, 12, 16):
        sim = QuantSim(model, weight_bits=bits, act_bits=bits)
        sim.calibrate(batches)
        snr[bits] = snr_db(ref, sim(x).numpy())
    assert snr[4] < snr[8] < snr[12] < snr[16]
    # a random net amplifies each layer's noise by ~20 dB (measured: W8A8 9 dB, W12A12 31 dB,
    # W16A16 55 dB here), yet more bits must keep converging towards float
    assert snr[12] > snr[8] + 10 and snr[16] > snr[12] + 10 and snr[16] > 45


def test_snr_accumulator_matches_snr_db_over_batches() -> None:
    """Streaming sums over batches give exactly the SNR of the concatenated tensors."""
    from effdeploy.metrics import SnrAccumulator, snr_db

    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(4, 3, 5, 5)) for _ in range(3)]
    test = [r + rng.normal(scale=0.1, size=r.shape) for r in ref]
    acc = SnrAccumulator()
    for r, t in zip(ref, test, strict=True):
        acc.add("x", r, t.reshape(4, -1))  # a runtime's layout may be flat: same numbers count
    expected = snr_db(np.concatenate(ref), np.concatenate(test))
    assert acc.result()["x"] == pytest.approx(expected, abs=1e-9)
    acc.add("same", ref[0], ref[0])
    assert acc.result()["same"] == float("inf")


@pytest.mark.parametrize(("placement", "padding"), [("after", "symmetric"), ("before", "same"), ("none", "same")])
def test_every_layer_reads_a_quantization_point(tiny_config: dict, placement: str, padding: str) -> None:
    """Each conv / linear layer knows the point it reads (through TF 'SAME' padding too): its scale
    fixes the int32 bias grid the runtimes use."""
    model = _trained_like({**tiny_config, "padding": padding}, placement)
    sim = QuantSim(model)
    inputs = {n: w.input_point for n, w in sim.weights.items()}
    assert all(p is not None for p in inputs.values()), inputs
    assert inputs["stem.conv"] == "input"
    assert inputs["classifier"] == "pool"
    if placement != "none":
        se = next(n.removesuffix(".reduce") for n in inputs if n.endswith("se.reduce"))
        assert inputs[f"{se}.reduce"] == f"{se}.pool"
        assert inputs[f"{se}.expand"] == f"{se}.act"


def test_quantized_biases_lie_on_the_int32_grid(tiny_config: dict) -> None:
    """In quantized mode a bias is an integer multiple of input scale x weight scale (what
    onnxruntime and TFLite store), and the float bias comes back in float mode."""
    model = _trained_like(tiny_config)
    x = torch.randn(16, 3, 32, 32)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    sim.calibrate([x])
    checked = 0
    for w in sim.weights.values():
        if w.float_bias is None:
            continue
        grid = sim.points[w.input_point].qparams.scale * w.scales.double()
        steps = w.module.bias.detach().double() / grid
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert (w.module.bias.detach() - w.float_bias).abs().le(0.5 * grid + 1e-6).all()
        checked += 1
    assert checked > 5
    with sim.running(quantized=False):
        assert all(torch.equal(w.module.bias, w.float_bias) for w in sim.weights.values() if w.float_bias is not None)


def test_dead_channel_keeps_its_bias_on_the_int32_grid(tiny_config: dict) -> None:
    """A channel with all-zero weights and a bias (a constant output, common in TF-trained
    weights) keeps that bias: its weight scale is floored so the bias fits the int32 grid."""
    model = _trained_like(tiny_config)
    x = torch.randn(16, 3, 32, 32)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    name = next(n for n, w in sim.weights.items() if w.kind == "pointwise" and w.float_bias is not None)
    w = sim.weights[name]
    w.float_weight[0].zero_()
    w.float_bias[0] = 3.0
    sim.calibrate([x])
    assert torch.all(w.quantized()[0] == 0)
    grid = sim.points[w.input_point].qparams.scale * w.scales.double()
    assert abs(3.0 / grid[0].item()) <= 2**24 + 1
    assert w.module.bias[0].item() == pytest.approx(3.0, rel=1e-6)


def test_top1_breaks_ties_like_argmax() -> None:
    """Tied int8 logits: top-1 accuracy follows argmax (the lower index), so an output that agrees
    with another on every argmax also scores the same top-1."""
    import numpy as np

    from effdeploy.metrics import top1_agreement, topk_accuracy

    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, size=(2000, 50)).astype(np.float32)  # many ties at the top
    labels = logits.argmax(1)
    assert topk_accuracy(logits, labels, 1) == 1.0
    assert top1_agreement(logits, logits.copy()) == 1.0
    assert topk_accuracy(logits, (labels + 1) % 50, 2) >= topk_accuracy(logits, (labels + 1) % 50, 1)

"""Block reconstruction (BRECQ + QDrop + learned step sizes): at W4A4 it reproduces the float
block outputs better than per-layer AdaRound on images it never saw, leaves every weight on its
integer grid and every range where the emitters read it, is a registered pass between AdaRound
and bias correction, and is deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant_core import _trained_like

import effdeploy.quant.block_reconstruction  # noqa: F401  (registers the pass)
from effdeploy.config import QuantConfig
from effdeploy.quant.block_reconstruction import block_names, block_reconstruction, fisher_weights
from effdeploy.quant.fakequant import act_qparams, weight_qmax
from effdeploy.quant.passes import adaround
from effdeploy.quant.pipeline import block_output_points
from effdeploy.quant.registry import enabled_passes, get_pass, run_passes
from effdeploy.quant.sim import QuantSim
from effdeploy.report import method_label


def _w4a4(model) -> QuantSim:
    return QuantSim(model, weight_bits=4, act_bits=4, saturate_sigmoid_inputs=True)


@pytest.fixture
def setup(tiny_config: dict):
    model = _trained_like(tiny_config)
    g = torch.Generator().manual_seed(1)
    cal = [torch.randn(64, 3, 32, 32, generator=g) for _ in range(2)]
    held = torch.randn(128, 3, 32, 32, generator=g)  # never seen by any pass

    def calibrated() -> QuantSim:
        sim = _w4a4(model)
        sim.calibrate(cal, observer="mse", weight_observer="mse")
        return sim

    return model, cal, held, calibrated


def _block_errors(sim: QuantSim, x: torch.Tensor) -> dict[str, float]:
    """Each block output's error energy relative to the float output's, the network quantized
    end to end (the quantity the report's block SNR is made of)."""
    _, f = sim.run_capture(x, quantized=False)
    _, q = sim.run_capture(x, quantized=True)
    return {n: float(((q[n] - f[n]) ** 2).sum() / (f[n] ** 2).sum()) for n in block_output_points(sim)}


def _codes(w) -> torch.Tensor:
    return w.module.weight.detach() / w.scales.reshape((-1,) + (1,) * (w.float_weight.ndim - 1))


@pytest.mark.slow
def test_beats_per_layer_adaround_on_held_out_images_at_w4a4(setup) -> None:
    """Same iteration budget, same calibration images, same blocks; measured on other images.
    The first five of the tiny net's ten blocks, for time (all ten, 200 iterations: lower at every
    block output too, 0.138 vs 0.146 at the first and 1.16 vs 1.45 at the last)."""
    _, cal, held, calibrated = setup
    nearest, ada, blk = calibrated(), calibrated(), calibrated()
    blocks = block_names(blk)[:5]
    adaround(ada, cal, layers=[n for n in ada.weights if any(n.startswith(b + ".") for b in blocks)], iters=200)
    report = block_reconstruction(blk, cal, blocks=blocks, iters=200)
    e_near, e_ada, e_blk = (_block_errors(s, held) for s in (nearest, ada, blk))
    outs = block_output_points(blk)[:5]
    for out in outs:
        assert e_blk[out] < e_ada[out] < e_near[out], out
    # measured: 3-16% less error than AdaRound per block (0.138 vs 0.146 ... 0.820 vs 0.862), 8% on average
    assert np.mean([e_blk[o] / e_ada[o] for o in outs]) < 0.95
    for name in blocks:
        r = report[name]
        assert r["kept"] and r["mse_after"] < r["mse_before"]
        assert r["iters"] == 200 and r["ranges_moved"]


def test_weights_end_on_their_integer_grid_and_ranges_where_emitters_read_them(setup) -> None:
    _, cal, held, calibrated = setup
    sim = calibrated()
    start = {n: p.qparams for n, p in sim.points.items()}
    hooks = sum(len(m._forward_hooks) for m in sim.model.modules())
    cal = [cal[0][:32]]
    report = block_reconstruction(sim, cal, iters=4)
    assert list(report) == block_names(sim)
    assert sum(len(m._forward_hooks) for m in sim.model.modules()) == hooks  # its quantizers are gone
    assert sim.mode == "quant"
    for name, w in sim.weights.items():
        codes = _codes(w)
        ints = codes.round()
        assert torch.allclose(codes, ints, rtol=0, atol=1e-5), name
        assert ints.abs().max() <= weight_qmax(4), name
    kept = [b for b, r in report.items() if r["kept"]]
    assert kept  # something was learned: the grid check is not about untouched layers only
    assert all(sim.weights[n].qweight is not None for b in kept for n in report[b]["layers"])
    assert any(report[b]["flipped"] > 0 for b in kept)
    for b in kept:
        for point, moved in report[b]["ranges_moved"].items():
            p = sim.points[point]
            assert [p.qparams.lo, p.qparams.hi] == moved["to"] and p.qparams.scale == moved["scale"][1]
            grid = act_qparams(p.qparams.lo, p.qparams.hi, 4)  # an ordinary 4-bit grid
            assert (p.qparams.zero_point, p.qparams.qmin, p.qparams.qmax) == (grid.zero_point, -8, 7)
            assert p.qparams.scale == pytest.approx(grid.scale, rel=1e-12)
            assert p.qparams != start[point]
            if p.limit is not None:  # a sigmoid's saturation bounds the learned range too
                assert p.limit[0] - p.qparams.scale <= p.qparams.lo and p.qparams.hi <= p.limit[1] + p.qparams.scale
    # the report's "after" is what the simulation now computes, end to end, on the same images
    x = torch.cat(cal)
    _, f = sim.run_capture(x, quantized=False)
    _, q = sim.run_capture(x, quantized=True)
    for b, out in zip(block_names(sim), block_output_points(sim), strict=True):
        mse = float(((q[out] - f[out]) ** 2).mean())
        assert mse == pytest.approx(report[b]["mse_after"], rel=1e-4), b
    # nothing random is left in the quantized network (QDrop is off outside reconstruction)
    assert torch.equal(sim(held[:8]), sim(held[:8]))


@pytest.mark.slow
def test_the_emitted_onnx_model_carries_the_learned_state(setup, tmp_path) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    from effdeploy.quant.emit_onnx import emit_qdq_onnx

    _, cal, _, calibrated = setup
    sim = calibrated()
    blocks = block_names(sim)[:2]
    report = block_reconstruction(sim, [cal[0][:32]], blocks=blocks, iters=5)
    moved = {p for b in blocks for p in report[b]["ranges_moved"]}
    assert moved
    path = emit_qdq_onnx(sim, tmp_path / "q.onnx")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    for point in moved:
        assert inits[f"{point.replace('.', '_')}_scale"] == np.float32(sim.points[point].qparams.scale)
    for b in blocks:
        for layer in report[b]["layers"]:
            w = sim.weights[layer]
            k = inits[f"{layer.replace('.', '_')}_wq"].astype(np.int64)
            s = w.scales.double().numpy().reshape((-1,) + (1,) * (k.ndim - 1))
            np.testing.assert_allclose(k * s, w.qweight.double().numpy(), rtol=1e-6, atol=1e-12)


def test_registered_between_adaround_and_bias_correction() -> None:
    p = get_pass("block_reconstruction")
    assert (p.order, p.label) == (35, "block reconstruction")
    assert get_pass("adaround").order < p.order < get_pass("bias_correction").order
    q = QuantConfig(block_reconstruction=True)
    assert enabled_passes(q, 4) == ("adaround", "block_reconstruction", "bias_correction")
    assert "block_reconstruction" not in enabled_passes(QuantConfig(), 4)  # off by default
    # per precision: on for W4A4 only
    q = QuantConfig(by_precision={"w4a4": {"block_reconstruction": True, "qdrop_prob": 0.25}})
    assert "block_reconstruction" in enabled_passes(q.for_precision("w4a4"), 4)
    assert "block_reconstruction" not in enabled_passes(q.for_precision("w4a8"), 4)
    assert q.for_precision("w4a4").qdrop_prob == 0.25
    assert method_label({"name": "ours", "passes": ["adaround", "block_reconstruction", "bias_correction"]}) == (
        "ours + block reconstruction"
    )


def test_runs_in_registry_order_with_the_config_budget(setup) -> None:
    _, cal, _, calibrated = setup
    q = QuantConfig(block_reconstruction=True, block_reconstruction_iters=2, adaround_iters=1, qdrop_prob=0.0)
    reports = run_passes(calibrated(), [cal[0][:16]], q, ["bias_correction", "block_reconstruction", "adaround"])
    assert list(reports) == ["adaround", "block_reconstruction", "bias_correction"]
    assert {r["iters"] for r in reports["block_reconstruction"].values()} == {2}


def test_same_seed_same_weights(setup) -> None:
    _, cal, _, calibrated = setup

    def run(seed: int) -> QuantSim:
        sim = calibrated()
        block_reconstruction(sim, [cal[0][:32]], blocks=block_names(sim)[1:3], iters=6, seed=seed)
        return sim

    a, b, c = run(0), run(0), run(1)
    for name, w in a.weights.items():
        assert torch.equal(w.module.weight, b.weights[name].module.weight), name
    assert all(a.points[n].qparams == b.points[n].qparams for n in a.points)
    # the seed is what decides: another one draws other batches and QDrop masks
    assert any(not torch.equal(w.module.weight, c.weights[n].module.weight) for n, w in a.weights.items())


def test_fisher_weights_are_the_squared_loss_gradient_at_the_block_output(setup) -> None:
    """Checked against the gradient of the network's tail, run by hand from a block's output."""
    _, cal, _, calibrated = setup
    sim = calibrated()
    names = block_names(sim)
    picked = [names[2], names[-1]]
    weights = fisher_weights(sim, cal, picked)
    model = sim.model
    for name in picked:
        k = names.index(name)
        grads = []
        with sim.running(quantized=False):
            for x in cal:
                with torch.no_grad():
                    h = model.blocks[: k + 1](model.stem(x))
                h.requires_grad_(True)
                logits = model.forward_head(model.head(model.blocks[k + 1 :](h)))
                loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum")
                (g,) = torch.autograd.grad(loss, h)
                grads.append(g**2)
        expect = torch.cat(grads)
        expect = expect / expect.mean()
        assert weights[name].shape == expect.shape
        torch.testing.assert_close(weights[name], expect, rtol=1e-4, atol=1e-6)
        assert abs(float(weights[name].mean()) - 1) < 1e-5

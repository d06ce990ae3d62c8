"""Sigmoid inputs get no range past the sigmoid's saturation: no sigmoid output changes, the grid
inside gets finer, and every pass that moves ranges keeps to the limit."""

from __future__ import annotations

import pytest
import torch
from test_quant_core import _trained_like

from effdeploy.metrics import snr_db
from effdeploy.quant.fakequant import act_qparams, fake_quant_act, fixed_unit_qparams, sigmoid_saturation
from effdeploy.quant.passes import learn_ranges, range_search
from effdeploy.quant.pipeline import layer_snr
from effdeploy.quant.sim import QuantSim


@pytest.mark.parametrize("bits", [4, 8])
def test_sigmoid_saturation_is_where_the_output_grid_ends(bits: int) -> None:
    bound = sigmoid_saturation(bits)
    grid = fixed_unit_qparams(bits)
    outside = torch.linspace(bound, 1000.0, 5001)
    assert torch.all(fake_quant_act(torch.sigmoid(-outside), grid) == grid.lo)
    assert torch.all(fake_quant_act(torch.sigmoid(outside), grid) == grid.hi)
    # not a loose bound: one unit inside it, the output leaves the grid's lower end (the upper
    # end, 1 - 1/2^bits, is reached earlier; the bound is kept symmetric)
    assert fake_quant_act(torch.sigmoid(torch.tensor(1.0 - bound)), grid) > grid.lo


def test_a_saturated_range_changes_no_sigmoid_output_past_it() -> None:
    """A range [-900, 26] (a gate some images shut hard) against the same range within the limit:
    past the limit the sigmoid's quantized output is identical, inside it the grid is finer."""
    bound = sigmoid_saturation(8)
    wide = act_qparams(-900.0, 26.0, 8)
    tight = act_qparams(-bound, min(26.0, bound), 8)
    x = torch.linspace(-1200.0, 40.0, 200_001)
    grid = fixed_unit_qparams(8)

    def gate(qp):
        return fake_quant_act(torch.sigmoid(fake_quant_act(x, qp)), grid)

    past = x.abs() >= bound
    assert torch.equal(gate(wide)[past], gate(tight)[past])
    exact = fake_quant_act(torch.sigmoid(x), grid)
    assert tight.scale < wide.scale / 50
    # inside, the gate computed from the tight grid is the exact gate to within two output steps
    # (half an input step times the sigmoid's slope 1/4, then rounded); the wide grid (a step of
    # 3.6) misses it by up to a third of the whole [0, 1] range
    assert (gate(tight) - exact).abs().max() <= 2 * grid.scale + 1e-6
    assert (gate(wide) - exact).abs().max() > 0.3


@pytest.fixture
def gated_model(tiny_config: dict):
    """A tiny model whose SE gates some images shut hard (gate logits of +-hundreds, as in the SE
    before reference model), and its calibration images."""
    model = _trained_like(tiny_config)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith("se.expand"):
                m.weight.mul_(40.0)
                m.bias.mul_(40.0)
    return model, torch.randn(64, 3, 32, 32)


def test_limits_sit_on_the_tensors_a_sigmoid_reads(gated_model) -> None:
    model, x = gated_model
    sim = QuantSim(model, weight_bits=8, act_bits=8, saturate_sigmoid_inputs=True)
    sim.calibrate([x], observer="minmax")
    bound = sigmoid_saturation(8)
    limited = {n: p.limit for n, p in sim.points.items() if p.limit is not None}
    gates = {n for n in sim.points if n.endswith(".se.expand")}
    silu_inputs = {
        n for n in sim.points if n.endswith((".conv", ".reduce")) and f"{n.rsplit('.', 1)[0]}.act.sigmoid" in sim.points
    }
    assert gates and silu_inputs and set(limited) == gates | silu_inputs
    assert all(limited[n] == (-bound, bound) for n in gates)
    assert all(limited[n] == (-bound, float("inf")) for n in silu_inputs)
    for name, (lo, hi) in limited.items():
        qp = sim.points[name].qparams
        assert lo - qp.scale <= qp.lo and qp.hi <= hi + qp.scale
    # the gates are the wide ones here: min-max would have reached hundreds
    assert min(sim.points[n].stats.lo for n in gates) < -50 * bound
    assert QuantSim(model, saturate_sigmoid_inputs=False).points[next(iter(gates))].limit is None


def test_saturation_makes_hard_gates_accurate(gated_model) -> None:
    """Only the gate logits and the gates at 8 bits (all else at 16): the gates' SNR is the gate
    logits' ranges at work. Measured: every gate the same or better, by up to 8.9 dB (block3a)."""
    model, x = gated_model
    snr = {}
    for saturate in (False, True):
        sim = QuantSim(
            model,
            weight_bits=8,
            act_bits=16,
            act_overrides=[(r"se\.(expand|gate)$", 8)],
            saturate_sigmoid_inputs=saturate,
        )
        sim.calibrate([x], observer="minmax")
        snr[saturate] = layer_snr(sim, [x])
        if saturate:
            # a limited point's SNR compares with the float tensor clamped to its limit
            p = sim.points["blocks.block3a.se.expand"]
            _, f = sim.run_capture(x, quantized=False)
            _, q = sim.run_capture(x, quantized=True)
            assert snr[True][p.name] == pytest.approx(
                snr_db(p.reference(f[p.name]).numpy(), q[p.name].numpy()), abs=0.01
            )
    gates = [n for n in snr[True] if n.endswith(".se.gate")]
    gain = {n: snr[True][n] - snr[False][n] for n in gates}
    assert all(g > -0.5 for g in gain.values()), gain
    assert max(gain.values()) > 5, gain


def test_passes_keep_ranges_within_limits(gated_model) -> None:
    model, x = gated_model
    sim = QuantSim(model, weight_bits=8, act_bits=8, saturate_sigmoid_inputs=True)
    sim.calibrate([x], observer="percentile")
    searched = range_search(sim, [x], rounds=1)
    learned = learn_ranges(sim, [x], steps=40, lr=0.05, batch_size=32, check_every=20)
    assert learned["objective"] <= learned["objective_before"]
    for changes in (searched["changed"], learned["changed"]):
        for name, change in changes.items():
            limit = sim.points[name].limit
            if limit is not None:
                lo, hi = change["to"]
                step = sim.points[name].qparams.scale
                assert limit[0] - step <= lo and hi <= limit[1] + step
    for p in sim.points.values():
        if p.limit is not None:
            assert p.limit[0] - p.qparams.scale <= p.qparams.lo and p.qparams.hi <= p.limit[1] + p.qparams.scale

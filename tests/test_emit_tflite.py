"""The full-integer TFLite emitter: ai-edge-quantizer packs the simulation's own scales; the
model has int8 NHWC input and output, no float op left, and LiteRT reproduces the simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant_core import _trained_like

from effdeploy.errors import EffdeployError
from effdeploy.quant.emit_tflite import emit_tflite, inspect_tflite, weight_values
from effdeploy.quant.sim import QuantSim
from effdeploy.quant.verify import litert_layer_snr
from effdeploy.runtime import load_backend
from effdeploy.runtime.intermediates import litert_tensors

# Operators of the tiny config (B0 stages, width 0.25, depth 0.5 -> repeats 1,1,1,2,2,2,1 = 10
# blocks, 32 px) counted by hand from its structure; the docs promise these kinds only.
#   blocks: 1a (8 -> 8 channels, stride 1, expand 1), 2a, 3a, 4a-b, 5a-b, 6a-b, 7a; spatial size
#   after the stem 16, after stages 2/3/4 8/4/2, after stage 6 1.
TINY_OPS = {
    # stem + 9 expand 1x1 (all blocks but 1a) + 10 project 1x1 + 10 SE reduce + 10 SE expand + head
    "CONV_2D": 1 + 9 + 10 + 10 + 10 + 1,
    "DEPTHWISE_CONV_2D": 10,  # one per block
    # SiLU = x * sigmoid(x): stem, 9 expand, 10 depthwise, 10 SE hidden, head = 31; + 10 SE gates
    "LOGISTIC": 31 + 10,
    "MUL": 31 + 10,  # the 31 SiLU products + 10 SE channel scalings
    "MEAN": 7,  # SE squeeze over a map larger than 1x1 (1a..5b); 6a, 6b and 7a see 1x1 (identity)
    "SUM": 1,  # the head pool over the 1x1 map, flattened: a mean over one element
    "ADD": 4,  # residual blocks (stride 1, same channels): 1a, 4b, 5b, 6b
    "PAD": 5,  # TF-SAME padding is asymmetric at stride 2: stem and the depthwise of 2a, 3a, 4a, 6a
    "FULLY_CONNECTED": 1,  # classifier
}


@pytest.fixture(scope="module")
def calibrated() -> dict:
    torch.manual_seed(0)
    model = _trained_like({"variant": "b0", "width_mult": 0.25, "depth_mult": 0.5, "resolution": 32, "num_classes": 10})
    x = torch.randn(24, 3, 32, 32)
    return {"model": model, "x": x}


@pytest.mark.slow
@pytest.mark.parametrize("wb", [8, 4])
def test_tflite_carries_simulation_scales(calibrated: dict, tmp_path, wb: int) -> None:
    x = calibrated["x"]
    sim = QuantSim(calibrated["model"], weight_bits=wb, act_bits=8)
    sim.calibrate([x[:16]])
    path = tmp_path / "q.tflite"
    info = emit_tflite(sim, path, x[:16].numpy())
    assert path.is_file() and not list(tmp_path.glob("*.float*"))  # nothing half-written left
    assert info["input"] == {"shape": [1, 32, 32, 3], "dtype": "int8"}
    assert info["output"] == {"shape": [1, 10], "dtype": "int8"}
    assert info["float_ops"] == []
    assert dict(info["ops"]) == TINY_OPS
    assert bool(info["notes"]) == (wb == 4)  # int4 depthwise is stored in int8, and said so
    mapped = set(info["tensor_map"].values())
    # every point has its tensor, except pools over a 1x1 map, which TFLite drops (identity)
    assert all(p.endswith("pool") for p in set(sim.points) - mapped), set(sim.points) - mapped
    # every mapped tensor has exactly the simulation's scale and zero-point
    it, _ = litert_tensors(path, np.transpose(x[:2].numpy(), (0, 2, 3, 1)))
    details = {d["name"]: d for d in it.get_tensor_details()}
    for name, point in info["tensor_map"].items():
        scale, zero = details[name]["quantization"]
        qp = sim.points[point].qparams
        assert scale == pytest.approx(qp.scale, rel=1e-5) and zero == qp.zero_point, point
    # LiteRT reproduces the simulation tensor by tensor: the input exactly, the first conv to
    # within one step (integer requantization can round a tie the other way); a random net
    # amplifies such flips downstream, so the end-to-end contract is checked on trained models
    held = x[16:].numpy()
    _, q_tensors = litert_tensors(path, np.transpose(held, (0, 2, 3, 1)))
    _, caps = sim.run_capture(torch.from_numpy(held), quantized=True)
    by_point = {p: n for n, p in info["tensor_map"].items()}
    for point in ("input", "stem.conv"):
        ref = caps[point].permute(0, 2, 3, 1).numpy()
        steps = np.abs(q_tensors[by_point[point]] - ref) / sim.points[point].qparams.scale
        assert steps.max() <= (0 if point == "input" else 1.001) and np.mean(steps > 0.25) < 0.05, point
    out = load_backend("litert", path).run(held)
    assert out.shape == (8, 10) and np.isfinite(out).all()
    layers = litert_layer_snr(path, info["tensor_map"], sim, [torch.from_numpy(held)])
    assert layers["input"] > 35 and len(layers) == len(mapped)


@pytest.mark.slow
def test_tflite_weights_are_the_simulation_grid(calibrated: dict, tmp_path) -> None:
    """min-max weight quantization recovers the simulation's per-channel grid exactly."""
    from ai_edge_litert.interpreter import Interpreter

    sim = QuantSim(calibrated["model"], weight_bits=8, act_bits=8)
    sim.calibrate([calibrated["x"][:8]])
    path = tmp_path / "q.tflite"
    emit_tflite(sim, path, calibrated["x"][:8].numpy())
    it = Interpreter(str(path))
    it.allocate_tensors()
    fc = [d for d in it.get_tensor_details() if d["name"].endswith("Linear_classifier;1")]
    assert len(fc) == 1
    scales = fc[0]["quantization_parameters"]["scales"]
    q = it.get_tensor(fc[0]["index"]).astype(np.float64) * scales[:, None]
    np.testing.assert_allclose(q, sim.weights["classifier"].quantized().numpy(), rtol=1e-5, atol=1e-7)


def test_tflite_refuses_non_int8_activations(calibrated: dict, tmp_path) -> None:
    sim = QuantSim(calibrated["model"], weight_bits=4, act_bits=4)
    sim.calibrate([calibrated["x"][:8]])
    with pytest.raises(EffdeployError, match="8-bit activations"):
        emit_tflite(sim, tmp_path / "q.tflite", calibrated["x"][:8].numpy())
    assert not (tmp_path / "q.tflite").exists()


@pytest.mark.slow
def test_inspect_reports_float_ops(tmp_path) -> None:
    """A float model is reported as such (the check that guards full-integer output)."""
    from effdeploy.export.tflite import export_tflite
    from effdeploy.model.efficientnet import build_model

    path = export_tflite(
        build_model({"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32}).eval(),
        tmp_path / "f.tflite",
    )
    info = inspect_tflite(path)
    assert info["input"]["dtype"] == "float32" and "CONV_2D" in info["float_ops"]


def _int8_weight_values(path) -> list[np.ndarray]:
    """Every per-channel int8 constant of a TFLite model, dequantized."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(str(path))
    it.allocate_tensors()
    out = []
    for d in it.get_tensor_details():
        scales = d["quantization_parameters"]["scales"]
        if d["dtype"] != np.int8 or len(scales) < 2:
            continue
        try:
            q = it.get_tensor(d["index"]).astype(np.float64)
        except ValueError:
            continue
        axis = d["quantization_parameters"]["quantized_dimension"]
        shape = [1] * q.ndim
        shape[axis] = len(scales)
        out.append(q * scales.reshape(shape))
    return out


@pytest.mark.parametrize("overrides", [[], [("classifier", 8)]])
def test_low_bit_weights_in_int8_containers_are_exact(calibrated: dict, tmp_path, overrides) -> None:
    """4-bit grid values stored in int8 (depthwise filters; every layer once widths are mixed) are
    exactly the simulation's, not min-max re-rounded; 8-bit layers are left as they were."""
    sim = QuantSim(calibrated["model"], weight_bits=4, act_bits=8, weight_overrides=overrides)
    sim.calibrate([calibrated["x"][:8]])
    path = tmp_path / "q.tflite"
    info = emit_tflite(sim, path, calibrated["x"][:8].numpy())
    stored = _int8_weight_values(path)
    low = [n for n, w in sim.weights.items() if w.bits == 4]
    depthwise = [n for n in low if ".dwconv." in n]
    # with one width ai-edge-quantizer writes int4 itself; with mixed widths we re-pack as int4
    repacked = depthwise if not overrides else low
    assert depthwise and f"{len(repacked)} sub-8-bit weight tensors" in " ".join(info["notes"])
    for n in depthwise + (["classifier"] if overrides else []):
        ref = np.sort(sim.weights[n].quantized().numpy().ravel())
        same = [v for v in stored if v.size == ref.size and np.allclose(np.sort(v.ravel()), ref, rtol=1e-6, atol=1e-9)]
        assert same, n
    # the 4-bit convs and FCs are int4 tensors either way (an 8-bit classifier does not make the
    # whole model int8), and the re-packed model runs in LiteRT
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    int4 = [t for g in fb.subgraphs for t in g.tensors if t.type == schema.TensorType.INT4]
    assert len(int4) == len(low) - len(depthwise)
    # and each decodes (two signed nibbles a byte) to one 4-bit layer's simulated values
    refs = [np.sort(sim.weights[n].quantized().numpy().ravel()) for n in low if n not in depthwise]
    for t in int4:
        k = weight_values(fb, t)
        assert np.abs(k).max() <= 7
        scale = np.asarray(t.quantization.scale, np.float64)
        shape = [1] * k.ndim
        shape[int(t.quantization.quantizedDimension)] = len(scale)
        got = np.sort((k * scale.reshape(shape)).ravel())
        assert any(r.size == got.size and np.allclose(got, r, rtol=1e-6, atol=1e-9) for r in refs), t.name
    out = load_backend("litert", path).run(calibrated["x"][16:].numpy())
    assert out.shape == (8, 10) and np.isfinite(out).all()


@pytest.mark.slow
def test_kernel_check_reproduces_litert_int8_arithmetic(calibrated: dict, tmp_path) -> None:
    """The kernel check's integer reference (effdeploy.results.litert_kernels) matches LiteRT's
    int8 kernels to one step (a wrong zero-point, scale or bias there would be many steps off)."""
    from effdeploy.results.litert_kernels import check_model

    x = calibrated["x"]
    sim = QuantSim(calibrated["model"], weight_bits=8, act_bits=8)
    sim.calibrate([x[:16]])
    path = tmp_path / "q.tflite"
    emit_tflite(sim, path, x[:16].numpy())
    rows = check_model(path, np.transpose(x[16:].numpy(), (0, 2, 3, 1)).copy())
    assert {r["op"] for r in rows} == {"CONV_2D", "FULLY_CONNECTED"} and all(r["weights"] == "int8" for r in rows)
    assert max(r["max_steps"] for r in rows) <= 1
    assert sum(r["off"] for r in rows) < 0.02 * sum(r["outputs"] for r in rows)

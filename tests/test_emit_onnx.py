"""The ONNX QDQ emitter: the simulation's scales as a QDQ model that onnxruntime runs and that
reproduces the simulation (tensor by tensor on a tiny net; end to end on real Lite0 weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import TINY_CONFIG
from test_quant_core import _trained_like
from torch import nn

from effdeploy.metrics import snr_db
from effdeploy.model.blocks import MBConv, SqueezeExcite
from effdeploy.quant.emit_onnx import emit_qdq_onnx, spatial_means_to_global_pool
from effdeploy.quant.sim import QuantSim, SiLUParts


def _point_outputs(path, sim: QuantSim, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run the QDQ model unoptimised, exposing every point's dequantized tensor."""
    m = onnx.load(str(path))
    for p in sim.points:
        if p != "classifier":
            m.graph.output.append(onnx.helper.make_tensor_value_info(f"{p.replace('.', '_')}_dq", 1, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, {"images": x}), strict=True))


@pytest.mark.parametrize(("wb", "ab"), [(8, 8), (4, 8), (4, 4), (8, 6)])
def test_qdq_model_reproduces_every_simulated_tensor(tiny_config: dict, tmp_path, wb: int, ab: int) -> None:
    model = _trained_like(tiny_config)
    x = torch.randn(8, 3, 32, 32)
    sim = QuantSim(model, weight_bits=wb, act_bits=ab)
    sim.calibrate([x])
    _, caps = sim.run_capture(x, quantized=True)
    path = emit_qdq_onnx(sim, tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    ops = [n.op_type for n in graph.node]
    # one Q/DQ pair per point (plus the Reshape's), a per-channel DQ per weight and per bias
    # (the exporter drops all-zero biases, such as this random model's SE biases)
    assert ops.count("QuantizeLinear") == len(sim.points) + 1
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    with_bias = [n for n in layers if len(n.input) > 2 and n.input[2]]
    assert len(layers) == len(sim.weights)
    assert all(n.input[1].endswith("_wdq") and n.input[2].endswith("_bdq") for n in with_bias)
    assert ops.count("DequantizeLinear") == len(sim.points) + 1 + len(layers) + len(with_bias)
    bias_types = {i.data_type for i in graph.initializer if i.name.endswith("_bq")}
    assert bias_types == {onnx.TensorProto.INT32}
    weight_types = {i.data_type for i in graph.initializer if i.name.endswith("_wq")}
    assert weight_types == {onnx.TensorProto.INT4 if wb == 4 else onnx.TensorProto.INT8}
    # activations in 8-bit storage are uint8, the type onnxruntime's x86 integer kernels take
    act_zp_types = {i.data_type for i in graph.initializer if i.name.endswith("_zero_point")}
    assert act_zp_types == {onnx.TensorProto.INT4 if ab == 4 else onnx.TensorProto.UINT8}
    assert not any(i.name.endswith(".weight") for i in graph.initializer)  # no float weights left
    # weights are raw bytes, a byte per int8 and half a byte per int4 value, and decode to the
    # simulation's grid integers
    for layer, w in sim.weights.items():
        init = next(i for i in graph.initializer if i.name == f"{layer.replace('.', '_')}_wq")
        assert len(init.raw_data) == -(-w.float_weight.numel() * wb // 8)
        k = onnx.numpy_helper.to_array(init).astype(np.int64)
        scales = w.scales.double().numpy().reshape((-1,) + (1,) * (k.ndim - 1))
        np.testing.assert_allclose(k * scales, w.quantized().double().numpy(), rtol=1e-6, atol=1e-12)
    outs = _point_outputs(path, sim, x.numpy())
    # the input is exact; the first computed tensor agrees to within one quantization step (float
    # accumulation order can flip a value that sits on a rounding boundary) and later tensors
    # inherit those few flips, each a handful of steps at most. With 4-bit weights the sums lie on
    # a coarse lattice and exact ties are common: measured 1.1% of stem.conv values flipped by one
    # step (0.05% with 8-bit weights), 3.5% of the first depthwise conv's
    diff = {}
    for name in ("input", "stem.conv", "stem.act", "blocks.block1a.dwconv.conv"):
        step = sim.points[name].qparams.scale
        diff[name] = np.abs(outs[f"{name.replace('.', '_')}_dq"] - caps[name].numpy()) / step
        assert np.mean(diff[name] > 0.25) < 0.05
    assert diff["input"].max() == 0
    assert diff["stem.conv"].max() <= 1.001


def test_tf_same_padding_keeps_the_conv_integer(tiny_config: dict, tmp_path) -> None:
    """TF 'SAME' padding (asymmetric) does not break a conv out of its integer group: every conv
    reads a dequantized tensor (the exporter folds the pad into the conv, or the Pad carries its
    input's Q/DQ) and has an int32 bias; the model as shipped matches the simulation."""
    model = _trained_like({**tiny_config, "padding": "same"})
    x = torch.randn(8, 3, 32, 32)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    sim.calibrate([x])
    path = emit_qdq_onnx(sim, tmp_path / "q.onnx")
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    for conv in convs:
        assert producer[conv.input[0]].op_type == "DequantizeLinear", conv.name
    pads = [list(a.ints) for n in convs for a in n.attribute if a.name == "pads"]
    assert any(p[0] != p[2] or p[1] != p[3] for p in pads) or any(n.op_type == "Pad" for n in graph.node)
    assert all(len(n.input) < 3 or not n.input[2] or n.input[2].endswith("_bdq") for n in convs)
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = s.run(None, {"images": x.numpy()})[0]
    step = sim.points["classifier"].qparams.scale
    assert np.abs(logits - sim(x).numpy()).max() <= 2 * step + 1e-6


def _optimized_graph(path, tmp_path):
    """onnxruntime's CPU graph after all optimizations, with the session options the backend uses."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.x64quantprecision", "1")
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session, onnx.load(so.optimized_model_filepath).graph


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "placement"),
    [("b0", "after"), ("lite0", "none")],  # SiLU + SE; ReLU6 without SE (Lite0's blocks)
)
def test_onnxruntime_runs_every_layer_in_integer(tmp_path, variant: str, placement: str) -> None:
    """In onnxruntime's optimized CPU graph every conv (depthwise included), SiLU (sigmoid and
    product), SE gate, SE multiply, mean, residual add and the classifier is an integer kernel:
    the only float boundary is the input's Q and the logits' DQ. The counts come from the PyTorch
    modules, not from the emitted graph."""
    torch.manual_seed(0)
    model = _trained_like({**TINY_CONFIG, "variant": variant}, placement)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    sim.calibrate([torch.randn(16, 3, 32, 32)])
    path = emit_qdq_onnx(sim, tmp_path / "q.onnx")
    session, graph = _optimized_graph(path, tmp_path)

    modules = list(sim.model.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    silus = sum(isinstance(m, SiLUParts) for m in modules)
    ses = sum(isinstance(m, SqueezeExcite) for m in modules)
    residuals = sum(isinstance(m, MBConv) and m.spec.has_residual for m in modules)
    assert residuals > 0 and any(c.groups > 1 for c in convs)
    assert (silus > 0 and ses > 0) == (variant == "b0")

    ops = [n.op_type for n in graph.node]
    integer_or_layout = {
        "QLinearConv", "QLinearSigmoid", "QLinearMul", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm",
        "Transpose", "Reshape", "QuantizeLinear", "DequantizeLinear",
    }  # fmt: skip
    assert set(ops) <= integer_or_layout, sorted(set(ops) - integer_or_layout)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    qconvs = [n for n in graph.node if n.op_type == "QLinearConv"]
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in qconvs]
    assert len(qconvs) == len(convs)
    assert sum(g > 1 for g in groups) == sum(c.groups > 1 for c in convs)  # the depthwise convs
    assert ops.count("QLinearSigmoid") == silus + ses
    assert ops.count("QLinearMul") == silus + ses
    assert ops.count("QLinearAdd") == residuals
    assert ops.count("QLinearGlobalAveragePool") == ses + 1
    assert ops.count("QGemm") == 1
    # NHWC throughout: one Transpose into it after the input's Q, one out of it before the flatten
    assert ops.count("Transpose") == 2

    # the integer graph keeps the runtime contract with the simulation
    x = torch.randn(64, 3, 32, 32)
    logits = session.run(None, {"images": x.numpy()})[0]
    ref = sim(x).numpy()
    float_logits = sim.run_capture(x, quantized=False)[0].numpy()
    assert np.mean(logits.argmax(1) == ref.argmax(1)) >= 0.99
    assert abs(snr_db(float_logits, logits) - snr_db(float_logits, ref)) <= 1.0


def _reduce_mean_model(cases):
    """One ReduceMean per (input shape, axes, keepdims), each on its own graph input."""
    from onnx import TensorProto, helper

    nodes, inputs, outputs, inits = [], [], [], []
    for k, (shape, axes, keepdims) in enumerate(cases):
        inputs.append(helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, shape))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
        inits.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), f"axes{k}"))
        nodes.append(helper.make_node("ReduceMean", [f"x{k}", f"axes{k}"], [f"y{k}"], keepdims=keepdims))
    graph = helper.make_graph(nodes, "means", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_spatial_means_become_global_pool() -> None:
    """Only a keepdims mean over exactly H and W of a rank-4 tensor is a GlobalAveragePool; it
    gives onnxruntime's ReduceMean values, and the axes it no longer reads leave the file."""
    cases = [
        ((2, 5, 7, 3), [2, 3], 1),
        ((2, 5, 7, 3), [-1, -2], 1),
        ((2, 5, 7, 3), [2, 3], 0),  # drops H and W: not a pool's shape
        ((2, 5, 7, 3), [1, 2, 3], 1),  # channels too
        ((2, 5, 7), [1, 2], 1),  # rank 3
    ]
    model = _reduce_mean_model(cases)
    rng = np.random.default_rng(0)
    feeds = {f"x{k}": rng.standard_normal(shape).astype(np.float32) for k, (shape, _, _) in enumerate(cases)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert spatial_means_to_global_pool(model) == 2
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"] * 2 + ["ReduceMean"] * 3
    assert sorted(i.name for i in model.graph.initializer) == ["axes2", "axes3", "axes4"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for k, (a, b) in enumerate(zip(before, after, strict=True)):
        assert a.shape == b.shape, k
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(after[0][:, :, 0, 0], feeds["x0"].mean(axis=(2, 3)), rtol=1e-5)

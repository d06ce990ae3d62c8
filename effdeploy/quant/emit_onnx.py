"""ONNX QDQ emitter: the simulation's exact scales, as an ONNX model onnxruntime runs.

The BN-folded simulation graph is exported once (dynamo exporter), then:
- every quantization point becomes QuantizeLinear -> DequantizeLinear on its tensor, found by
  module scope: the exporter records each node's module path, and a point named ``P`` is the
  output of the last node inside scope ``P`` (``blocks.block2a.se`` -> the SE multiply,
  ``blocks.block2a`` -> the residual add); ``input`` is the graph input;
- every conv / linear weight becomes an integer initializer with a per-channel DequantizeLinear
  (axis 0), 4-bit weights as INT4 (opset 21); biases become int32 with scale s_in * s_w, the
  layout onnxruntime fuses into integer kernels;
- activations of 8 bits use UINT8 (the simulation's signed grid shifted by 128: the same real
  values), 4 bits INT4; other widths are stored in UINT8 with a Clip to their range in front of
  the QuantizeLinear, which is exact;
- a spatial ReduceMean (keepdims, axes H and W) becomes GlobalAveragePool, the same mean.

Why UINT8 and GlobalAveragePool: onnxruntime's CPU provider on x86 fuses Q/DQ groups into
integer kernels only for uint8 activations (``QDQIsInt8Allowed()`` is false off ARM). Its
QDQS8ToU8Transformer turns an int8 Q -> DQ pair into uint8 only where the Q has a single reader,
but a tensor read twice (a residual sum, a SiLU input read by Sigmoid and Mul) has its
DequantizeLinear duplicated first: an int8 tensor there keeps int8, and every Conv / Mul / Add
touching it runs in float, with a Transpose pair around each for the NHWC integer kernels.
In uint8 every Conv (depthwise included), Sigmoid, Mul and Add becomes a QLinear kernel; the SE
and head means become QLinearGlobalAveragePool (ReduceMean has no integer kernel).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.export.onnx import DEFAULT_OPSET, torch_to_onnx
from effdeploy.fileio import atomic_path
from effdeploy.quant.fakequant import INT32_MAX
from effdeploy.quant.int4 import pack_int4
from effdeploy.quant.sim import QuantSim

OPSET = 21


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            import ast

            return ast.literal_eval(p.value)
    return []


def emit_qdq_onnx(sim: QuantSim, path: str | Path) -> Path:
    import onnx

    path = Path(path)
    res = sim.config.resolution
    with atomic_path(path) as tmp:
        with sim.plain_graph() as graph:
            torch_to_onnx(graph, tmp, opset=DEFAULT_OPSET, resolution=res, name=path)
        model = onnx.load(str(tmp))
        tensor_of = point_tensors(model, sim)  # before conversion: it drops node metadata
        model = onnx.version_converter.convert_version(model, OPSET)  # INT4 needs opset 21
        spatial_means_to_global_pool(model)
        _insert_qdq(model, sim, tensor_of)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
    return path


def _stored_zero_point(qp, storage: int) -> int:
    """The zero point in the stored type: UINT8 holds the signed grid shifted by 128 (q + 128 with
    zero point z + 128 dequantizes to the same value, and QuantizeLinear's rounding and
    saturation shift with it); INT4 holds it as is."""
    from onnx import TensorProto

    if storage == TensorProto.UINT8 and qp.qmin < 0:
        return qp.zero_point + 128
    return qp.zero_point


def spatial_means_to_global_pool(model) -> int:
    """Replace every ReduceMean over H and W (keepdims, of a rank-4 tensor) with
    GlobalAveragePool, which onnxruntime runs as an integer kernel between Q/DQ; returns how many.

    The rank comes from the exporter's value_info (or the graph input); a ReduceMean whose rank
    or axes are unknown stays."""
    from onnx import numpy_helper

    graph = model.graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in list(graph.value_info) + list(graph.input)}
    init_by_name = {i.name: i for i in graph.initializer}
    replaced = 0
    dropped_inputs = []
    for n in graph.node:
        if n.op_type != "ReduceMean" or n.domain not in ("", "ai.onnx") or rank.get(n.input[0]) != 4:
            continue
        attrs = {a.name: a for a in n.attribute}
        if "keepdims" in attrs and attrs["keepdims"].i != 1:
            continue
        if len(n.input) > 1 and n.input[1]:
            if n.input[1] not in init_by_name:
                continue
            axes = numpy_helper.to_array(init_by_name[n.input[1]]).tolist()
        elif "axes" in attrs:
            axes = list(attrs["axes"].ints)
        else:
            continue  # all axes (or none, with noop_with_empty_axes)
        if sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        dropped_inputs += list(n.input[1:])
        n.op_type = "GlobalAveragePool"
        del n.input[1:]
        del n.attribute[:]
        replaced += 1
    still_read = {i for n in graph.node for i in n.input}
    for name in set(dropped_inputs) - still_read:
        if name in init_by_name:
            graph.initializer.remove(init_by_name[name])
    return replaced


def _key(name: str) -> str:
    """Initializer / node name stem of a point or layer (``blocks.block2a.se`` -> ``blocks_block2a_se``)."""
    return name.replace(".", "_")


def dequantized_name(point: str) -> str:
    """The tensor that the DequantizeLinear of quantization point ``point`` writes (the logits
    point, a graph output, keeps the output's own name instead)."""
    return f"{_key(point)}_dq"


def point_tensors(model, sim: QuantSim) -> dict[str, str]:
    """Quantization point name -> ONNX tensor name, by module scope (see the module docstring)."""
    graph = model.graph
    last_in_scope: dict[str, str] = {}
    for n in graph.node:
        for scope in _scopes(n)[:-1]:
            last_in_scope[scope] = n.output[0]
    tensor_of = {"input": graph.input[0].name}
    for name in sim.points:
        if name == "input":
            continue
        if name not in last_in_scope:
            raise EffdeployError(f"ONNX emitter: no tensor found for quantization point {name!r}")
        tensor_of[name] = last_in_scope[name]
    return tensor_of


def _insert_qdq(model, sim: QuantSim, tensor_of: dict[str, str]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    # a point that is a graph output (the logits): its producer writes "<name>_float" and the
    # DequantizeLinear writes the graph output's own name
    outputs = {o.name for o in graph.output}
    dq_output: dict[str, str] = {}
    for point, tensor in list(tensor_of.items()):
        if tensor in outputs:
            for n in nodes:
                for i, o in enumerate(n.output):
                    if o == tensor:
                        n.output[i] = f"{tensor}_float"
            tensor_of[point] = f"{tensor}_float"
            dq_output[f"{tensor}_float"] = tensor

    new_nodes = []
    inits = []
    dq_scale: dict[str, float] = {}  # dequantized tensor -> its activation scale
    rename: dict[str, str] = {}
    for name, tensor in tensor_of.items():
        p = sim.points[name]
        qp = p.qparams
        key = _key(name)
        s_name, z_name = f"{key}_scale", f"{key}_zero_point"
        bits = p.bits if p.bits <= 8 else 8
        storage = TensorProto.INT4 if bits == 4 else TensorProto.UINT8
        inits.append(numpy_helper.from_array(np.array(qp.scale, dtype=np.float32), s_name))
        inits.append(helper.make_tensor(z_name, storage, [], [_stored_zero_point(qp, storage)]))
        src = tensor
        if bits not in (4, 8):  # no ONNX type of this width: clip to the range, store in uint8
            lo_name, hi_name = f"{key}_lo", f"{key}_hi"
            inits += [
                numpy_helper.from_array(np.array(qp.lo, dtype=np.float32), lo_name),
                numpy_helper.from_array(np.array(qp.hi, dtype=np.float32), hi_name),
            ]
            src = f"{key}_clipped"
            new_nodes.append(helper.make_node("Clip", [tensor, lo_name, hi_name], [src], name=f"{key}_clip"))
        new_nodes.append(helper.make_node("QuantizeLinear", [src, s_name, z_name], [f"{key}_q"], name=f"{key}_Q"))
        dq = dq_output.get(tensor, dequantized_name(name))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{key}_q", s_name, z_name], [dq], name=f"{key}_DQ"))
        rename[tensor] = dq
        dq_scale[dq] = qp.scale

    # rewire consumers (not our own Q/Clip nodes) to the dequantized tensors
    own = {n.name for n in new_nodes}
    for n in nodes:
        if n.name in own:
            continue
        for i, inp in enumerate(n.input):
            if inp in rename:
                n.input[i] = rename[inp]
    # shape-only ops (the Reshape before the classifier) and zero padding (TF 'SAME' on strided
    # convs: zero is on every grid) keep their input's quantization: give their output the same
    # Q/DQ pair, as onnxruntime's own quantizer does, so the conv after a Pad reads a dequantized
    # tensor (integer kernel, int32 bias) and no runtime has to propagate anything
    zp_of = {}
    for name, tensor in tensor_of.items():
        zp_of[rename[tensor]] = _key(name)
    for n in nodes:
        if n.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Pad") and n.input[0] in dq_scale:
            key = zp_of[n.input[0]]
            out = n.output[0]
            n.output[0] = f"{out}_float"
            new_nodes.append(
                helper.make_node(
                    "QuantizeLinear",
                    [f"{out}_float", f"{key}_scale", f"{key}_zero_point"],
                    [f"{out}_q"],
                    name=f"{out}_Q",
                )
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [f"{out}_q", f"{key}_scale", f"{key}_zero_point"], [out], name=f"{out}_DQ"
                )
            )
            dq_scale[out] = dq_scale[n.input[0]]

    # weights -> integer initializers + per-channel DequantizeLinear; biases -> int32
    init_by_name = {i.name: i for i in graph.initializer}
    for n in nodes:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w_name = n.input[1]
        layer = w_name.removesuffix(".weight")
        if layer not in sim.weights:
            raise EffdeployError(f"ONNX emitter: weight {w_name!r} is not a quantized layer")
        w = sim.weights[layer]
        scales = w.scales.double().numpy()
        shape = (-1,) + (1,) * (w.float_weight.ndim - 1)
        wq = np.rint(w.quantized().double().numpy() / scales.reshape(shape)).astype(np.int8)
        storage = TensorProto.INT4 if w.bits <= 4 else TensorProto.INT8
        key = _key(layer)
        # raw bytes (int4: two a byte): a value list would go into int32_data as varints, up to
        # 10 bytes per negative int8 weight (Lite0's W8A8 file was 25.8 MB that way)
        packed = pack_int4(wq) if storage == TensorProto.INT4 else wq.tobytes()
        inits.append(helper.make_tensor(f"{key}_wq", storage, list(wq.shape), packed, raw=True))
        inits.append(numpy_helper.from_array(scales.astype(np.float32), f"{key}_wscale"))
        inits.append(helper.make_tensor(f"{key}_wzero", storage, [len(scales)], [0] * len(scales)))
        dq = helper.make_node(
            "DequantizeLinear",
            [f"{key}_wq", f"{key}_wscale", f"{key}_wzero"],
            [f"{key}_wdq"],
            axis=0,
            name=f"{key}_wDQ",
        )
        new_nodes.append(dq)
        n.input[1] = f"{key}_wdq"
        graph.initializer.remove(init_by_name[w_name])
        if len(n.input) > 2 and n.input[2] in init_by_name and n.input[0] in dq_scale:
            b_init = init_by_name[n.input[2]]
            b = numpy_helper.to_array(b_init).astype(np.float64)
            b_scale = dq_scale[n.input[0]] * scales
            bq = np.clip(np.rint(b / b_scale), -INT32_MAX, INT32_MAX).astype(np.int32)  # as the simulation
            inits.append(numpy_helper.from_array(bq, f"{key}_bq"))
            inits.append(numpy_helper.from_array(b_scale.astype(np.float32), f"{key}_bscale"))
            inits.append(numpy_helper.from_array(np.zeros(len(bq), np.int32), f"{key}_bzero"))
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{key}_bq", f"{key}_bscale", f"{key}_bzero"],
                    [f"{key}_bdq"],
                    axis=0,
                    name=f"{key}_bDQ",
                )
            )
            n.input[2] = f"{key}_bdq"
            graph.initializer.remove(b_init)

    graph.initializer.extend(inits)
    # topological order: each Q/DQ right after its producer is simplest via a full re-sort
    all_nodes = nodes + new_nodes
    del graph.node[:]
    graph.node.extend(_toposort(all_nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))


def _toposort(nodes, available: set[str]):
    available = set(available) | {""}
    pending = list(nodes)
    ordered = []
    while pending:
        progress = False
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
                progress = True
            else:
                rest.append(n)
        if not progress:
            raise EffdeployError(f"ONNX emitter: graph has a cycle or a missing input near {rest[0].name!r}")
        pending = rest
    return ordered

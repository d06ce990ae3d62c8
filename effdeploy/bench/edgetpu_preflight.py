"""Edge TPU preflight: which operators of a .tflite the Coral compiler would map, read from the
file alone (no compiler needed), printed in the compiler's own ``Operator  Count  Status`` table.

The rules are coral.ai's "TensorFlow models on the Edge TPU" requirements:

- every activation tensor is 8-bit (int8 or uint8); constant inputs are 8-bit or int32 (biases,
  paddings, axes); a float, int16 or int4 tensor is "Operation is working on an unsupported data
  type" (a model with no 8-bit operator at all is refused: "Model not quantized");
- shapes are static (no -1 in any ``shape_signature``: the compiler refuses the model);
- only the 3 innermost dimensions of an activation tensor may exceed 1;
- the model has exactly one subgraph;
- only operators in coral.ai's supported-op table map, each within its listed limitations
  (``SUPPORTED_OPS``; a limitation hit is the compiler's "otherwise supported, but not mapped");
- without ``-a`` the compiler maps one segment: from the first operator that does not map, every
  later operator runs on the CPU ("More than one subgraph is not supported"), except a QUANTIZE
  that reads a float model input or a DEQUANTIZE that writes a float model output, which the
  CPU runs at the edge of the graph.

This is a prediction: the compiler may still refuse an operator for a reason the table does
not list (its "unspecified limitation"), or an operator version it does not know.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.runtime.edgetpu_backend import EDGETPU_CUSTOM_OP, custom_op_name, is_compiled, read_tflite

# The compiler's status strings (its own wording, as printed in its table and _edgetpu.log)
MAPPED = "Mapped to Edge TPU"
AFTER_UNMAPPED = "More than one subgraph is not supported"
LIMITATION = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
DATA_TYPE = "Operation is working on an unsupported data type"
NOT_SUPPORTED = "Operation not supported"
VERSION = "Operation version not supported"
RANK = "Tensor has unsupported rank (up to 3 innermost dimensions mapped)"

# coral.ai's supported-op table (Edge TPU compiler 16 / runtime 14+), as TFLite builtin names
SUPPORTED_OPS = frozenset(
    {
        "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
        "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "UNIDIRECTIONAL_SEQUENCE_LSTM",
        "MAXIMUM", "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE",
        "REDUCE_MAX", "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
        "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
    }
)  # fmt: skip
# known to the compiler but always on float tensors (reported as a data-type problem)
_FLOAT_ONLY_OPS = frozenset({"DEQUANTIZE"})
SOFTMAX_MAX_ELEMENTS = 16000


@dataclass
class OpRow:
    """One line of the compiler's operator table: ``count`` operators of one kind, one status."""

    operator: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        return self.status == MAPPED


@dataclass
class Preflight:
    path: str
    rows: list[OpRow]  # grouped by (operator, status), in order of first appearance
    problems: list[str]  # one line each; empty when every operator maps
    total_ops: int
    ops_on_edgetpu: int
    ops_on_cpu: int
    input_dtypes: list[str] = field(default_factory=list)
    output_dtypes: list[str] = field(default_factory=list)
    weight_dtypes: list[str] = field(default_factory=list)  # of constant tensors, e.g. INT8, INT4, INT32

    @property
    def passed(self) -> bool:
        return not self.problems and self.ops_on_cpu == 0 and self.total_ops > 0

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "passed": self.passed,
            "total_ops": self.total_ops,
            "ops_on_edgetpu": self.ops_on_edgetpu,
            "ops_on_cpu": self.ops_on_cpu,
            "rows": [{"operator": r.operator, "count": r.count, "status": r.status} for r in self.rows],
            "problems": list(self.problems),
        }


def _type_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def _all_kinds() -> tuple[str, ...]:
    from ai_edge_litert import schema_py_generated as schema

    return tuple(k for k in vars(schema.BuiltinOperator) if not k.startswith("_"))


class _Graph:
    """One subgraph with the facts the rules need: which tensors are constants, and their values."""

    def __init__(self, fb, graph) -> None:
        self.fb, self.graph = fb, graph

    def tensor(self, i: int):
        return self.graph.tensors[i]

    def is_const(self, i: int) -> bool:
        t = self.graph.tensors[i]
        if t.buffer <= 0 or t.buffer >= len(self.fb.buffers):
            return False
        buf = self.fb.buffers[t.buffer]
        return (buf.data is not None and len(buf.data) > 0) or (buf.offset or 0) > 1

    def ints(self, i: int) -> np.ndarray | None:
        """A constant int32/int64 tensor's values (axes, paddings), or None if not constant."""
        from ai_edge_litert import schema_py_generated as schema

        t = self.graph.tensors[i]
        if not self.is_const(i) or self.fb.buffers[t.buffer].data is None:
            return None
        dtype = {schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}.get(t.type)
        if dtype is None:
            return None
        return np.frombuffer(bytes(self.fb.buffers[t.buffer].data), dtype).reshape(list(t.shape) or [-1])

    def activations(self, op) -> list[int]:
        return [int(i) for i in (*op.inputs, *op.outputs) if i >= 0 and not self.is_const(int(i))]

    def constants(self, op) -> list[int]:
        return [int(i) for i in op.inputs if i >= 0 and self.is_const(int(i))]


def _reduction(g: _Graph, op, kind: str) -> str | None:
    """MEAN / SUM / REDUCE_MAX / REDUCE_MIN: no reduction over the batch dimension; for MEAN and
    SUM a reduction over the innermost (z) dimension needs a multiple of 4 channels."""
    x = g.tensor(int(op.inputs[0]))
    axes = g.ints(int(op.inputs[1]))
    if axes is None:
        return f"{kind}: reduction axes are not a constant"
    rank = len(x.shape)
    axes = {int(a) % rank for a in axes.ravel()} if rank else set()
    if 0 in axes and rank > 1:
        return f"{kind}: reduces over the batch dimension"
    if kind in ("MEAN", "SUM") and rank - 1 in axes and x.shape[-1] % 4:
        return f"{kind}: z-reduction over {x.shape[-1]} channels (must be a multiple of 4)"
    return None


def _same_dilation(g: _Graph, op, kind: str) -> str | None:
    o = op.builtinOptions
    if o is not None and o.dilationWFactor != o.dilationHFactor:
        return f"{kind}: dilation {o.dilationHFactor} in y but {o.dilationWFactor} in x (must be the same)"
    return None


def _fully_connected(g: _Graph, op, kind: str) -> str | None:
    from ai_edge_litert import schema_py_generated as schema

    o = op.builtinOptions
    if o is not None and o.weightsFormat != schema.FullyConnectedOptionsWeightsFormat.DEFAULT:
        return f"{kind}: weights not in the default format"
    shape = list(g.tensor(int(op.outputs[0])).shape)
    if sum(d > 1 for d in shape) > 1:
        return f"{kind}: output {shape} is not one-dimensional"
    return None


def _no_fused_activation(g: _Graph, op, kind: str) -> str | None:
    o = op.builtinOptions
    if o is not None and o.fusedActivationFunction:
        return f"{kind}: fused activation function"
    return None


def _pad(g: _Graph, op, kind: str) -> str | None:
    pads = g.ints(int(op.inputs[1]))
    if pads is None:
        return f"{kind}: paddings are not a constant"
    if pads.ndim == 2 and pads.shape[0] > 1 and np.any(pads[0] != 0):
        return f"{kind}: pads the batch dimension"
    return None


def _pack(g: _Graph, op, kind: str) -> str | None:
    o = op.builtinOptions
    if o is not None and o.axis == 0:
        return f"{kind}: packs in the batch dimension"
    return None


def _softmax(g: _Graph, op, kind: str) -> str | None:
    shape = list(g.tensor(int(op.inputs[0])).shape)
    if sum(d > 1 for d in shape) > 1 or int(np.prod(shape)) > SOFTMAX_MAX_ELEMENTS:
        return f"{kind}: input {shape} is not 1-D with at most {SOFTMAX_MAX_ELEMENTS} elements"
    return None


# the limitations column of coral.ai's table, one check per operator that has one
_LIMITS = {
    "MEAN": _reduction,
    "SUM": _reduction,
    "REDUCE_MAX": _reduction,
    "REDUCE_MIN": _reduction,
    "CONV_2D": _same_dilation,
    "DEPTHWISE_CONV_2D": _same_dilation,
    "FULLY_CONNECTED": _fully_connected,
    "AVERAGE_POOL_2D": _no_fused_activation,
    "MAX_POOL_2D": _no_fused_activation,
    "CONCATENATION": _no_fused_activation,
    "PAD": _pad,
    "PACK": _pack,
    "SOFTMAX": _softmax,
}


def _op_status(g: _Graph, op, kind: str, types: dict[int, str]) -> tuple[str, str | None]:
    """The status the compiler would give this operator on its own, and why (None when mapped)."""
    if kind == "CUSTOM":
        code = g.fb.operatorCodes[op.opcodeIndex]
        return NOT_SUPPORTED, f"custom operator {custom_op_name(code)!r}"
    if kind not in SUPPORTED_OPS and kind not in _FLOAT_ONLY_OPS:
        return NOT_SUPPORTED, f"{kind} is not in the Edge TPU's supported-op table"
    for i in g.activations(op):
        name = types.get(g.tensor(i).type, str(g.tensor(i).type))
        if name not in ("INT8", "UINT8"):
            return DATA_TYPE, f"{kind}: {name} activation (must be int8 or uint8)"
    for i in g.constants(op):
        name = types.get(g.tensor(i).type, str(g.tensor(i).type))
        if name not in ("INT8", "UINT8", "INT32"):
            return DATA_TYPE, f"{kind}: {name} constant (must be int8/uint8, or int32 for biases)"
    for i in g.activations(op):
        shape = [int(d) for d in g.tensor(i).shape]
        if len(shape) > 3 and any(d > 1 for d in shape[:-3]):
            return RANK, f"{kind}: tensor {shape} has a dimension > 1 outside the 3 innermost"
    check = _LIMITS.get(kind)
    reason = check(g, op, kind) if check else None
    return (LIMITATION, reason) if reason else (MAPPED, None)


def _at_float_edge(g: _Graph, op, kind: str, types: dict[int, str]) -> bool:
    """A QUANTIZE of a float model input or a DEQUANTIZE to a float model output: the CPU runs
    it at the edge of the graph without splitting the Edge TPU segment."""
    if kind == "QUANTIZE":
        i = int(op.inputs[0])
        return i in list(g.graph.inputs) and types.get(g.tensor(i).type) == "FLOAT32"
    if kind == "DEQUANTIZE":
        o = int(op.outputs[0])
        return o in list(g.graph.outputs) and types.get(g.tensor(o).type) == "FLOAT32"
    return False


def _grouped(items: list[tuple[str, str]]) -> list[OpRow]:
    counts = Counter(items)
    return [OpRow(op, counts[(op, status)], status) for op, status in dict.fromkeys(items)]


def _tensor_name(t) -> str:
    return t.name.decode() if isinstance(t.name, bytes) else str(t.name)


def _segment(g: _Graph, ops: list[tuple[object, str]], types: dict[int, str]) -> tuple[list, list[str], str | None]:
    """The main graph's (operator, status) in order, the reasons of unmapped operators, and the
    note on the operators that follow the first unmapped one (the compiler's single segment)."""
    items, reasons = [], []
    first: tuple[int, str] | None = None
    after = 0
    for i, (op, kind) in enumerate(ops):
        status, reason = _op_status(g, op, kind, types)
        if status != MAPPED:
            reasons.append(reason or status)
            if first is None and not _at_float_edge(g, op, kind, types):
                first = (i, kind)
        elif first is not None:
            status = AFTER_UNMAPPED
            after += 1
        items.append((kind, status))  # the compiler prints custom ops as CUSTOM
    tail = None
    if after:
        tail = f"{after} operators after op {first[0]} ({first[1]}) run on the CPU: one segment is mapped (no -a)"
    return items, reasons, tail


def _quantized(g: _Graph, ops: list[tuple[object, str]], types: dict[int, str]) -> bool:
    """Whether any operator works on 8-bit activations only (else the compiler refuses the model)."""
    for op, _ in ops:
        acts = [types.get(g.tensor(i).type) for i in g.activations(op)]
        if acts and all(t in ("INT8", "UINT8") for t in acts):
            return True
    return False


def preflight(path: str | Path) -> Preflight:
    """Predict the Edge TPU compiler's operator table for the .tflite at ``path`` (see module doc)."""
    from effdeploy.quant.emit_tflite import operators

    path = Path(path)
    fb = read_tflite(path)
    types = _type_names()
    if not fb.subgraphs:
        raise EffdeployError(f"{path}: the TFLite model has no subgraph")
    by_graph: dict[int, list[tuple[object, str]]] = {id(g): [] for g in fb.subgraphs}
    for graph, op, kind in operators(fb, _all_kinds()):
        by_graph[id(graph)].append((op, kind))
    main = fb.subgraphs[0]
    g = _Graph(fb, main)
    ops = by_graph[id(main)]

    problems: list[str] = []
    if is_compiled(fb):
        problems.append(f"already compiled for the Edge TPU ({EDGETPU_CUSTOM_OP} present): give the compiler's input")
    if len(fb.subgraphs) != 1:
        problems.append(f"{len(fb.subgraphs)} subgraphs: the Edge TPU compiler supports exactly one")
    unknown = sum(len(sg.operators or []) for sg in fb.subgraphs) - sum(len(v) for v in by_graph.values())
    if unknown:
        problems.append(f"{unknown} operators of a kind this LiteRT schema does not know")
    dynamic = [
        _tensor_name(t)
        for sg in fb.subgraphs
        for t in sg.tensors or []
        if t.shapeSignature is not None and -1 in list(t.shapeSignature)
    ]
    if dynamic:
        problems.append(f"dynamic-sized tensors ({len(dynamic)}, e.g. {dynamic[0]!r}): the compiler needs static sizes")
    if ops and not _quantized(g, ops, types):
        problems.append("Model not quantized (the compiler refuses it)")

    items, reasons, tail = _segment(g, ops, types)
    for sg in fb.subgraphs[1:]:  # never mapped: the compiler takes one subgraph
        items += [(kind, AFTER_UNMAPPED) for _, kind in by_graph[id(sg)]]
    problems += [reason if n == 1 else f"{reason} (x{n})" for reason, n in Counter(reasons).items()]
    problems += [tail] if tail else []

    in_types = [types.get(main.tensors[i].type, "?") for i in main.inputs]
    out_types = [types.get(main.tensors[i].type, "?") for i in main.outputs]
    for where, names in (("input", in_types), ("output", out_types)):
        bad = sorted({t for t in names if t not in ("INT8", "UINT8")})
        if bad:
            problems.append(f"model {where} is {'/'.join(bad)}: full-integer models have int8/uint8 I/O")
    weights = {types.get(t.type, "?") for i, t in enumerate(main.tensors or []) if g.is_const(i)}
    rows = _grouped(items)
    on_tpu = sum(r.count for r in rows if r.mapped)
    return Preflight(
        path=str(path),
        rows=rows,
        problems=problems,
        total_ops=len(items),
        ops_on_edgetpu=on_tpu,
        ops_on_cpu=len(items) - on_tpu,
        input_dtypes=in_types,
        output_dtypes=out_types,
        weight_dtypes=sorted(weights),
    )


def format_table(rows: list[OpRow]) -> str:
    """The compiler's operator table: ``Operator`` in 31 columns, ``Count`` in 11, then ``Status``."""
    lines = [f"{'Operator':<30} {'Count':<10} Status", ""]
    lines += [f"{r.operator:<30} {r.count:<10} {r.status}" for r in rows]
    return "\n".join(lines)


def format_preflight(p: Preflight) -> str:
    """A preflight as the compiler would print it, with the verdict and its reasons."""
    if p.passed:
        verdict = "PASS: every operator maps to the Edge TPU"
    else:
        verdict = f"FAIL: {p.ops_on_cpu} of {p.total_ops} operations would not run on the Edge TPU"
    lines = [
        f"Edge TPU preflight of {Path(p.path).name} (predicted from the file, no compiler run)",
        f"Total number of operations: {p.total_ops}",
        f"Number of operations that will run on Edge TPU: {p.ops_on_edgetpu}",
        f"Number of operations that will run on CPU: {p.ops_on_cpu}",
        "",
        format_table(p.rows),
        "",
        verdict,
    ]
    lines += [f"  - {problem}" for problem in p.problems]
    return "\n".join(lines)

"""Full-integer TFLite emitter: the simulation's weights and activation ranges, packed by
ai-edge-quantizer (the maintained TFLite PTQ tool) into an int8 model with int8 NHWC input and
output.

ai-edge-quantizer's ``quantize(calibration_result)`` accepts ``{tensor: {min, max}}`` from
anywhere, so our numbers go in and its own moving-average calibration (which clips logits)
never runs:

1. the BN-folded simulation graph, its weights already on their quantization grid (AdaRound's
   rounding and bias correction included), is converted to a float TFLite model (litert-torch,
   NHWC input, no TRANSPOSE);
2. each TFLite activation tensor is mapped to the simulation point whose float tensor it equals,
   by value on a few images (converters rename tensors; numbers do not change);
3. mapped tensors get the simulation's [lo, hi], which reproduces its scale and zero-point
   exactly; the few tensors with no point (PAD outputs, which share their input's
   quantization anyway) get true min-max over the calibration images;
4. weights are quantized per channel with min-max, which recovers the simulation's scales
   exactly because each channel's largest |w| already sits at the end of its grid.

Limits, recorded in the returned info: activations must be 8 bits (LiteRT's integer kernels);
ai-edge-quantizer has no int4 depthwise conv, so with 4-bit weights the depthwise filters are
stored in int8, and weight widths other than 4 and 8 likewise. Its min-max scale puts a 4-bit
grid value up to half an int8 step off; ``exact_low_bit_weights`` re-packs those tensors with
scale s/18 so that every grid value is an exact int8 integer. LiteRT's int4 CONV_2D kernel
itself is not bit-exact with integer reference arithmetic (one output step high on a few percent
of outputs, see benchmarks/litert_kernels.py): the remaining W4A8 difference.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_write_bytes
from effdeploy.quant.int4 import pack_int4, unpack_int4
from effdeploy.quant.sim import QuantSim
from effdeploy.runtime.intermediates import litert_tensors
from effdeploy.runtime.litert_backend import LiteRTBackend

MATCH_TOLERANCE = 1e-4  # max |tflite - torch| / max |torch| for "the same tensor"


@contextlib.contextmanager
def _silenced():
    """ai-edge-quantizer prints progress bars and reports; our output stays ours."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield


def nhwc(t: torch.Tensor) -> np.ndarray:
    """A simulation tensor (NCHW) in TFLite's NHWC layout."""
    return (t.permute(0, 2, 3, 1) if t.ndim == 4 else t).numpy()


def match_points(tensors: dict[str, np.ndarray], captures: dict[str, np.ndarray], order: list[str]) -> dict[str, str]:
    """TFLite tensor name -> simulation point, by value. Where several points hold the same
    numbers (a SE pool over a 1x1 map equals its input), the first in network order wins."""
    mapping = {}
    for name, t in tensors.items():
        for point in order:
            v = captures[point]
            if v.size != t.size or v.shape[0] != t.shape[0]:
                continue
            if v.shape != t.shape:
                if np.prod(v.shape[1:-1]) != 1 and np.prod(t.shape[1:-1]) != 1:
                    continue  # only layouts that agree when spatial dims are 1
                v = v.reshape(t.shape)
            denom = float(np.abs(v).max()) or 1.0
            if float(np.abs(v - t).max()) / denom < MATCH_TOLERANCE:
                mapping[name] = point
                break
    return mapping


def _weight_captures(sim: QuantSim, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every point's tensor with quantized weights but float activations: what the float TFLite
    model of the grid-weight graph computes."""
    with sim.float_activations():
        _, cap = sim.run_capture(torch.from_numpy(x), quantized=True)
    return {k: nhwc(v) for k, v in cap.items()}


def emit_tflite(sim: QuantSim, path: str | Path, calibration: np.ndarray, *, match_images: int = 8) -> dict:
    """Write the full-integer TFLite model of ``sim`` to ``path``; ``calibration`` (NCHW float)
    supplies the ranges of the few tensors the simulation has no point for."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        from ai_edge_quantizer import quantizer as aeq
    except ImportError:
        raise EffdeployError("full-integer TFLite needs ai-edge-quantizer (pip install ai-edge-quantizer)") from None
    from effdeploy.export.tflite import export_tflite

    act_bits = {p.bits for p in sim.points.values() if p.fixed is None}
    if act_bits != {8}:
        raise EffdeployError(
            f"TFLite full-integer models need 8-bit activations (this configuration has {sorted(act_bits)} bits)"
        )
    path = Path(path)
    weight_bits = {w.bits for w in sim.weights.values()}
    container = 4 if weight_bits == {4} else 8
    notes = []
    if container == 4:
        notes.append("depthwise filters stored in int8 (ai-edge-quantizer has no int4 depthwise conv)")
    elif weight_bits != {8}:
        notes.append(f"weights of {sorted(weight_bits)} bits: ai-edge-quantizer packs one width (int8)")

    with tempfile.TemporaryDirectory(prefix="effdeploy-tflite-") as tmp:
        float_path = Path(tmp) / "float.tflite"
        with sim.plain_graph() as graph:
            export_tflite(graph, float_path)
        x_match = calibration[:match_images]
        _, float_tensors = litert_tensors(float_path, np.transpose(x_match, (0, 2, 3, 1)))
        captures = _weight_captures(sim, x_match)
        order = list(sim.points)

        qt = aeq.Quantizer(str(float_path))
        qt.add_static_config(".*", "*", 8, container)
        if container == 4:
            qt.add_static_config(".*", "DEPTHWISE_CONV_2D", 8, 8)
        with _silenced():
            sample = {"serving_default": [{"args_0": np.transpose(calibration[:1], (0, 2, 3, 1)).copy()}]}
            qsvs = qt.calibrate(sample, num_threads=1)
        wanted = {n: float_tensors[n] for n in qsvs if n in float_tensors}
        mapping = match_points(wanted, captures, order)
        unmapped = [n for n in qsvs if n not in mapping]
        lo_hi = _minmax_over(float_path, calibration, unmapped)
        for name, qsv in qsvs.items():
            if name in mapping:
                qp = sim.points[mapping[name]].qparams
                lo, hi = qp.lo, qp.hi
            elif name in lo_hi:
                lo, hi = lo_hi[name]
            else:
                continue  # constants: ai-edge-quantizer quantizes them from their values
            shape = np.asarray(qsv["min"]).shape
            qsvs[name] = {"min": np.full(shape, lo, np.float32), "max": np.full(shape, hi, np.float32)}
        with _silenced():
            result = qt.quantize(qsvs, enable_progress_report=False, enable_progress_bar=False)
    model = bytes(result.quantized_model)
    low = [(w.bits, w.quantized().detach().numpy().astype(np.float64)) for w in sim.weights.values() if w.bits < 8]
    if low:
        model, repacked = exact_low_bit_weights(model, low)
        notes.append(
            f"{repacked} sub-8-bit weight tensors re-packed exactly: 4-bit convs and FCs as int4, "
            "the others in int8 with scale s/m"
        )
    atomic_write_bytes(path, model)
    info = inspect_tflite(path)
    info.update(
        {
            "file": path.name,
            "bytes": path.stat().st_size,
            "tensors_mapped_to_simulation": len(mapping),
            "tensors_with_own_minmax": sorted(_short(n) for n in lo_hi),
            "tensor_map": {n: p for n, p in mapping.items()},
            "notes": notes,
        }
    )
    return info


# operators whose input 1 is a per-channel weight and input 2 its int32 bias
_WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _grid_code(q: np.ndarray, qmax: int) -> np.ndarray | None:
    """The b-bit integers k (|k| <= qmax) behind int8 values that min-max quantization of k * s
    produced (int8 = round(k * 127 / qmax)), or None where ``q`` is not such a tensor."""
    k = np.round(q.astype(np.float64) * qmax / 127)
    if np.abs(k).max() > qmax or not np.array_equal(np.round(k * 127 / qmax), q):
        return None
    return k.astype(np.int64)


def weight_values(fb, tensor) -> np.ndarray:
    """An int8 or int4 weight tensor of a parsed model as int64 integers in its own shape (int4:
    the inverse of ``pack_int4``)."""
    from ai_edge_litert import schema_py_generated as schema

    raw = np.frombuffer(bytes(fb.buffers[tensor.buffer].data), np.uint8)
    if tensor.type == schema.TensorType.INT8:
        return raw.view(np.int8).reshape(tensor.shape).astype(np.int64)
    if tensor.type != schema.TensorType.INT4:
        raise ValueError(f"weight tensor {tensor.name!r} is neither int8 nor int4 (type {tensor.type})")
    return unpack_int4(raw, int(np.prod(tensor.shape))).reshape(tensor.shape)


def operators(fb, kinds: tuple[str, ...]):
    """(subgraph, operator, kind name) for every operator of a parsed model whose builtin kind
    (``"CONV_2D"``...) is in ``kinds``; the builtin code is whichever of the two schema fields
    holds it (old converters fill the deprecated int8 one)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for graph in fb.subgraphs:
        for op in graph.operators:
            code = fb.operatorCodes[op.opcodeIndex]
            kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
            if kind in kinds:
                yield graph, op, kind


def _same_values(decoded: np.ndarray, values: np.ndarray) -> bool:
    a, b = np.sort(decoded.ravel()), np.sort(values.ravel())
    return bool(np.abs(a - b).max() <= 1e-5 * max(float(np.abs(b).max()), 1e-12))


def exact_low_bit_weights(model: bytes, layers: list[tuple[int, np.ndarray]]) -> tuple[bytes, int]:
    """Re-pack sub-8-bit weights that sit in int8 containers so that LiteRT computes with exactly
    the simulation's values.

    ai-edge-quantizer stores a b-bit grid value k * s (|k| <= qmax = 2^(b-1) - 1) of a layer it
    keeps in int8 (depthwise convs; every layer when widths are mixed) as round(k * 127 / qmax)
    with scale qmax * s / 127: up to half an int8 step off the grid. With scale s / m instead,
    m = floor(127 / qmax) (18 for 4 bits), the same value is the integer k * m, exactly; the
    int32 bias follows its new scale (input scale x weight scale). 4-bit CONV_2D and
    FULLY_CONNECTED weights, which LiteRT runs from int4, are packed as int4 (scale s, two values
    a byte): with mixed widths (say 8-bit stem and classifier) ai-edge-quantizer's one container
    width would otherwise store every layer in int8. ``layers`` are the simulation's sub-8-bit
    layers as (bits, weight values); a tensor is rewritten only where it decodes as such a grid
    and its values are one of those layers' (compared sorted, so layout-free); returns the model
    and the number of tensors rewritten."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    rewritten = 0
    done: set[int] = set()
    for graph, op, kind in operators(fb, _WEIGHTED_OPS):
        w_idx = int(op.inputs[1])
        w = graph.tensors[w_idx]
        buf = fb.buffers[w.buffer].data
        if w_idx in done or w.type != schema.TensorType.INT8 or buf is None or w.quantization is None:
            continue
        axis = int(w.quantization.quantizedDimension)
        scale = np.asarray(w.quantization.scale, np.float64)
        q = np.moveaxis(weight_values(fb, w), axis, 0).reshape(len(scale), -1)
        for b, values in layers:
            qmax = 2 ** (b - 1) - 1
            k = _grid_code(q, qmax) if values.size == q.size else None
            if k is not None and _same_values(k * (scale[:, None] * 127 / qmax), values):
                break
        else:
            continue
        as_int4 = b == 4 and kind != "DEPTHWISE_CONV_2D"
        m = 1 if as_int4 else 127 // qmax
        new_scale = scale * 127 / (qmax * m)  # = s / m, s = the b-bit step
        new_q = np.moveaxis((k * m).reshape(np.moveaxis(np.empty(w.shape), axis, 0).shape), 0, axis)
        data = pack_int4(new_q) if as_int4 else new_q.astype(np.int8).tobytes()
        fb.buffers[w.buffer].data = np.frombuffer(data, np.uint8).copy()
        w.type = schema.TensorType.INT4 if as_int4 else schema.TensorType.INT8
        w.quantization.scale = new_scale.astype(np.float32).tolist()
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias = graph.tensors[int(op.inputs[2])]
            b_int = np.frombuffer(bytes(fb.buffers[bias.buffer].data), np.int32).astype(np.int64)
            in_scale = np.asarray(bias.quantization.scale, np.float64) / scale
            grid = np.round(b_int * qmax / 127)  # the bias on the b-bit grid (input scale x s)
            exact = np.round(grid * 127 / qmax) == b_int
            new_b = np.where(exact, grid * m, np.round(b_int * qmax * m / 127))
            fb.buffers[bias.buffer].data = np.frombuffer(new_b.astype(np.int32).tobytes(), np.uint8).copy()
            bias.quantization.scale = (in_scale * new_scale).astype(np.float32).tolist()
        done.add(w_idx)
        rewritten += 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(fb)), rewritten


def _short(name: str) -> str:
    """The module part of a litert-torch tensor name (``...MBConv_block2a/...Conv2d_conv;2`` -> ``block2a/conv;2``)."""
    parts = name.split("/")
    tail = [p.rsplit("_", 1)[-1] if "_" in p else p for p in parts[2:]]
    return "/".join(tail) or name


def _minmax_over(float_path: Path, calibration: np.ndarray, names: list[str], batch: int = 16) -> dict[str, tuple]:
    """True min-max (over every image, not a moving average) of the named tensors."""
    found: dict[str, list[float]] = {}
    if not names:
        return {}
    for i in range(0, len(calibration), batch):
        _, values = litert_tensors(float_path, np.transpose(calibration[i : i + batch], (0, 2, 3, 1)))
        for n in names:
            if n in values:
                lo, hi = float(values[n].min()), float(values[n].max())
                prev = found.get(n)
                found[n] = [lo, hi] if prev is None else [min(prev[0], lo), max(prev[1], hi)]
    return {n: tuple(v) for n, v in found.items()}


def inspect_tflite(path: str | Path) -> dict:
    """Operators, I/O types and any float activation left in a (meant to be) full-integer model."""
    it = LiteRTBackend(path, use_xnnpack=False).interpreter
    it.allocate_tensors()
    ops = it._get_ops_details()
    details = {d["index"]: d for d in it.get_tensor_details()}
    float_ops = sorted(
        {o["op_name"] for o in ops if any(details[i]["dtype"] == np.float32 for i in o["outputs"] if i in details)}
    )
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    return {
        "ops": dict(Counter(o["op_name"] for o in ops)),
        "float_ops": float_ops,
        "input": {"shape": [int(s) for s in inp["shape"]], "dtype": inp["dtype"].__name__},
        "output": {"shape": [int(s) for s in out["shape"]], "dtype": out["dtype"].__name__},
    }

"""Running a model with its intermediate tensors exposed, for layer-by-layer comparisons.

LiteRT runs its builtin kernels with every tensor preserved: XNNPACK (the default delegate)
fuses subgraphs and hides their tensors. onnxruntime gets the requested tensors appended as
graph outputs; a graph output cannot be fused into an integer kernel, so in a QDQ model these
tensors come from onnxruntime's unfused QDQ path, not from the kernels of the model as shipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from effdeploy.runtime.litert_backend import LiteRTBackend, dequantize_output
from effdeploy.runtime.onnxruntime_backend import OnnxRuntimeBackend


def litert_invoked(path: str | Path, x_nhwc: np.ndarray):
    """A LiteRT interpreter (builtin kernels, one thread, every tensor preserved) that has run
    the float NHWC images ``x_nhwc``."""
    backend = LiteRTBackend(path, use_xnnpack=False, preserve_all_tensors=True)
    backend.invoke(x_nhwc)
    return backend.interpreter


def litert_tensors(path: str | Path, x_nhwc: np.ndarray) -> tuple[object, dict[str, np.ndarray]]:
    """Run a TFLite model keeping every tensor; returns (interpreter, {name: value}) for the
    tensors with one row per image. Integer tensors are returned dequantized."""
    it = litert_invoked(path, x_nhwc)
    values = {}
    for d in it.get_tensor_details():
        try:
            t = it.get_tensor(d["index"])
        except ValueError:
            continue
        if t.shape and t.shape[0] == len(x_nhwc) and t.dtype in (np.int8, np.int16, np.float32):
            if t.dtype != np.float32:
                if not d["quantization"][0]:
                    continue
                t = dequantize_output(t, d)
            values[d["name"]] = t
    return it, values


def onnxruntime_tensors(
    path: str | Path, names: Iterable[str], **options
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A function x (float NCHW) -> {name: value} for those of ``names`` that a node of the ONNX
    model at ``path`` produces, in the order given; ``options`` go to ``OnnxRuntimeBackend``."""
    import onnx

    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    exposed = list(dict.fromkeys(t for t in names if t in produced))
    for tensor in exposed:
        if tensor not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    backend = OnnxRuntimeBackend(model.SerializeToString(), **options)

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        values = backend.run_all(x)
        return {tensor: values[tensor] for tensor in exposed}

    return run

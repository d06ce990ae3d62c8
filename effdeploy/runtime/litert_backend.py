"""LiteRT (ai-edge-litert) on CPU: NHWC input, batch resized per call, int8 I/O handled here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.runtime.base import register


def interpreter_module():
    """``ai_edge_litert.interpreter``, or ``tflite_runtime.interpreter`` where only that exists
    (Coral boards ship it): Interpreter and load_delegate come from the same one."""
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            raise EffdeployError("LiteRT runtime missing: pip install ai-edge-litert (or tflite-runtime)") from None
    return interpreter


def _interpreter_cls():
    return interpreter_module().Interpreter


def quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float input in the tensor's own type: a full-integer model's input is quantized with its
    own scale and zero-point (round half to even, as the simulation rounds)."""
    x = np.asarray(x, dtype=np.float32)
    if detail["dtype"] == np.float32:
        return x
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def dequantize_output(y: np.ndarray, detail: dict) -> np.ndarray:
    """A tensor as float32, dequantized with its own scale and zero-point if it is an integer."""
    if y.dtype == np.float32:
        return y
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


class LiteRTBackend:
    name = "litert"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        use_xnnpack: bool = True,
        preserve_all_tensors: bool = False,
    ) -> None:
        """``preserve_all_tensors`` keeps every intermediate tensor readable after ``invoke``
        (LiteRT otherwise reuses their memory); with XNNPACK its fused subgraphs still hide them."""
        path = Path(path)
        if not path.is_file():
            raise EffdeployError(f"{path}: TFLite model not found")
        Interpreter = _interpreter_cls()
        kwargs = {"model_path": str(path), "num_threads": threads or 1}
        if not use_xnnpack:
            from ai_edge_litert.interpreter import OpResolverType

            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if preserve_all_tensors:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            self.interpreter = Interpreter(**kwargs)
        except Exception as err:
            raise EffdeployError(f"{path}: LiteRT cannot load it ({str(err).splitlines()[0][:200]})") from None
        self.path = path
        self._batch = None
        self.session_options = {"num_threads": threads or 1, "xnnpack": use_xnnpack}

    def _prepare(self, batch: int) -> None:
        if batch != self._batch:
            inp = self.interpreter.get_input_details()[0]
            self.interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
            self.interpreter.allocate_tensors()
            self._batch = batch

    def invoke(self, x_nhwc: np.ndarray) -> None:
        """Run float NHWC images (quantized here for an integer input); the results stay in
        ``self.interpreter``."""
        self._prepare(len(x_nhwc))
        inp = self.interpreter.get_input_details()[0]
        self.interpreter.set_tensor(inp["index"], quantize_input(x_nhwc, inp))
        self.interpreter.invoke()

    def run(self, images: np.ndarray) -> np.ndarray:
        self.invoke(np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)), dtype=np.float32))
        out = self.interpreter.get_output_details()[0]
        return dequantize_output(self.interpreter.get_tensor(out["index"]), out)


register("litert")(LiteRTBackend)

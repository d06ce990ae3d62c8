"""Coral Edge TPU through LiteRT's delegate API: an ``_edgetpu.tflite`` model (the output of
``edgetpu_compiler``) run with ``libedgetpu``.

The compiled model has static shapes, so images run one at a time at batch 1; int8/uint8 input
and output are (de)quantized with the model's own scale and zero-point, as on the CPU backend.
Without ``libedgetpu``, or without an Edge TPU attached, the backend cannot be created and its
error says which.
"""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.runtime.base import register
from effdeploy.runtime.litert_backend import _interpreter_cls, dequantize_output, quantize_input

# libedgetpu's file name per OS (Coral's "Run inference on the Edge TPU with Python")
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"  # the operator edgetpu_compiler puts in a compiled model


def custom_op_name(code) -> str:
    """The custom-op name of an operator code (LiteRT schema object API), "" for builtins."""
    c = code.customCode
    return c.decode() if isinstance(c, bytes) else (c or "")


def is_compiled(fb) -> bool:
    """Whether a parsed model went through edgetpu_compiler (it holds the Edge TPU custom op)."""
    return any(custom_op_name(code) == EDGETPU_CUSTOM_OP for code in fb.operatorCodes)


def read_tflite(path: str | Path):
    """A .tflite file parsed with LiteRT's schema object API (what the compiler and preflight read)."""
    from ai_edge_litert.tools import flatbuffer_utils

    path = Path(path)
    if not path.is_file():
        raise EffdeployError(f"{path}: TFLite model not found")
    data = path.read_bytes()
    if data[4:8] != b"TFL3":
        raise EffdeployError(f"{path}: not a TFLite model (no TFL3 file identifier)")
    try:
        return flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as err:
        raise EffdeployError(f"{path}: cannot read the TFLite flatbuffer ({str(err).splitlines()[0][:200]})") from None


def default_library() -> str:
    return EDGETPU_LIBRARY.get(platform.system(), EDGETPU_LIBRARY["Linux"])


def _load_delegate_fn():
    from effdeploy.runtime.litert_backend import interpreter_module

    return interpreter_module().load_delegate


def load_edgetpu_delegate(library: str | None = None, device: str | None = None):
    """The Edge TPU delegate, or an EffdeployError that tells apart libedgetpu not installed, a
    library that is no delegate, and no Edge TPU answering. ``device`` is libedgetpu's selector
    (``usb``, ``usb:0``, ``pci:0``...)."""
    library = library or default_library()
    try:
        lib = ctypes.CDLL(library)
    except OSError:
        raise EffdeployError(
            f"Edge TPU runtime not installed: cannot load {library} "
            "(install libedgetpu1-std from Coral's apt repository)"
        ) from None
    if not hasattr(lib, "tflite_plugin_create_delegate"):
        raise EffdeployError(f"{library} is not a TFLite delegate library (no tflite_plugin_create_delegate)")
    load_delegate = _load_delegate_fn()
    try:
        return load_delegate(library, {"device": device} if device else None)
    except Exception as err:
        where = f" at {device!r}" if device else ""
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise EffdeployError(
            f"no Edge TPU attached{where}: {library} loaded but its delegate did not start ({first})"
        ) from None


class EdgeTPUBackend:
    name = "edgetpu"

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        device: str | None = None,
        library: str | None = None,
    ) -> None:
        path = Path(path)
        if not is_compiled(read_tflite(path)):
            raise EffdeployError(f"{path}: not compiled for the Edge TPU (run edgetpu_compiler on it first)")
        delegate = load_edgetpu_delegate(library, device)
        Interpreter = _interpreter_cls()
        try:
            self.interpreter = Interpreter(
                model_path=str(path), experimental_delegates=[delegate], num_threads=threads or 1
            )
            self.interpreter.allocate_tensors()
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise EffdeployError(f"{path}: the Edge TPU delegate cannot run it ({first})") from None
        self.path = path
        self.options = {"library": library or default_library(), "device": device, "threads": threads or 1}
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]

    def invoke_one(self, image_nhwc: np.ndarray) -> np.ndarray:
        """One batch-1 inference on an NHWC float image (1, H, W, C); the model's shapes are static."""
        self.interpreter.set_tensor(self._in["index"], quantize_input(image_nhwc, self._in))
        self.interpreter.invoke()
        return dequantize_output(self.interpreter.get_tensor(self._out["index"]), self._out)

    def run(self, images: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(np.transpose(images, (0, 2, 3, 1)), dtype=np.float32)
        return np.concatenate([self.invoke_one(x[i : i + 1]) for i in range(len(x))])


register("edgetpu")(EdgeTPUBackend)

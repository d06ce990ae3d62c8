"""Third-party warnings and logs kept off the terminal unless ``-v`` asks for them.

What a user reads should be effdeploy's own progress and results. The libraries underneath are
loud in three ways, and each needs its own switch:

- Python logging: torch.onnx ("torchvision is not installed. Skipping ..."), torch's pytree,
  torchao ("Failed to load ....so"), onnxruntime.quantization ("Please consider pre-processing",
  logged on the root logger). Their loggers are raised to ERROR once they exist.
- Python warnings raised inside these packages: ignored.
- onnxruntime's histogram calibrators print their progress to stdout ("Collecting tensor data
  and making histogram ..."): that module's ``print`` is made silent.
- Native libraries writing to file descriptor 2. The converter under litert-torch logs through
  absl while its shared library loads ("WARNING: All log messages before absl::InitializeLog()
  ...", oneDNN's notice), before any setting can reach it: TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel
  and ABSL_MIN_LOG_LEVEL do not silence these. LiteRT announces its XNNPACK delegate on the
  first ``allocate_tensors``. So while such a package is imported, and while a LiteRT
  interpreter allocates, fd 2 is captured: lines of known noise are dropped, every other line
  is written back.

``quiet_third_party(verbose=True)`` changes nothing, so ``effdeploy -v`` shows all of it.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import re
import sys
import tempfile
import threading
import warnings

# Packages whose Python warnings and logs are silenced.
PACKAGES = (
    "torch",
    "torchao",
    "torchvision",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "onnx_ir",
    "litert_torch",
    "litert_converter",
    "ai_edge_litert",
    "ai_edge_quantizer",
    "tflite_runtime",
    "tensorflow",
    "jax",
    "jaxlib",
    "absl",
)

# Packages whose import loads native libraries that write to fd 2 (imported with it captured).
NATIVE_NOISE_PACKAGES = frozenset(
    {"litert_torch", "litert_converter", "ai_edge_litert", "ai_edge_quantizer", "tflite_runtime", "tensorflow", "jax"}
)

# Loggers that torch resets when it initialises its logging: raised again once torch is imported.
TORCH_LOGGERS = ("torch", "torch.onnx", "torch.utils._pytree", "torch.onnx._internal.exporter._registration")

# What native libraries print that is noise: absl / glog INFO and WARNING lines
# ("I0000 00:00:1796228589.012269 7795 port.cc:153] ..."), absl's notice before its logging is
# initialised, and TFLite's INFO lines ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.").
NOISE = re.compile(
    r"^(?:[IW]\d{4} \d+:\d+:[\d.]+\s+\d+ \S+:\d+\] .*"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|INFO: .*)\r?$"
)

_NOISY_MODULE = r"^(?:" + "|".join(re.escape(p) for p in PACKAGES) + r")(?:\.|$)"
_NOISY_PATH = re.compile(r"[/\\](?:" + "|".join(re.escape(p) for p in PACKAGES) + r")[/\\]")

_installed = False


def quiet_third_party(verbose: bool = False) -> None:
    """Silence the libraries' warnings and logs for the rest of this process (once; no-op if
    ``verbose``). Call it before the heavy imports: each verb of the CLI imports lazily."""
    global _installed
    if verbose or _installed:
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF-derived C++ logging that reads it later
    warnings.filterwarnings("ignore", module=_NOISY_MODULE)
    for name in PACKAGES:
        if name != "torch":  # torch resets its own loggers on import: see _after_torch
            logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().addFilter(_root_filter)  # onnxruntime.quantization logs on the root logger
    sys.meta_path.insert(0, _QuietImporter())
    for module, hook in _AFTER_IMPORT.items():
        if module in sys.modules:
            hook(sys.modules[module])


def is_noise(line: str) -> bool:
    """Whether a line a native library wrote to stderr is known noise."""
    return NOISE.match(line.rstrip("\n")) is not None


def _root_filter(record: logging.LogRecord) -> bool:
    """Drop warnings that third-party code logs on the root logger (``logging.warning(...)``)."""
    return record.levelno >= logging.ERROR or not _NOISY_PATH.search(record.pathname or "")


class _Fd2Capture:
    """fd 2 redirected to a temporary file while any capture is open (nested and concurrent
    captures share one); on the last close, the lines that are not noise are written back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved: int | None = None
        self._file = None

    def __enter__(self) -> _Fd2Capture:
        with self._lock:
            if self._depth == 0:
                self._start()
            self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._stop()

    def _start(self) -> None:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return  # no usable fd 2: nothing to capture
        try:
            self._file = tempfile.TemporaryFile()
            os.dup2(self._file.fileno(), 2)
        except OSError:
            os.close(saved)
            if self._file is not None:
                self._file.close()
            self._file = None
            return
        self._saved = saved

    def _stop(self) -> None:
        if self._saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = None
        self._file.seek(0)
        data = self._file.read()
        self._file.close()
        self._file = None
        kept = [line for line in data.splitlines(keepends=True) if not is_noise(line.decode("utf-8", "replace"))]
        if kept:
            os.write(2, b"".join(kept))


_capture = _Fd2Capture()


class _QuietLoader:
    """A module's own loader, run with fd 2 captured and/or followed by a hook; the module keeps
    the real loader."""

    def __init__(self, loader, capture: bool, hook) -> None:
        self._loader, self._capture, self._hook = loader, capture, hook

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        if not self._capture:
            return self._loader.create_module(spec)
        with _capture:  # an extension module's shared library loads here
            return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            if self._capture:
                with _capture:
                    self._loader.exec_module(module)
            else:
                self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self._loader
        if self._hook is not None:
            self._hook(module)


class _QuietImporter(importlib.abc.MetaPathFinder):
    """Finds modules with the other finders, and wraps the loaders of those that need quieting."""

    def find_spec(self, fullname, path, target=None):
        capture = fullname.partition(".")[0] in NATIVE_NOISE_PACKAGES
        hook = _AFTER_IMPORT.get(fullname)
        if not capture and hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # a namespace package: no code runs
        spec.loader = _QuietLoader(spec.loader, capture, hook)
        return spec


def _after_torch(module) -> None:
    for name in TORCH_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _after_onnxruntime(module) -> None:
    setter = getattr(module, "set_default_logger_severity", None)
    if setter is not None:
        setter(3)  # errors only, for sessions that do not set their own severity


def _after_interpreter(module) -> None:
    """LiteRT prints its XNNPACK notice on an interpreter's first ``allocate_tensors``."""
    cls = getattr(module, "Interpreter", None)
    allocate = getattr(cls, "allocate_tensors", None)
    if allocate is None or getattr(allocate, "_effdeploy_quiet", False):
        return

    def allocate_tensors(self, *args, **kwargs):
        with _capture:
            return allocate(self, *args, **kwargs)

    allocate_tensors._effdeploy_quiet = True
    allocate_tensors.__doc__ = allocate.__doc__
    cls.allocate_tensors = allocate_tensors


def _silent_print(*args, **kwargs) -> None:
    return None


def _after_calibrate(module) -> None:
    """The module's own ``print`` shadows the builtin for its code only."""
    module.print = _silent_print


_AFTER_IMPORT = {
    "torch": _after_torch,
    "onnxruntime": _after_onnxruntime,
    "onnxruntime.quantization.calibrate": _after_calibrate,
    "ai_edge_litert.interpreter": _after_interpreter,
    "tflite_runtime.interpreter": _after_interpreter,
}

"""The Backend protocol and the registry of runtimes."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

from effdeploy.errors import EffdeployError


@runtime_checkable
class Backend(Protocol):
    name: str

    def run(self, images: np.ndarray) -> np.ndarray:
        """float32 NCHW images -> float32 logits (N, classes)."""
        ...


_FACTORIES: dict[str, Callable[..., Backend]] = {}
# name -> module that registers it; imported on first use so `import effdeploy.runtime` stays light
_MODULES = {
    "torch": "effdeploy.runtime.torch_backend",
    "onnxruntime": "effdeploy.runtime.onnxruntime_backend",
    "litert": "effdeploy.runtime.litert_backend",
    "android": "effdeploy.runtime.android_backend",
    "edgetpu": "effdeploy.runtime.edgetpu_backend",
}


def register(name: str) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    def deco(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        _FACTORIES[name] = factory
        return factory

    return deco


def available_backends() -> list[str]:
    return sorted(set(_MODULES) | set(_FACTORIES))


def load_backend(name: str, artifact, **options) -> Backend:
    if name not in _FACTORIES and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _FACTORIES:
        raise EffdeployError(f"unknown runtime {name!r} (available: {', '.join(available_backends())})")
    return _FACTORIES[name](artifact, **options)


def run_batched(backend: Backend, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.concatenate([backend.run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])

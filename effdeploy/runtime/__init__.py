"""Runtimes behind one protocol and one registry: ``load_backend(name, artifact)``.

A backend takes float32 NCHW images (the PyTorch convention) and returns float32 logits; it
owns any layout change (NHWC for LiteRT) and any input/output quantization of its artifact.
Adding a runtime touches one file: a module that calls ``register``. Heavy runtime libraries
are imported only when a backend is created.
"""

from effdeploy.runtime.base import Backend, available_backends, load_backend, register

__all__ = ["Backend", "available_backends", "load_backend", "register"]

"""One bench record per (artifact, backend, device, threads, options).

Every backend (host CPU runtimes, Android over adb, Coral Edge TPU) returns these, so one table
and one JSON schema cover them all. A record that could not run keeps ``status`` as a one-line
reason and ``None`` for what it could not measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError


@dataclass
class Record:
    artifact: str  # file name (or "pytorch" for eager PyTorch)
    format: str  # "pytorch" | "onnx" | "tflite"
    precision: str  # "fp32" | "w8a8" | "w4a8" | "w4a4"
    producer: str  # "effdeploy" | "onnxruntime quantize_static" | "ai-edge-quantizer"
    backend: str  # registry name: torch | onnxruntime | litert | android | edgetpu
    device: str  # host CPU model, or "<serial> (<phone model>)", or the Edge TPU
    threads: int | None = None
    options: dict = field(default_factory=dict)  # the exact runtime options used
    status: str = "ok"  # "ok" or a one-line reason it did not run
    size_mb: float | None = None
    latency_ms: dict | None = None  # bench.stats.latency_stats (some tools give fewer fields)
    peak_memory_mb: float | None = None
    snr_db: float | None = None  # output SNR against float PyTorch on the same images
    top1: float | None = None  # on the eval images, when labels are given
    images: int | None = None  # how many images SNR and top-1 were measured on
    notes: list[str] = field(default_factory=list)  # e.g. a delegate that took only part of the graph

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def check_bench_inputs(who: str, paths, images, float_logits, labels):
    """Existing model files, and images / float logits / labels of one length: what every device
    bench checks before touching a device. Returns the paths and the images as float32."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise EffdeployError(f"{p}: TFLite model not found")
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        for name, arr in (("float_logits", float_logits), ("labels", labels)):
            if arr is not None and len(arr) != len(images):
                raise EffdeployError(f"{who} bench: {len(images)} images but {len(arr)} {name}")
    return paths, images

"""What export and quantize wrote: each file in an artifact directory named by its role.

Names are the writers' contract (``export.pipeline.ARTIFACT_NAMES``, quantize's
``model_<precision>.<ext>`` and peers' ``peer_<name>_<precision>.<ext>``); anything else in the
directory (compiled ``*_edgetpu.tflite``, reports) is not a benchmark subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from effdeploy.errors import EffdeployError

HOST_BACKEND = {"pytorch": "torch", "onnx": "onnxruntime", "tflite": "litert"}
_OURS = re.compile(r"^model_(w\d+a\d+)\.(onnx|tflite)$")
_PEER = re.compile(r"^peer_(.+)_(w\d+a\d+)\.(onnx|tflite)$")
_FLOAT = {"model.onnx": "onnx", "model.tflite": "tflite"}


@dataclass(frozen=True)
class Artifact:
    name: str  # file name, or "pytorch"
    path: Path | None  # None: the checkpoint, run eagerly
    format: str  # pytorch | onnx | tflite
    precision: str  # fp32 | w8a8 | w4a8 | w4a4
    producer: str

    @property
    def host_backend(self) -> str:
        return HOST_BACKEND[self.format]

    @property
    def size_mb(self) -> float | None:
        return self.path.stat().st_size / 1e6 if self.path is not None else None


def classify(path: Path) -> Artifact | None:
    name = path.name
    if name in _FLOAT:
        return Artifact(name, path, _FLOAT[name], "fp32", "effdeploy export")
    if m := _OURS.match(name):
        return Artifact(name, path, m[2], m[1], "effdeploy")
    if m := _PEER.match(name):
        tool = "onnxruntime quantize_static" if m[3] == "onnx" else "ai-edge-quantizer"
        return Artifact(name, path, m[3], m[2], f"{tool} ({m[1]})")
    return None


def find_artifacts(directory: Path, checkpoint: Path | None = None) -> list[Artifact]:
    """Every benchmark subject in ``directory``: float first, then by precision, ours before peers;
    the checkpoint (PyTorch eager, the float reference) leads when given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EffdeployError(
            f"{directory}: no artifact directory (run 'effdeploy export' and 'effdeploy quantize' first)"
        )
    found = [a for p in sorted(directory.iterdir()) if p.is_file() and (a := classify(p))]
    if not found:
        raise EffdeployError(f"{directory}: no ONNX or TFLite artifacts in it (run 'effdeploy export' first)")
    order = {"fp32": 0, "w8a8": 1, "w4a8": 2, "w4a4": 3}
    found.sort(
        key=lambda a: (
            order.get(a.precision, 9),
            a.producer != "effdeploy" and a.producer != "effdeploy export",
            a.format,
            a.name,
        )
    )
    lead = [Artifact("pytorch", None, "pytorch", "fp32", "PyTorch eager")] if checkpoint is not None else []
    return lead + found

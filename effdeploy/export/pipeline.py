"""`effdeploy export`: checkpoint -> ONNX + TFLite -> fidelity on real images -> manifest.json.

Fidelity is measured against PyTorch on real images (never random noise) through the same
runtime registry every benchmark uses: max |diff|, output SNR in dB, top-1 agreement.

The files are one set: written into a staging folder and moved into the output directory
together, manifest last (``fileio.staged_dir``), so an interrupted export leaves the previous
complete set in place, and an export of fewer formats leaves no stale file of the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from effdeploy.config import DEFAULT_CALIBRATION, RunConfig
from effdeploy.errors import EffdeployError
from effdeploy.fileio import json_safe
from effdeploy.metrics import max_abs_diff, snr_db, top1_agreement
from effdeploy.runtime.base import load_backend, run_batched

ARTIFACT_NAMES = {"onnx": "model.onnx", "tflite": "model.tflite"}
MANIFEST = "manifest.json"
SET_NAMES = frozenset({*ARTIFACT_NAMES.values(), MANIFEST})
RUNTIME_FOR = {"onnx": "onnxruntime", "tflite": "litert"}


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, Path]
    fidelity: dict[str, dict]
    manifest: dict = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("effdeploy", "torch", "onnx", "onnxruntime", "onnxscript", "litert-torch", "ai-edge-litert"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def file_record(path: Path, fmt: str) -> dict:
    import hashlib

    return {
        "name": path.name,
        "format": fmt,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def fidelity_source(run: RunConfig) -> Path:
    if run.export.fidelity_data is not None:
        return run.export.fidelity_data
    if run.data.test is not None and Path(run.data.test).is_dir():
        return run.data.test
    return DEFAULT_CALIBRATION


def measure_fidelity(reference: np.ndarray, outputs: np.ndarray) -> dict:
    return {
        "max_abs_diff": max_abs_diff(reference, outputs),
        "snr_db": snr_db(reference, outputs),
        "top1_agreement": top1_agreement(reference, outputs),
    }


def load_model_for_export(run: RunConfig, random_init: bool = False):
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.model.efficientnet import EfficientNet

    if random_init:
        import torch

        from effdeploy.config import check_model_size

        check_model_size(run.model, "--model")
        torch.manual_seed(0)
        return EfficientNet(run.model).eval()
    if run.checkpoint is None:
        raise EffdeployError(f"config {run.name!r}: no `checkpoint:` given (or pass --random-init)")
    if not Path(run.checkpoint).is_file():
        raise EffdeployError(f"{run.checkpoint}: checkpoint not found (train it with 'make train')")
    return load_checkpoint(run.checkpoint).eval()


def export_run(run: RunConfig, out_dir: str | Path, *, random_init: bool = False, log=print) -> ExportResult:
    from effdeploy.data.sources import load_images
    from effdeploy.export.onnx import export_onnx
    from effdeploy.export.tflite import edge_transposes, export_tflite, tflite_io
    from effdeploy.fileio import atomic_write_text, check_writable_dir, staged_dir
    from effdeploy.runtime.torch_backend import TorchBackend

    out_dir = Path(out_dir)
    check_writable_dir(out_dir, "--out")  # before the slow part: a bad --out fails in a second, as one line
    model = load_model_for_export(run, random_init)
    prepare_out_dir(out_dir)
    pre = model.config.preprocess
    source = fidelity_source(run)
    images = load_images(source, pre, n=run.export.fidelity_images)
    inputs = images.inputs(pre)
    reference = run_batched(TorchBackend(model, threads=run.export.threads, channels_last=False), inputs)
    # the fidelity images' class names describe the model's outputs only when they are its classes
    # (ImageNet samples measuring a CIFAR-10 model must not label its 10 outputs with 1000 names)
    class_names = list(images.class_names) if len(images.class_names) == model.config.num_classes else []

    files: dict[str, Path] = {}
    fidelity: dict[str, dict] = {}
    records = []
    with staged_dir(out_dir, owns=SET_NAMES.__contains__, last=MANIFEST) as stage:
        for fmt in run.export.formats:
            path = stage / ARTIFACT_NAMES[fmt]
            log(f"exporting {fmt} -> {out_dir / path.name}")
            try:
                if fmt == "onnx":
                    export_onnx(model, path, opset=run.export.opset, class_names=class_names)
                else:
                    export_tflite(model, path)
            except OSError as err:  # disk full, permissions: the user's problem, stated in one line
                raise EffdeployError(f"{out_dir / path.name}: cannot write it ({err.strerror or err})") from None
            files[fmt] = out_dir / path.name
            backend = load_backend(RUNTIME_FOR[fmt], path, threads=run.export.threads)
            outputs = run_batched(backend, inputs)
            fidelity[fmt] = {"runtime": RUNTIME_FOR[fmt], **measure_fidelity(reference, outputs)}
            rec = file_record(path, fmt)
            if fmt == "tflite":
                rec["io"] = tflite_io(path)
                rec["edge_transposes"] = edge_transposes(path)
            else:
                rec["io"] = {"input": {"name": "images", "shape": ["batch", 3, pre.resolution, pre.resolution]}}
            records.append(rec)
        manifest = _manifest(run, model, pre, class_names, records, source, images, fidelity, random_init)
        try:
            atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2))
        except OSError as err:
            raise EffdeployError(f"{out_dir / MANIFEST}: cannot write it ({err.strerror or err})") from None
    return ExportResult(out_dir, files, fidelity, manifest)


def _manifest(run, model, pre, class_names, records, source, images, fidelity, random_init) -> dict:
    """What the set holds and how it was made; every file with its SHA-256."""
    return {
        "effdeploy_manifest": 1,
        "name": run.name,
        "source": {
            "checkpoint": None if random_init else str(run.checkpoint),
            "random_init": random_init,
            "model_config": json.loads(model.config.model_dump_json()),
        },
        "preprocess": json.loads(pre.model_dump_json()),
        "class_names": class_names,
        "files": records,
        "tools": tool_versions(),
        "fidelity": {
            "reference": "torch (eager, float32)",
            "data": str(source),
            "images": len(images),
            "metrics": json_safe(fidelity),
        },
    }


def prepare_out_dir(out_dir: Path) -> None:
    """Create the artifact directory (checked by ``check_writable_dir``), or fail with one line."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EffdeployError(f"{out_dir}: cannot create the output directory ({err.strerror or err})") from None

"""Calibration sets: a stratified, deterministic sample of images stored with its provenance.

File format: safetensors with ``pixels`` (uint8 N,H,W,3, after the model's resize/crop but
before normalisation) and ``labels`` (int64 N); the header metadata holds the provenance as
JSON: source folder, seed, the chosen files, SHA-256 of the full source list and of the
sample, and the preprocessing geometry. No timestamps: the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effdeploy.config import PreprocessConfig
from effdeploy.data.datasets import PixelDataset, decode_images, stratified_sample
from effdeploy.data.folders import scan_labelled
from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_path

FORMAT_TAG = "effdeploy-calibration/1"
GEOMETRY_FIELDS = ("resolution", "resize", "crop_pct", "interpolation")


@dataclass
class CalibrationSet:
    pixels: np.ndarray
    labels: np.ndarray
    provenance: dict

    def __len__(self) -> int:
        return len(self.labels)

    def as_dataset(self) -> PixelDataset:
        return PixelDataset(self.pixels, self.labels, tuple(self.provenance.get("class_names", ())))

    def check_matches(self, pre: PreprocessConfig, source: str = "calibration set") -> None:
        """Refuse a set whose stored geometry differs from the model's preprocessing."""
        stored = self.provenance.get("preprocess", {})
        for key in GEOMETRY_FIELDS:
            want = getattr(pre, key)
            if stored.get(key) != want:
                raise EffdeployError(
                    f"{source}: built with preprocess.{key}={stored.get(key)!r}, the model needs {want!r}; rebuild it"
                )


def _display_path(path: Path) -> str:
    """The source folder as given (relative paths stay relative, so provenance is portable)."""
    return path.as_posix()


def build_calibration_set(data: str | Path, n: int, seed: int, pre: PreprocessConfig) -> CalibrationSet:
    images = scan_labelled(data)
    labels_all = np.asarray(images.labels, dtype=np.int64)
    if n < 1:
        raise EffdeployError(f"--n must be at least 1, got {n}")
    if n > len(images):
        raise EffdeployError(f"{data}: asked for {n} calibration images but the folder holds {len(images)}")
    idx = stratified_sample(labels_all, n, seed)
    chosen = images.subset(idx)
    pixels = decode_images(chosen, pre, desc="calibration")
    rel = [f.relative_to(images.root).as_posix() for f in chosen.files]
    provenance = {
        "format": FORMAT_TAG,
        "source": _display_path(Path(data)),
        "n": n,
        "seed": seed,
        "sampling": "stratified: n // classes per class (remainder to the first classes), numpy default_rng(seed)",
        "source_images": len(images),
        "source_list_sha256": images.fingerprint(),
        "sample_list_sha256": chosen.fingerprint(),
        "class_names": list(images.class_names),
        "class_counts": {k: v for k, v in chosen.counts().items()},
        "preprocess": {k: getattr(pre, k) for k in GEOMETRY_FIELDS},
        "stored": "uint8 RGB pixels after resize/crop, before normalisation",
        "files": rel,
    }
    return CalibrationSet(pixels, np.asarray(chosen.labels, dtype=np.int64), provenance)


def save_calibration_set(cal: CalibrationSet, out: str | Path) -> Path:
    from safetensors.numpy import save_file

    out = Path(out)
    with atomic_path(out) as tmp:
        save_file(
            {"pixels": np.ascontiguousarray(cal.pixels), "labels": np.ascontiguousarray(cal.labels)},
            str(tmp),
            # one metadata key only: safetensors writes the metadata map in hash order, so two
            # keys would make the header (and the file's bytes) differ from run to run
            metadata={"effdeploy_calibration": json.dumps(cal.provenance, sort_keys=True)},
        )
    return out


def load_calibration_set(path: str | Path) -> CalibrationSet:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EffdeployError(f"{path}: calibration set not found (build one with 'effdeploy calib build')")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "effdeploy_calibration" not in meta:
                raise EffdeployError(f"{path}: not an effdeploy calibration set")
            provenance = json.loads(meta["effdeploy_calibration"])
            pixels = f.get_tensor("pixels")
            labels = f.get_tensor("labels")
    except EffdeployError:
        raise
    except Exception as err:
        raise EffdeployError(f"{path}: unreadable calibration set ({str(err).splitlines()[0][:160]})") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3 or len(labels) != len(pixels):
        raise EffdeployError(f"{path}: malformed calibration tensors {pixels.shape} {pixels.dtype}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
        raise EffdeployError(f"{path}: malformed calibration labels {labels.shape} {labels.dtype}")
    names = provenance.get("class_names", []) if isinstance(provenance, dict) else None
    if (
        not isinstance(provenance, dict)
        or not isinstance(provenance.get("preprocess", {}), dict)
        or not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
    ):
        raise EffdeployError(f"{path}: malformed calibration provenance")
    return CalibrationSet(pixels, labels.astype(np.int64), provenance)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

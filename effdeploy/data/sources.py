"""Real images from either source a user names: a calibration-set file or an image folder.

One entry point above both, so that the dataset and calibration modules need not know each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from effdeploy.config import PreprocessConfig
from effdeploy.data.calibration import load_calibration_set
from effdeploy.data.datasets import PixelDataset, decode_images, stratified_sample
from effdeploy.data.folders import relabel, scan_labelled


def load_images(
    source: str | Path,
    pre: PreprocessConfig,
    n: int | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> PixelDataset:
    """Real images for measurement: a calibration-set file or an image folder (a stratified
    sample of ``n`` when given), decoded through ``pre``. With ``class_names`` (the model's
    outputs), labels are those names' indices, whichever classes the source holds."""
    source = Path(source)
    if source.suffix == ".safetensors":
        cal = load_calibration_set(source)
        cal.check_matches(pre, str(source))
        data = cal.as_dataset()
        if class_names is not None:
            labels = relabel(data.labels.tolist(), data.class_names, class_names, source)
            data = PixelDataset(data.pixels, np.asarray(labels, dtype=np.int64), tuple(class_names))
        if n is not None and n < len(data):
            data = data.subset(stratified_sample(data.labels, n, seed))
        return data
    images = scan_labelled(source)
    if class_names is not None:
        images = images.with_classes(class_names)
    if n is not None and n < len(images):
        images = images.subset(stratified_sample(np.asarray(images.labels), n, seed))
    pixels = decode_images(images, pre, desc=f"decode {source.name}")
    return PixelDataset(pixels, np.asarray(images.labels, dtype=np.int64), images.class_names, images)

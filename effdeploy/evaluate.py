"""Accuracy of a PyTorch model on labelled images, through the model's own preprocessing.

Labels are matched to the model's outputs by class NAME wherever the model's class names are
known, so a folder holding only some of the classes (``cat/`` and ``dog/`` of CIFAR-10) is scored
against the right outputs instead of outputs 0 and 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from effdeploy.data.sources import load_images
from effdeploy.errors import EffdeployError
from effdeploy.metrics import topk_accuracy


def load_model_source(*, checkpoint: Path | None = None, pretrained: str | None = None):
    """A model from an effdeploy checkpoint or from a named shipped weights package."""
    from effdeploy.model import checkpoints

    if (checkpoint is None) == (pretrained is None):
        raise EffdeployError("give exactly one of --checkpoint or --pretrained")
    if pretrained is not None:
        if pretrained != "lite0":
            raise EffdeployError(f"--pretrained: unknown {pretrained!r} (available: lite0)")
        return checkpoints.load_lite0_pretrained()
    return checkpoints.load_checkpoint(checkpoint)


def model_class_names(num_classes: int, *, checkpoint: Path | None = None, run=None) -> tuple[str, ...] | None:
    """The names of a model's outputs, in order, or None when nothing says them.

    In order of trust: names stored in the checkpoint; the training folder's class folders (sorted,
    as training labelled them) named by ``run``'s ``data.train`` when the config sets it, or by the
    ``run.yaml`` the trainer wrote beside the checkpoint. A list of the wrong length is not used.
    """
    from effdeploy.config import load_run_config
    from effdeploy.data.folders import folder_class_names
    from effdeploy.model.checkpoints import checkpoint_class_names

    if checkpoint is not None:
        stored = checkpoint_class_names(checkpoint)
        if stored is not None and len(stored) == num_classes:
            return stored
    folders = []
    if run is not None and "train" in run.data.model_fields_set:
        folders.append(Path(run.data.train))
    if checkpoint is not None and (Path(checkpoint).parent / "run.yaml").is_file():
        beside = load_run_config(Path(checkpoint).parent / "run.yaml")
        folders.append(Path(beside.data.train))
    for folder in folders:
        if folder.is_dir():
            names = folder_class_names(folder)
            if len(names) == num_classes:
                return names
    return None


def evaluate_model(
    model: torch.nn.Module, data: str | Path, batch_size: int = 64, class_names: Sequence[str] | None = None
) -> dict:
    """Top-1 / top-5 on ``data``; ``class_names`` (the model's outputs) maps labels by name."""
    from effdeploy.model.pixels import predict_pixels

    if batch_size < 1:
        raise EffdeployError(f"--batch-size: must be at least 1, got {batch_size}")
    num_classes = model.config.num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise EffdeployError(f"{len(class_names)} class names for a model with {num_classes} outputs")
    images = load_images(data, model.config.preprocess, class_names=class_names)
    if class_names is None:
        found = len(images.class_names)
        if found > num_classes:
            raise EffdeployError(f"{data}: {found} classes but the model has {num_classes} outputs")
        if found < num_classes and (images.source is None or images.source.positional):
            raise EffdeployError(
                f"{data}: {found} classes for a model with {num_classes} outputs, and the model's class "
                "names are unknown, so labels cannot be matched to outputs (give --config with the "
                "training data's data.train)"
            )
    logits = predict_pixels(model, images.pixels, batch_size)
    return {
        "data": str(data),
        "images": len(images),
        "top1": topk_accuracy(logits, images.labels, 1),
        "top5": topk_accuracy(logits, images.labels, 5),
    }

"""Accuracy of a PyTorch model on labelled images, through the model's own preprocessing."""

from __future__ import annotations

from pathlib import Path

import torch

from effdeploy.data.datasets import load_images
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


def evaluate_model(model: torch.nn.Module, data: str | Path, batch_size: int = 64) -> dict:
    from effdeploy.train.trainer import predict_pixels

    images = load_images(data, model.config.preprocess)
    if len(images.class_names) > model.config.num_classes:
        raise EffdeployError(
            f"{data}: {len(images.class_names)} classes but the model has {model.config.num_classes} outputs"
        )
    logits = predict_pixels(model, images.pixels, batch_size)
    return {
        "data": str(data),
        "images": len(images),
        "top1": topk_accuracy(logits, images.labels, 1),
        "top5": topk_accuracy(logits, images.labels, 5),
    }

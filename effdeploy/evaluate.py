"""Accuracy of a PyTorch model on labelled images, through the model's own preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from effdeploy.data.folders import scan_labelled
from effdeploy.data.preprocess import preprocess_file
from effdeploy.errors import EffdeployError
from effdeploy.metrics import topk_accuracy
from effdeploy.progress import progress


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


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, files, batch_size: int = 64, desc: str = "eval") -> np.ndarray:
    model.eval()
    pre = model.config.preprocess
    out = []
    for start in progress(range(0, len(files), batch_size), desc=desc, unit="batch"):
        batch = np.stack([preprocess_file(f, pre) for f in files[start : start + batch_size]])
        out.append(model(torch.from_numpy(batch)).float().numpy())
    return np.concatenate(out)


def evaluate_model(model: torch.nn.Module, data: str | Path, batch_size: int = 64) -> dict:
    images = scan_labelled(data)
    if len(images.class_names) > model.config.num_classes:
        raise EffdeployError(
            f"{data}: {len(images.class_names)} classes but the model has {model.config.num_classes} outputs"
        )
    logits = predict_logits(model, images.files, batch_size)
    labels = np.asarray(images.labels)
    return {
        "data": str(data),
        "images": len(images),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
    }

"""uint8 pixels into the model: its own normalisation as tensors (the torch twin of
``data.preprocess.normalize``) and batched prediction, shared by training, distillation and
evaluation so that none of them can normalise differently."""

from __future__ import annotations

import numpy as np
import torch

from effdeploy.model.efficientnet import EfficientNet
from effdeploy.progress import progress


def to_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW in channels_last memory (no copy of the layout)."""
    x = (pixels.float().div_(255.0) - mean) / std
    return x.permute(0, 3, 1, 2)


def norm_tensors(model: EfficientNet) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's preprocessing mean and std, as float32 tensors for ``to_input``."""
    pre = model.config.preprocess
    return torch.tensor(pre.mean, dtype=torch.float32), torch.tensor(pre.std, dtype=torch.float32)


@torch.inference_mode()
def predict_pixels(model: EfficientNet, pixels: np.ndarray, batch_size: int = 500, desc: str = "eval") -> np.ndarray:
    """Logits for uint8 NHWC pixels, through the model's own normalisation."""
    model.eval()
    mean, std = norm_tensors(model)
    out = []
    for s in progress(range(0, len(pixels), batch_size), desc=desc, unit="batch"):
        out.append(model(to_input(torch.from_numpy(pixels[s : s + batch_size]), mean, std)).float())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.num_classes), np.float32)

"""Per-sample augmentation on whole uint8 batches (vectorised: no per-image Python loop)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def crop_flip(pixels: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, each drawn per sample.

    ``pixels`` is uint8 (B, H, W, C); the result has the same shape.
    """
    b, h, w, _ = pixels.shape
    if padding > 0:
        padded = F.pad(pixels.permute(0, 3, 1, 2), (padding, padding, padding, padding)).permute(0, 2, 3, 1)
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    else:
        padded = pixels
        dy = dx = torch.zeros(b, dtype=torch.long)
    rows = dy[:, None] + torch.arange(h)[None, :]  # (B, H)
    cols = torch.arange(w)[None, :].expand(b, w)  # (B, W)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    cols = dx[:, None] + cols
    bidx = torch.arange(b)[:, None, None]
    return padded[bidx, rows[:, :, None], cols[:, None, :]]

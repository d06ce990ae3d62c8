"""A run's training folder split into (train, validation): deterministic, so training, SE
reordering and validation-set measurements all see the same images on either side."""

from __future__ import annotations

import numpy as np

from effdeploy.config import RunConfig
from effdeploy.data.datasets import PixelDataset, load_pixels, stratified_sample, stratified_split
from effdeploy.errors import EffdeployError


def load_split(run: RunConfig, limit: int | None = None) -> tuple[PixelDataset, PixelDataset]:
    """The training folder decoded and split into (train, validation), deterministically."""
    data = load_pixels(run.data.train, run.model.preprocess)
    if len(data.class_names) != run.model.num_classes:
        raise EffdeployError(
            f"{run.data.train}: {len(data.class_names)} classes but model.num_classes is {run.model.num_classes}"
        )
    if limit is not None:  # smoke runs: a stratified subset, still deterministic
        data = data.subset(stratified_sample(data.labels, min(limit, len(data)), run.data.split_seed))
    if run.data.val_fraction > 0:
        keep, held = stratified_split(data.labels, run.data.val_fraction, run.data.split_seed)
        return data.subset(keep), data.subset(held)
    return data, data.subset(np.arange(0))

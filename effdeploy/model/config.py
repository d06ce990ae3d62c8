"""The model's configuration: which EfficientNet to build and how its input is preprocessed.

A model config names a family member (``variant``) and may override any field; the validator
fills the rest from the published coefficients, so a saved config is always fully concrete and
rebuilds the exact same network. Errors name the offending field. It lives in the model package
so that building and loading a model never needs the pipeline's sections (config.py, which
re-exports these names).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from effdeploy.model.arch import (
    B0_STAGES,
    FAMILY,
    ArchSpec,
    Stage,
    compound_scaling,
    is_lite,
    resolve,
    round_repeats,
)
from effdeploy.parsing import Strict

SePlacement = Literal["after", "before", "none"]
Activation = Literal["silu", "relu6", "hardswish"]
Norm = Literal["bn", "gn"]
Padding = Literal["symmetric", "same"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Bounds that keep a config describable (the stage table names at most 702 blocks per stage) and
# its numbers finite; whether such a model fits in memory is check_model_size's question (model/profile.py).
PHI_RANGE = (-20.0, 20.0)
MAX_RESOLUTION = 8192
MAX_MULT = 64.0
MAX_BLOCKS_PER_STAGE = 256
STAGE_LIMITS = {"expand": (1, 16), "kernel": (1, 15), "stride": (1, 4), "repeats": (1, 64), "channels": (1, 16384)}


_Positive = Annotated[float, Field(gt=0)]


class PreprocessConfig(Strict):
    """How an image becomes the model's input tensor. Owned by the model so export, calibration
    and evaluation can never disagree."""

    resolution: int = Field(224, ge=8, le=MAX_RESOLUTION)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # in [0, 1] units, RGB
    std: tuple[_Positive, _Positive, _Positive] = IMAGENET_STD
    # "center_crop": resize the short side to resolution / crop_pct, then crop the centre square
    # (the ImageNet eval protocol); "resize": resize the whole image to resolution x resolution.
    resize: Literal["center_crop", "resize"] = "center_crop"
    crop_pct: float = Field(0.875, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"


class ModelConfig(Strict):
    """One member of the EfficientNet family. Unset fields come from ``variant`` (or ``phi``)."""

    variant: str = "b0"
    phi: float | None = None  # compound coefficient; overrides the variant's published scaling
    width_mult: float = Field(1.0, gt=0, le=MAX_MULT)
    depth_mult: float = Field(1.0, gt=0, le=MAX_MULT)
    resolution: int = Field(224, ge=8, le=MAX_RESOLUTION)
    dropout: float = Field(0.2, ge=0, lt=1)
    drop_path_rate: float = Field(0.2, ge=0, lt=1)
    num_classes: int = Field(1000, ge=1)
    se_placement: SePlacement = "after"
    se_ratio: float = Field(0.25, gt=0, le=1)
    activation: Activation = "silu"
    norm: Norm = "bn"
    norm_eps: float = Field(1e-3, gt=0)
    gn_groups: int = Field(8, ge=1)
    padding: Padding = "symmetric"
    fix_stem_head: bool = False
    stages: tuple[Stage, ...] = B0_STAGES
    preprocess: PreprocessConfig = PreprocessConfig()

    @model_validator(mode="before")
    @classmethod
    def _fill_from_variant(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        variant = str(data.get("variant", "b0")).lower()
        if variant not in FAMILY:
            raise ValueError(f"variant: unknown {variant!r}; choose one of {', '.join(FAMILY)}")
        data["variant"] = variant
        phi = data.get("phi")
        scaling = compound_scaling(_check_phi(phi)) if phi is not None else FAMILY[variant]
        lite = is_lite(variant)
        defaults = {
            "width_mult": scaling.width,
            "depth_mult": scaling.depth,
            "resolution": scaling.resolution,
            "dropout": scaling.dropout,
            "se_placement": "none" if lite else "after",
            "activation": "relu6" if lite else "silu",
            "fix_stem_head": lite,
        }
        for key, value in defaults.items():
            data.setdefault(key, value)
        pre = data.get("preprocess") or {}
        if isinstance(pre, dict):  # anything else is reported by field validation
            pre = dict(pre)
            pre.setdefault("resolution", data["resolution"])
        data["preprocess"] = pre
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.preprocess.resolution != self.resolution:
            raise ValueError(
                f"preprocess.resolution ({self.preprocess.resolution}) must equal resolution ({self.resolution})"
            )
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        for i, stage in enumerate(self.stages):
            for name, (lo, hi) in STAGE_LIMITS.items():
                value = getattr(stage, name)
                if not lo <= value <= hi:
                    raise ValueError(f"stages.{i}.{name}: must be between {lo} and {hi}, got {value}")
            if stage.kernel % 2 == 0:
                raise ValueError(f"stages.{i}.kernel: must be odd, got {stage.kernel}")
            blocks = round_repeats(stage.repeats, self.depth_mult)
            if blocks > MAX_BLOCKS_PER_STAGE:
                raise ValueError(
                    f"depth_mult: {self.depth_mult:g} gives stage {i + 1} {blocks} blocks "
                    f"(at most {MAX_BLOCKS_PER_STAGE})"
                )
        return self

    @property
    def has_se(self) -> bool:
        return self.se_placement != "none"

    def arch(self) -> ArchSpec:
        """Resolve the stage table into concrete block shapes (see model/arch.py)."""
        return resolve(
            stages=self.stages,
            width=self.width_mult,
            depth=self.depth_mult,
            resolution=self.resolution,
            num_classes=self.num_classes,
            se_ratio=self.se_ratio,
            use_se=self.has_se,
            fix_stem_head=self.fix_stem_head,
            drop_path_rate=self.drop_path_rate,
        )


def _check_phi(phi: Any) -> float:
    """The compound coefficient as a float, refused before the scaling formula sees it."""
    try:
        value = float(phi)
    except (TypeError, ValueError):
        raise ValueError(f"phi: must be a number, got {phi!r}") from None
    lo, hi = PHI_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"phi: must be between {lo:g} and {hi:g}, got {phi!r}")
    return value

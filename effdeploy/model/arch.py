"""The EfficientNet architecture as data: the paper's stage table and compound scaling.

This module is the single source of truth for every network shape in effdeploy. The model
(`efficientnet.py`), the analytic profiler (`profile.py`) and the checkpoint importers all read
the resolved `ArchSpec`; nothing else hard-codes a channel count. Pure Python: no torch import.

References: Tan & Le, "EfficientNet: Rethinking Model Scaling for CNNs" (ICML 2019), Table 1 and
section 3.3; the TF reference implementation (round_filters / round_repeats); EfficientNet-Lite
(tensorflow/tpu, efficientnet_lite_builder.py: no SE, ReLU6, fixed stem and head).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

# Compound scaling constants (paper eq. 3): depth = ALPHA**phi, width = BETA**phi,
# resolution = GAMMA**phi, chosen so that ALPHA * BETA**2 * GAMMA**2 ~= 2.
ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
BASE_RESOLUTION = 224
CHANNEL_DIVISOR = 8


@dataclass(frozen=True)
class Stage:
    """One row of the paper's Table 1: `repeats` MBConv blocks with the same shape."""

    expand: int  # expansion ratio t of the inverted bottleneck
    kernel: int  # depthwise kernel size
    stride: int  # stride of the first block of the stage
    repeats: int  # number of blocks before depth scaling
    channels: int  # output channels before width scaling


# EfficientNet-B0, Table 1 of the paper (stage 1 is the stem, stage 9 the head).
B0_STEM_CHANNELS = 32
B0_STAGES: tuple[Stage, ...] = (
    Stage(expand=1, kernel=3, stride=1, repeats=1, channels=16),
    Stage(expand=6, kernel=3, stride=2, repeats=2, channels=24),
    Stage(expand=6, kernel=5, stride=2, repeats=2, channels=40),
    Stage(expand=6, kernel=3, stride=2, repeats=3, channels=80),
    Stage(expand=6, kernel=5, stride=1, repeats=3, channels=112),
    Stage(expand=6, kernel=5, stride=2, repeats=4, channels=192),
    Stage(expand=6, kernel=3, stride=1, repeats=1, channels=320),
)
B0_HEAD_CHANNELS = 1280


@dataclass(frozen=True)
class Scaling:
    """Width, depth and resolution coefficients of one family member, plus its head dropout."""

    width: float
    depth: float
    resolution: int
    dropout: float


# Published coefficients (TF reference `efficientnet_params`, `efficientnet_lite_params`).
FAMILY: dict[str, Scaling] = {
    "b0": Scaling(width=1.0, depth=1.0, resolution=224, dropout=0.2),
    "b1": Scaling(width=1.0, depth=1.1, resolution=240, dropout=0.2),
    "b2": Scaling(width=1.1, depth=1.2, resolution=260, dropout=0.3),
    "b3": Scaling(width=1.2, depth=1.4, resolution=300, dropout=0.3),
    "b4": Scaling(width=1.4, depth=1.8, resolution=380, dropout=0.4),
    "b5": Scaling(width=1.6, depth=2.2, resolution=456, dropout=0.4),
    "b6": Scaling(width=1.8, depth=2.6, resolution=528, dropout=0.5),
    "b7": Scaling(width=2.0, depth=3.1, resolution=600, dropout=0.5),
    "lite0": Scaling(width=1.0, depth=1.0, resolution=224, dropout=0.2),
    "lite1": Scaling(width=1.0, depth=1.1, resolution=240, dropout=0.2),
    "lite2": Scaling(width=1.1, depth=1.2, resolution=260, dropout=0.3),
    "lite3": Scaling(width=1.2, depth=1.4, resolution=280, dropout=0.3),
    "lite4": Scaling(width=1.4, depth=1.8, resolution=300, dropout=0.3),
}

# The paper's FLOPs column (Table 2), in billions of multiply-accumulates.
PAPER_GFLOPS = {"b0": 0.39, "b1": 0.70, "b2": 1.0, "b3": 1.8, "b4": 4.2, "b5": 9.9, "b6": 19.0, "b7": 37.0}


def is_lite(variant: str) -> bool:
    return variant.startswith("lite")


def compound_scaling(phi: float) -> Scaling:
    """Coefficients for any compound coefficient ``phi`` (negative shrinks the network).

    Width and depth follow the paper's constants exactly; resolution is 224 * GAMMA**phi
    rounded to a multiple of 8 (the network's stride is 32, a multiple of 8 keeps the
    resize cheap); dropout grows 0.05 per unit of phi from B0's 0.2, clipped to [0.1, 0.5].
    The published B1-B7 were tuned by grid search and are not exactly these values.
    """
    resolution = max(CHANNEL_DIVISOR, int(round(BASE_RESOLUTION * GAMMA**phi / 8)) * 8)
    dropout = min(0.5, max(0.1, 0.2 + 0.05 * phi))
    return Scaling(width=BETA**phi, depth=ALPHA**phi, resolution=resolution, dropout=round(dropout, 4))


def round_channels(channels: float, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Scale ``channels`` by ``width`` and round to a multiple of ``divisor`` (never down >10%)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding up (paper and TF reference)."""
    return int(math.ceil(repeats * depth))


@dataclass(frozen=True)
class BlockSpec:
    """One fully resolved MBConv block: every shape the model, profiler and importers need."""

    name: str  # Keras-style: block{stage}{letter}, e.g. "block2b"
    stage: int  # 1-based MBConv stage index
    in_channels: int
    out_channels: int
    expand_channels: int  # in_channels * expand (== in_channels when expand == 1)
    kernel: int
    stride: int
    se_channels: int  # squeeze width: se_ratio * in_channels (0 when the model has no SE)
    drop_path: float  # stochastic depth probability, growing linearly with block index

    @property
    def has_expand(self) -> bool:
        return self.expand_channels != self.in_channels

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@dataclass(frozen=True)
class ArchSpec:
    """The resolved network: stem, blocks, head and classifier widths."""

    stem_channels: int
    blocks: tuple[BlockSpec, ...]
    head_channels: int
    num_classes: int
    resolution: int
    in_channels: int = 3

    @property
    def feature_stride(self) -> int:
        return 2 * math.prod(b.stride for b in self.blocks)


def block_name(stage: int, index: int) -> str:
    letters = string.ascii_lowercase
    suffix = letters[index] if index < len(letters) else f"{letters[index // 26 - 1]}{letters[index % 26]}"
    return f"block{stage}{suffix}"


def resolve(
    *,
    stages: tuple[Stage, ...] = B0_STAGES,
    width: float = 1.0,
    depth: float = 1.0,
    resolution: int = BASE_RESOLUTION,
    num_classes: int = 1000,
    se_ratio: float = 0.25,
    use_se: bool = True,
    fix_stem_head: bool = False,
    drop_path_rate: float = 0.2,
    stem_channels: int = B0_STEM_CHANNELS,
    head_channels: int = B0_HEAD_CHANNELS,
    in_channels: int = 3,
) -> ArchSpec:
    """Apply width/depth scaling to a stage table and list every block.

    ``fix_stem_head`` is EfficientNet-Lite's rule: stem and head widths stay unscaled and the
    first and last stages keep their depth, which keeps the model friendly to integer hardware.
    """
    stem = stem_channels if fix_stem_head else round_channels(stem_channels, width)
    head = head_channels if fix_stem_head else round_channels(head_channels, width)
    repeats = [
        s.repeats if fix_stem_head and i in (0, len(stages) - 1) else round_repeats(s.repeats, depth)
        for i, s in enumerate(stages)
    ]
    total = sum(repeats)
    blocks: list[BlockSpec] = []
    cin = stem
    for stage_idx, (stage, n) in enumerate(zip(stages, repeats, strict=True), start=1):
        cout = round_channels(stage.channels, width)
        for j in range(n):
            blocks.append(
                BlockSpec(
                    name=block_name(stage_idx, j),
                    stage=stage_idx,
                    in_channels=cin,
                    out_channels=cout,
                    expand_channels=cin * stage.expand,
                    kernel=stage.kernel,
                    stride=stage.stride if j == 0 else 1,
                    se_channels=max(1, int(cin * se_ratio)) if use_se else 0,
                    drop_path=drop_path_rate * len(blocks) / total,
                )
            )
            cin = cout
    return ArchSpec(
        stem_channels=stem,
        blocks=tuple(blocks),
        head_channels=head,
        num_classes=num_classes,
        resolution=resolution,
        in_channels=in_channels,
    )

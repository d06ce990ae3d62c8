"""model/arch.py: channel rounding, compound scaling, depth rounding, Lite rules, block listing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from effdeploy.config import ModelConfig
from effdeploy.model.arch import (
    CHANNEL_DIVISOR,
    compound_scaling,
    resolve,
    round_channels,
    round_repeats,
)
from effdeploy.model.efficientnet import build_model


@settings(max_examples=300, deadline=None)
@given(
    channels=st.integers(min_value=1, max_value=4096),
    width=st.floats(min_value=0.01, max_value=8.0, allow_nan=False, allow_infinity=False),
)
def test_round_channels_properties(channels: int, width: float) -> None:
    out = round_channels(channels, width)
    assert isinstance(out, int)
    assert out % CHANNEL_DIVISOR == 0
    assert out >= CHANNEL_DIVISOR
    assert out >= 0.9 * channels * width  # never rounds down by more than 10%


@settings(max_examples=200, deadline=None)
@given(
    channels=st.integers(min_value=1, max_value=4096),
    width=st.floats(min_value=0.01, max_value=8.0, allow_nan=False, allow_infinity=False),
)
def test_round_channels_rounds_to_nearby_multiple(channels: int, width: float) -> None:
    # rounds to a nearby multiple: less than one divisor above the scaled width (or the floor of 8)
    out = round_channels(channels, width)
    assert out == CHANNEL_DIVISOR or out < channels * width + CHANNEL_DIVISOR


@given(k=st.integers(min_value=1, max_value=512))
def test_round_channels_keeps_multiples(k: int) -> None:
    assert round_channels(CHANNEL_DIVISOR * k, 1.0) == CHANNEL_DIVISOR * k


def test_compound_scaling_phi0_is_b0() -> None:
    s = compound_scaling(0)
    assert s.width == 1.0
    assert s.depth == 1.0
    assert s.resolution == 224


def test_compound_scaling_phi1() -> None:
    s = compound_scaling(1)
    assert s.width == pytest.approx(1.1)
    assert s.depth == pytest.approx(1.2)
    assert s.resolution > 224
    assert s.resolution % 8 == 0


@pytest.mark.parametrize("phi", [-0.5, -1.0, -2.0])
def test_negative_phi_shrinks_everything(phi: float) -> None:
    base, s = compound_scaling(0), compound_scaling(phi)
    assert s.width < base.width
    assert s.depth < base.depth
    assert s.resolution < base.resolution
    assert s.resolution % 8 == 0


def test_negative_phi_model_builds_and_runs() -> None:
    cfg = ModelConfig(phi=-2)
    b0 = ModelConfig(variant="b0")
    assert cfg.width_mult < 1 and cfg.depth_mult < 1 and cfg.resolution < 224
    assert len(cfg.arch().blocks) < len(b0.arch().blocks)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, cfg.resolution, cfg.resolution))
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build_model("b0").parameters())


@settings(max_examples=200, deadline=None)
@given(
    repeats=st.integers(min_value=1, max_value=8),
    depth=st.floats(min_value=0.1, max_value=4.0, allow_nan=False, allow_infinity=False),
)
def test_round_repeats_rounds_up(repeats: int, depth: float) -> None:
    n = round_repeats(repeats, depth)
    assert isinstance(n, int) and repeats * depth <= n < repeats * depth + 1


@pytest.mark.parametrize(
    ("repeats", "depth", "n"),
    [(1, 1.1, 2), (4, 1.1, 5), (3, 1.4, 5), (4, 1.8, 8), (4, 2.2, 9), (4, 2.6, 11), (3, 3.1, 10), (1, 3.1, 4)],
)
def test_round_repeats_published(repeats: int, depth: float, n: int) -> None:
    # stage sizes of EfficientNet-B1..B7 (e.g. B7's stage 4: 3 blocks * 3.1 -> 10)
    assert round_repeats(repeats, depth) == n


def test_round_repeats_rounds_up_not_to_nearest() -> None:
    assert round_repeats(2, 1.1) > round(2 * 1.1)  # 2.2 -> 3, not 2


# The published networks (paper Table 1 for B0; Keras / timm EfficientNetB0..B7 for the rest):
# blocks per stage, stage output channels, stem and head widths. Keras names the blocks
# block1a..block7x, so e.g. B7's stage 6 ends at block6m (13 blocks).
PUBLISHED = {
    "b0": ([1, 2, 2, 3, 3, 4, 1], [16, 24, 40, 80, 112, 192, 320], 32, 1280),
    "b1": ([2, 3, 3, 4, 4, 5, 2], [16, 24, 40, 80, 112, 192, 320], 32, 1280),
    "b2": ([2, 3, 3, 4, 4, 5, 2], [16, 24, 48, 88, 120, 208, 352], 32, 1408),
    "b3": ([2, 3, 3, 5, 5, 6, 2], [24, 32, 48, 96, 136, 232, 384], 40, 1536),
    "b4": ([2, 4, 4, 6, 6, 8, 2], [24, 32, 56, 112, 160, 272, 448], 48, 1792),
    "b5": ([3, 5, 5, 7, 7, 9, 3], [24, 40, 64, 128, 176, 304, 512], 48, 2048),
    "b6": ([3, 6, 6, 8, 8, 11, 3], [32, 40, 72, 144, 200, 344, 576], 56, 2304),
    "b7": ([4, 7, 7, 10, 10, 13, 4], [32, 48, 80, 160, 224, 384, 640], 64, 2560),
}
PUBLISHED_BLOCKS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55}


@pytest.mark.parametrize("variant", list(PUBLISHED))
def test_family_matches_published_shapes(variant: str) -> None:
    repeats, channels, stem, head = PUBLISHED[variant]
    arch = ModelConfig(variant=variant).arch()
    assert len(arch.blocks) == PUBLISHED_BLOCKS[variant] == sum(repeats)
    assert [sum(b.stage == s for b in arch.blocks) for s in range(1, 8)] == repeats
    assert [next(b.out_channels for b in arch.blocks if b.stage == s) for s in range(1, 8)] == channels
    assert (arch.stem_channels, arch.head_channels) == (stem, head)


# timm efficientnet_lite0/2/4 blocks per stage: first and last stage stay at one block, the middle
# ones are scaled by depth 1.0 / 1.2 / 1.8 and rounded up.
LITE_REPEATS = {
    "lite0": [1, 2, 2, 3, 3, 4, 1],
    "lite2": [1, 3, 3, 4, 4, 5, 1],
    "lite4": [1, 4, 4, 6, 6, 8, 1],
}


@pytest.mark.parametrize("variant", list(LITE_REPEATS))
def test_lite_keeps_stem_head_and_end_stages(variant: str) -> None:
    arch = ModelConfig(variant=variant).arch()
    assert arch.stem_channels == 32
    assert arch.head_channels == 1280
    assert [sum(b.stage == s for b in arch.blocks) for s in range(1, 8)] == LITE_REPEATS[variant]
    assert all(b.se_channels == 0 for b in arch.blocks)


def test_lite4_versus_b4_fixed_stem_head() -> None:
    lite4 = ModelConfig(variant="lite4").arch()
    scaled = resolve(width=1.4, depth=1.8)
    assert (lite4.stem_channels, lite4.head_channels) == (32, 1280)
    assert (scaled.stem_channels, scaled.head_channels) == (48, 1792)  # EfficientNet-B4's widths
    # the first and last stages of lite4 keep their one block where the unfixed scaling gives more
    for stage in (1, 7):
        assert sum(b.stage == stage for b in scaled.blocks) == 2
        assert sum(b.stage == stage for b in lite4.blocks) == 1


def test_lite_config_defaults() -> None:
    cfg = ModelConfig(variant="lite0")
    assert cfg.se_placement == "none"
    assert cfg.activation == "relu6"
    assert cfg.fix_stem_head is True


def test_block_names_strides_and_drop_path() -> None:
    cfg = ModelConfig(variant="b0", drop_path_rate=0.2)
    blocks = cfg.arch().blocks
    names = [b.name for b in blocks]
    assert names[:4] == ["block1a", "block2a", "block2b", "block3a"]
    assert names[-1] == "block7a"
    assert "block6d" in names and "block6e" not in names
    assert len(set(names)) == len(names)
    # stride only on the first block of a stage, and it is the stage's stride (paper Table 1)
    stage_strides = [1, 2, 2, 2, 1, 2, 1]
    for i, b in enumerate(blocks):
        first = i == 0 or blocks[i - 1].stage != b.stage
        assert b.stride == (stage_strides[b.stage - 1] if first else 1), b.name
        assert b.name.startswith(f"block{b.stage}")
    # channels chain: each block's input is the previous block's output
    for prev, b in zip(blocks, blocks[1:], strict=False):
        assert b.in_channels == prev.out_channels
    # drop_path: 0 for the first block, linear in the block index, below the rate
    rates = [b.drop_path for b in blocks]
    assert rates[0] == 0.0
    step = rates[1] - rates[0]
    assert step > 0
    for i, r in enumerate(rates):
        assert r == pytest.approx(i * step, abs=1e-12)
    assert rates[-1] < 0.2
    assert step == pytest.approx(0.2 / len(blocks))


def test_block_names_past_z() -> None:
    # a long stage needs more than 26 letters: names must stay unique
    arch = resolve(depth=10.0)
    names = [b.name for b in arch.blocks]
    assert len(set(names)) == len(names)


def test_feature_stride_is_32() -> None:
    assert ModelConfig(variant="b0").arch().feature_stride == 32

"""model/profile.py: analytic params/MACs agree with the built model and the published numbers."""

from __future__ import annotations

import pytest

from effdeploy.config import ModelConfig
from effdeploy.model.efficientnet import build_model
from effdeploy.model.profile import KINDS, profile_config

# torchvision efficientnet_b0..b7 parameter counts (1000 classes).
TORCHVISION_PARAMS = {
    "b0": 5288548,
    "b1": 7794184,
    "b2": 9109994,
    "b3": 12233232,
    "b4": 19341616,
    "b5": 30389784,
    "b6": 43040704,
    "b7": 66347960,
}
TIMM_LITE0_PARAMS = 4652008


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(TORCHVISION_PARAMS))
def test_family_params_match_torchvision(variant: str) -> None:
    expected = TORCHVISION_PARAMS[variant]
    assert numel(build_model(variant)) == expected
    assert profile_config(ModelConfig(variant=variant)).params == expected


def test_lite0_params_match_timm() -> None:
    assert numel(build_model("lite0")) == TIMM_LITE0_PARAMS
    assert profile_config(ModelConfig(variant="lite0")).params == TIMM_LITE0_PARAMS


@pytest.mark.parametrize("variant", ["b0", "b3"])
def test_se_placement_param_counts(variant: str) -> None:
    after = profile_config(ModelConfig(variant=variant, se_placement="after")).params
    before = profile_config(ModelConfig(variant=variant, se_placement="before")).params
    none = profile_config(ModelConfig(variant=variant, se_placement="none")).params
    assert after == TORCHVISION_PARAMS[variant]
    assert before == after
    assert none < after
    assert numel(build_model(variant, se_placement="before")) == after
    assert numel(build_model(variant, se_placement="none")) == none


PROFILE_CONFIGS = {
    "b0": {"variant": "b0"},
    "lite0": {"variant": "lite0"},
    "b2-se-before": {"variant": "b2", "se_placement": "before"},
    "b0-gn": {"variant": "b0", "norm": "gn"},
    "phi-1.5": {"phi": -1.5},
    "b0-hardswish": {"variant": "b0", "activation": "hardswish"},
    "custom-w0.5-r32-c10": {"variant": "b0", "width_mult": 0.5, "resolution": 32, "num_classes": 10},
    "lite2-se-after": {"variant": "lite2", "se_placement": "after"},
}


@pytest.mark.parametrize("fields", list(PROFILE_CONFIGS.values()), ids=list(PROFILE_CONFIGS))
def test_profile_params_equal_model_numel(fields: dict) -> None:
    cfg = ModelConfig(**fields)
    prof = profile_config(cfg)
    model = build_model(cfg)
    assert prof.params == numel(model)
    assert prof.resolution == cfg.resolution
    # per-block params add up to the block modules' own numel
    for bp in prof.blocks:
        assert bp.params == numel(model.blocks.get_submodule(bp.name)), bp.name


# The paper's Table 2 (rounded): parameters in millions, FLOPs (multiply-adds) in billions.
PAPER_MPARAMS = {"b0": 5.3, "b1": 7.8, "b2": 9.2, "b3": 12, "b4": 19, "b5": 30, "b6": 43, "b7": 66}
PAPER_GMACS = {"b0": 0.39, "b1": 0.70, "b2": 1.0, "b3": 1.8, "b4": 4.2, "b5": 9.9, "b6": 19, "b7": 37}


@pytest.mark.parametrize("variant", list(PAPER_MPARAMS))
def test_family_matches_paper_table(variant: str) -> None:
    prof = profile_config(ModelConfig(variant=variant))
    # measured: params within 2% of the rounded figures (B3 +1.9%); MACs within 5% (B4 +4.6%,
    # B5 +3.7%, the rest under 2.1%)
    assert prof.params == pytest.approx(PAPER_MPARAMS[variant] * 1e6, rel=0.03)
    assert prof.macs == pytest.approx(PAPER_GMACS[variant] * 1e9, rel=0.05)


def test_mbconv_block_counted_by_hand() -> None:
    """EfficientNet-B0's block2a at 224 px: 16 -> expand 96 -> 3x3 depthwise stride 2 -> SE 4 -> 24."""
    bp = next(b for b in profile_config(ModelConfig(variant="b0")).blocks if b.name == "block2a")
    assert (bp.in_size, bp.out_size) == (112, 56)
    expand = 16 * 96 + 2 * 96  # 1x1 conv, no bias + BN scale and shift
    depthwise = 96 * 3 * 3 + 2 * 96
    se = (96 * 4 + 4) + (4 * 96 + 96)  # reduce and expand 1x1 convs with bias
    project = 96 * 24 + 2 * 24
    assert bp.params == expand + depthwise + se + project == 6004
    # expand at the input size, depthwise and project at the strided output size, SE on 1x1
    assert bp.macs == 16 * 96 * 112 * 112 + 96 * 9 * 56 * 56 + (96 * 4 + 4 * 96) + 96 * 24 * 56 * 56 == 29203200
    # (depthwise 3x3 + pointwise 96 -> 24) / a standard 3x3 conv 96 -> 24, on the same output map
    assert bp.ds_ratio == pytest.approx((96 * 9 + 96 * 24) / (96 * 24 * 9), rel=1e-12)
    assert bp.ds_ratio == pytest.approx(11 / 72, rel=1e-12)


def test_macs_grow_with_resolution_and_family() -> None:
    m = [profile_config(ModelConfig(variant=f"b{i}")).macs for i in range(8)]
    assert m == sorted(m) and len(set(m)) == 8
    lo = profile_config(ModelConfig(variant="b0", resolution=112)).macs
    hi = profile_config(ModelConfig(variant="b0", resolution=224)).macs
    # every conv but the classifier scales with the pixel count
    assert 3.5 < hi / lo < 4.01


@pytest.mark.parametrize("variant", ["b0", "b4", "lite0"])
def test_ds_ratio_matches_formula(variant: str) -> None:
    prof = profile_config(ModelConfig(variant=variant))
    assert prof.blocks
    for bp in prof.blocks:
        # the MAC-counted ratio agrees with the closed form 1/C_out + 1/K^2
        assert abs(bp.ds_ratio - bp.ds_ratio_formula) <= 1e-12, bp.name
    # two blocks worked by hand: B0 block1a (3x3, 16 out) and block3a (5x5, 40 out)
    by_name = {bp.name: bp for bp in prof.blocks}
    if variant == "b0":
        assert by_name["block1a"].ds_ratio_formula == pytest.approx(25 / 144, rel=1e-12)  # 1/16 + 1/9
        assert by_name["block3a"].ds_ratio_formula == pytest.approx(13 / 200, rel=1e-12)  # 1/40 + 1/25


@pytest.mark.parametrize("fields", list(PROFILE_CONFIGS.values()), ids=list(PROFILE_CONFIGS))
def test_per_kind_sums_to_totals(fields: dict) -> None:
    prof = profile_config(ModelConfig(**fields))
    assert tuple(prof.per_kind) == KINDS
    assert set(prof.per_kind) == {"stem", "expand", "depthwise", "se", "project", "head", "classifier"}
    assert sum(v["params"] for v in prof.per_kind.values()) == prof.params
    assert sum(v["macs"] for v in prof.per_kind.values()) == prof.macs
    assert sum(b.params for b in prof.blocks) == sum(
        prof.per_kind[k]["params"] for k in ("expand", "depthwise", "se", "project")
    )
    for kind in ("stem", "expand", "depthwise", "project", "head", "classifier"):
        assert prof.per_kind[kind]["params"] > 0, kind
        assert prof.per_kind[kind]["macs"] > 0, kind


def test_se_kind_zero_without_se() -> None:
    none = profile_config(ModelConfig(variant="b0", se_placement="none"))
    after = profile_config(ModelConfig(variant="b0", se_placement="after"))
    assert none.per_kind["se"] == {"params": 0, "macs": 0}
    assert after.per_kind["se"]["params"] > 0
    assert after.params - none.params == after.per_kind["se"]["params"]
    for kind in ("stem", "expand", "depthwise", "project", "head", "classifier"):
        assert none.per_kind[kind] == after.per_kind[kind]


def test_block_sizes_follow_strides() -> None:
    prof = profile_config(ModelConfig(variant="b0"))
    size = 224 // 2
    for bp in prof.blocks:
        assert bp.in_size == size
        assert bp.out_size == -(-size // bp.stride)
        size = bp.out_size
    assert size == 224 // 32


def test_to_dict_is_json_ready() -> None:
    import json

    d = profile_config(ModelConfig(variant="b0")).to_dict()
    back = json.loads(json.dumps(d))
    assert back["params"] == TORCHVISION_PARAMS["b0"]
    assert len(back["blocks"]) == len(ModelConfig(variant="b0").arch().blocks)

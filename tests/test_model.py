"""model/blocks.py + model/efficientnet.py: forward/backward over the config space, SE placement,
padding, determinism."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from effdeploy.config import ModelConfig
from effdeploy.model.blocks import ConvNormAct, DropPath, tf_same_padding
from effdeploy.model.efficientnet import EfficientNet, build_model

PLACEMENTS = ("after", "before", "none")
ACTIVATIONS = ("silu", "relu6", "hardswish")
NORMS = ("bn", "gn")


def tiny(tiny_config: dict, **overrides) -> EfficientNet:
    return build_model({**tiny_config, **overrides})


@pytest.mark.parametrize(
    ("se_placement", "activation", "norm"), list(itertools.product(PLACEMENTS, ACTIVATIONS, NORMS))
)
def test_forward_backward_all_params_get_gradients(tiny_config, se_placement, activation, norm) -> None:
    model = tiny(
        tiny_config, se_placement=se_placement, activation=activation, norm=norm, drop_path_rate=0.0, dropout=0.0
    )
    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, tiny_config["num_classes"])
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([1, 7]))
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert names
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
    # the layer types follow the config
    acts = {type(m) for m in model.modules() if isinstance(m, (nn.SiLU, nn.ReLU6, nn.Hardswish))}
    assert acts == {{"silu": nn.SiLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}[activation]}
    norm_cls = nn.BatchNorm2d if norm == "bn" else nn.GroupNorm
    assert any(isinstance(m, norm_cls) for m in model.modules())
    assert not any(
        isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and not isinstance(m, norm_cls) for m in model.modules()
    )
    has_se = any(".se." in n for n in names)
    assert has_se == (se_placement != "none")


def test_gradients_are_nonzero_somewhere(tiny_config) -> None:
    model = tiny(tiny_config, drop_path_rate=0.0, dropout=0.0).train()
    out = model(torch.randn(2, 3, 32, 32))
    nn.functional.cross_entropy(out, torch.tensor([0, 3])).backward()
    for name in ("stem.conv.weight", "blocks.block1a.se.reduce.weight", "head.conv.weight", "classifier.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_se_before_and_after_differ_with_same_weights(tiny_config, randomize) -> None:
    after = randomize(tiny(tiny_config, se_placement="after")).eval()
    before = tiny(tiny_config, se_placement="before").eval()
    before.load_state_dict(after.state_dict(), strict=True)
    for (na, pa), (nb, pb) in zip(after.state_dict().items(), before.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ya, yb = after(x), before(x)
    assert not torch.allclose(ya, yb, atol=1e-4)


def test_se_before_gates_the_expanded_features(tiny_config) -> None:
    # "before" puts SE between expand and depthwise: its input has the expanded width and the
    # pre-stride spatial size
    model = tiny(tiny_config, se_placement="before").eval()
    block = model.blocks.block2a  # stride 2, expand 6
    seen: dict[str, torch.Size] = {}

    def record(key: str):
        def hook(module, inputs, output) -> None:
            seen[key] = inputs[0].shape

        return hook

    block.se.register_forward_hook(record("se"))
    block.dwconv.register_forward_hook(record("dw"))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert seen["se"] == seen["dw"]
    assert seen["se"][1] == block.spec.expand_channels


def test_se_none_has_no_se_parameters(tiny_config) -> None:
    model = tiny(tiny_config, se_placement="none")
    assert not [n for n, _ in model.named_parameters() if ".se." in n]
    with_se = tiny(tiny_config, se_placement="after")
    assert [n for n, _ in with_se.named_parameters() if ".se." in n]


def test_parameter_names_are_readable(tiny_config) -> None:
    names = set(dict(tiny(tiny_config).named_parameters()))
    for name in (
        "stem.conv.weight",
        "stem.norm.weight",
        "blocks.block1a.dwconv.conv.weight",
        "blocks.block1a.se.reduce.weight",
        "blocks.block1a.se.expand.bias",
        "blocks.block2a.expand.conv.weight",
        "blocks.block2a.project.norm.bias",
        "head.conv.weight",
        "classifier.weight",
    ):
        assert name in names, name
    assert "blocks.block1a.expand.conv.weight" not in names  # expand ratio 1: no expand conv


def test_tf_same_padding_values() -> None:
    assert tf_same_padding(224, 3, 2) == (0, 1)
    assert tf_same_padding(225, 3, 2) == (1, 1)
    assert tf_same_padding(112, 5, 2) == (1, 2)
    assert tf_same_padding(56, 3, 1) == (1, 1)
    for size in range(7, 40):
        for k in (3, 5):
            for s in (1, 2):
                lo, hi = tf_same_padding(size, k, s)
                assert 0 <= hi - lo <= 1
                out = (size + lo + hi - k) // s + 1
                assert out == -(-size // s)  # TF SAME: ceil(size / stride)


def test_same_padding_conv_shapes() -> None:
    conv = ConvNormAct(3, 8, 3, stride=2, activation=None, same_padding=True)
    assert conv.tf_same
    assert conv(torch.randn(1, 3, 224, 224)).shape[-2:] == (112, 112)
    assert conv(torch.randn(1, 3, 225, 225)).shape[-2:] == (113, 113)
    assert not ConvNormAct(3, 8, 3, stride=1, activation=None, same_padding=True).tf_same


def test_same_vs_symmetric_padding(tiny_config, randomize) -> None:
    same = randomize(tiny(tiny_config, padding="same")).eval()
    sym = tiny(tiny_config, padding="symmetric").eval()
    sym.load_state_dict(same.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)  # even: stride-2 convs pad (0, 1) vs (1, 1)
    with torch.no_grad():
        a, b = same(x), sym(x)
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)


def test_same_vs_symmetric_stride1_conv_identical() -> None:
    # stride-1 convs with odd kernels are symmetric either way
    a = ConvNormAct(4, 4, 3, stride=1, activation=None, same_padding=True).eval()
    b = ConvNormAct(4, 4, 3, stride=1, activation=None, same_padding=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_eval_is_deterministic(tiny_config) -> None:
    model = tiny(tiny_config, drop_path_rate=0.5, dropout=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert torch.equal(y1, y2)


def test_train_mode_is_stochastic(tiny_config) -> None:
    # the counterpart of the eval test: with dropout / drop path, train-mode outputs vary
    model = tiny(tiny_config, drop_path_rate=0.5, dropout=0.5).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert not torch.equal(y1, y2)


def test_drop_path_identity_in_eval() -> None:
    dp = DropPath(0.9).eval()
    x = torch.randn(8, 4, 3, 3)
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    per_sample = y.flatten(1)
    kept = [torch.allclose(per_sample[i], x[i].flatten() / 0.1) for i in range(8)]
    dropped = [bool((per_sample[i] == 0).all()) for i in range(8)]
    assert all(k or d for k, d in zip(kept, dropped, strict=True))
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_only_on_residual_blocks(tiny_config) -> None:
    model = tiny(tiny_config, drop_path_rate=0.3)
    for name, block in model.blocks.named_children():
        assert isinstance(block.drop_path, DropPath) == block.spec.has_residual, name
        if isinstance(block.drop_path, DropPath):
            assert block.drop_path.p == block.spec.drop_path


def test_output_changes_with_num_classes_and_resolution(tiny_config) -> None:
    model = tiny(tiny_config, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)  # any size works (global pool)
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)


def test_build_model_accepts_name_dict_and_config(tiny_config) -> None:
    cfg = ModelConfig(**tiny_config)
    a = build_model(cfg)
    b = build_model(tiny_config)
    assert a.config == b.config == cfg
    assert build_model("lite0").config.variant == "lite0"
    c = build_model(tiny_config, se_placement="none")
    assert c.config.se_placement == "none"
    # a dict override re-derives from the variant: overriding the variant changes the widths
    d = build_model("b0", variant="b2")
    assert d.config.width_mult == ModelConfig(variant="b2").width_mult


def test_gn_uses_valid_group_count(tiny_config) -> None:
    model = tiny(tiny_config, norm="gn", gn_groups=8)
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns
    for gn in gns:
        assert gn.num_channels % gn.num_groups == 0
        assert gn.num_groups <= 8

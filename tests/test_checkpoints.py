"""model/checkpoints.py: own safetensors format, error messages, and the public-layout importers."""

from __future__ import annotations

import json
import random
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from effdeploy.config import ModelConfig
from effdeploy.errors import EffdeployError
from effdeploy.model.checkpoints import (
    FORMAT_TAG,
    checkpoint_config,
    detect_layout,
    import_weights,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from effdeploy.model.efficientnet import EfficientNet, build_model

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _outputs(model: EfficientNet, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _input(model: EfficientNet, n: int = 2) -> torch.Tensor:
    r = model.config.resolution
    return torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(123))


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    assert "Traceback" not in msg
    return msg


@pytest.fixture
def tiny_model(tiny_config, randomize) -> EfficientNet:
    return randomize(build_model(tiny_config)).eval()


# --------------------------------------------------------------------------- own format


def test_round_trip_is_bit_identical(tiny_model, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    assert path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config
    assert checkpoint_config(path) == tiny_model.config
    for (k1, v1), (k2, v2) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k1 == k2
        assert v1.dtype == v2.dtype and torch.equal(v1, v2), k1
    x = _input(tiny_model)
    assert torch.equal(_outputs(tiny_model, x), _outputs(loaded, x))
    meta = read_metadata(path)
    assert meta["format"] == FORMAT_TAG
    assert ModelConfig.model_validate_json(meta["config"]) == tiny_model.config


def test_fresh_model_differs(tiny_model, tiny_config) -> None:
    # guards the round-trip tests: an unloaded model of the same config gives other outputs
    x = _input(tiny_model)
    assert not torch.allclose(_outputs(tiny_model, x), _outputs(build_model(tiny_config), x))


def test_fp16_checkpoint_is_close_and_smaller(tiny_model, tmp_path: Path) -> None:
    p32 = save_checkpoint(tiny_model, tmp_path / "m32.safetensors")
    p16 = save_checkpoint(tiny_model, tmp_path / "m16.safetensors", fp16=True)
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    loaded = load_checkpoint(p16)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values() if t.is_floating_point())
    x = _input(tiny_model)
    ref, out = _outputs(tiny_model, x), _outputs(loaded, x)
    assert not torch.equal(ref, out)  # fp16 rounding did happen
    assert (ref - out).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize(
    "fields",
    [
        {"se_placement": "before", "activation": "hardswish"},
        {"variant": "lite0", "norm": "gn", "padding": "same"},
        {"se_placement": "none", "num_classes": 7, "resolution": 40},
    ],
    ids=["before-hardswish", "lite0-gn-same", "none-7cls"],
)
def test_load_rebuilds_from_file_alone(tiny_config, randomize, tmp_path: Path, fields: dict) -> None:
    model = randomize(build_model({**tiny_config, **fields})).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    for key, value in fields.items():
        assert getattr(loaded.config, key) == value
    x = _input(model)
    assert torch.equal(_outputs(model, x), _outputs(loaded, x))


def test_config_overrides(tiny_model, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path, config_overrides={"dropout": 0.0})
    assert loaded.config.dropout == 0.0
    assert tiny_model.config.dropout != 0.0


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.safetensors"
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert str(path) in _one_line(err)


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert str(path) in _one_line(err)


def test_truncated_file(tiny_model, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert str(path) in _one_line(err)


def test_safetensors_without_config(tiny_model, tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    assert str(path) in msg and "config" in msg


def _save_raw(model: EfficientNet, state: dict, path: Path) -> Path:
    meta = {"format": FORMAT_TAG, "config": model.config.model_dump_json()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    return path


def test_missing_key(tiny_model, tmp_path: Path) -> None:
    state = dict(tiny_model.state_dict())
    key = "blocks.block2a.dwconv.conv.weight"
    del state[key]
    path = _save_raw(tiny_model, state, tmp_path / "m.safetensors")
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert key in _one_line(err)


def test_unexpected_key(tiny_model, tmp_path: Path) -> None:
    state = dict(tiny_model.state_dict())
    state["blocks.block9z.conv.weight"] = torch.zeros(1)
    path = _save_raw(tiny_model, state, tmp_path / "m.safetensors")
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert "blocks.block9z.conv.weight" in _one_line(err)


def test_wrong_shape(tiny_model, tmp_path: Path) -> None:
    state = dict(tiny_model.state_dict())
    key = "classifier.weight"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    path = _save_raw(tiny_model, state, tmp_path / "m.safetensors")
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    assert key in msg
    assert str(tuple(state[key].shape)) in msg


# --------------------------------------------------------------------------- public layouts
#
# Each helper lists (our key, their key) pairs in the *source library's* module order, built from
# the resolved ArchSpec independently of our own state-dict order. A saved file is then built in
# that order with the source model's tensors, as the real library would write it.


def _cna(ours: str, theirs_conv: str, theirs_norm: str) -> list[tuple[str, str]]:
    return [(f"{ours}.conv.weight", f"{theirs_conv}.weight")] + [(f"{ours}.norm.{s}", f"{theirs_norm}.{s}") for s in BN]


def torchvision_names(model: EfficientNet) -> list[tuple[str, str]]:
    arch = model.arch
    pairs = _cna("stem", "features.0.0", "features.0.1")
    index_in_stage: dict[int, int] = {}
    for spec in arch.blocks:
        i = index_in_stage.get(spec.stage, 0)
        index_in_stage[spec.stage] = i + 1
        base, ours, j = f"features.{spec.stage}.{i}.block", f"blocks.{spec.name}", 0
        if spec.has_expand:
            pairs += _cna(f"{ours}.expand", f"{base}.{j}.0", f"{base}.{j}.1")
            j += 1
        pairs += _cna(f"{ours}.dwconv", f"{base}.{j}.0", f"{base}.{j}.1")
        j += 1
        if spec.se_channels:
            for our_fc, their_fc in (("reduce", "fc1"), ("expand", "fc2")):
                pairs += [(f"{ours}.se.{our_fc}.{s}", f"{base}.{j}.{their_fc}.{s}") for s in ("weight", "bias")]
            j += 1
        pairs += _cna(f"{ours}.project", f"{base}.{j}.0", f"{base}.{j}.1")
    head = len(index_in_stage) + 1
    pairs += _cna("head", f"features.{head}.0", f"features.{head}.1")
    pairs += [("classifier.weight", "classifier.1.weight"), ("classifier.bias", "classifier.1.bias")]
    return pairs


def timm_names(model: EfficientNet) -> list[tuple[str, str]]:
    pairs = _cna("stem", "conv_stem", "bn1")
    index_in_stage: dict[int, int] = {}
    for spec in model.arch.blocks:
        i = index_in_stage.get(spec.stage, 0)
        index_in_stage[spec.stage] = i + 1
        base, ours = f"blocks.{spec.stage - 1}.{i}", f"blocks.{spec.name}"
        se = []
        if spec.se_channels:
            for our_fc, their_fc in (("reduce", "conv_reduce"), ("expand", "conv_expand")):
                se += [(f"{ours}.se.{our_fc}.{s}", f"{base}.se.{their_fc}.{s}") for s in ("weight", "bias")]
        if spec.has_expand:  # InvertedResidual
            pairs += _cna(f"{ours}.expand", f"{base}.conv_pw", f"{base}.bn1")
            pairs += _cna(f"{ours}.dwconv", f"{base}.conv_dw", f"{base}.bn2")
            pairs += se
            pairs += _cna(f"{ours}.project", f"{base}.conv_pwl", f"{base}.bn3")
        else:  # DepthwiseSeparableConv
            pairs += _cna(f"{ours}.dwconv", f"{base}.conv_dw", f"{base}.bn1")
            pairs += se
            pairs += _cna(f"{ours}.project", f"{base}.conv_pw", f"{base}.bn2")
    pairs += _cna("head", "conv_head", "bn2")
    pairs += [("classifier.weight", "classifier.weight"), ("classifier.bias", "classifier.bias")]
    return pairs


def efficientnet_pytorch_names(model: EfficientNet) -> list[tuple[str, str]]:
    pairs = _cna("stem", "_conv_stem", "_bn0")
    for k, spec in enumerate(model.arch.blocks):
        base, ours = f"_blocks.{k}", f"blocks.{spec.name}"
        if spec.has_expand:
            pairs += _cna(f"{ours}.expand", f"{base}._expand_conv", f"{base}._bn0")
        pairs += _cna(f"{ours}.dwconv", f"{base}._depthwise_conv", f"{base}._bn1")
        if spec.se_channels:
            for our_fc, their_fc in (("reduce", "_se_reduce"), ("expand", "_se_expand")):
                pairs += [(f"{ours}.se.{our_fc}.{s}", f"{base}.{their_fc}.{s}") for s in ("weight", "bias")]
        pairs += _cna(f"{ours}.project", f"{base}._project_conv", f"{base}._bn2")
    pairs += _cna("head", "_conv_head", "_bn1")
    pairs += [("classifier.weight", "_fc.weight"), ("classifier.bias", "_fc.bias")]
    return pairs


LAYOUT_NAMES = {
    "torchvision": torchvision_names,
    "timm": timm_names,
    "efficientnet_pytorch": efficientnet_pytorch_names,
}


def to_layout(model: EfficientNet, layout: str) -> OrderedDict[str, torch.Tensor]:
    """``model``'s tensors under a public library's key names, in that library's order."""
    ours = model.state_dict()
    # GroupNorm has no running statistics: keep only the tensors this model has
    pairs = [(o, t) for o, t in LAYOUT_NAMES[layout](model) if o in ours]
    assert sorted(o for o, _ in pairs) == sorted(ours), "helper does not cover the model's state dict"
    assert len({t for _, t in pairs}) == len(pairs)
    return OrderedDict((theirs, ours[o].clone()) for o, theirs in pairs)


IMPORT_CASES = {
    "torchvision-tiny": ("torchvision", {}),
    "torchvision-b0": ("torchvision", {"variant": "b0", "width_mult": 1.0, "depth_mult": 1.0, "resolution": 64}),
    "torchvision-b1-stage1x2": ("torchvision", {"variant": "b1", "width_mult": 0.25, "depth_mult": 1.1}),
    "timm-tiny": ("timm", {}),
    "timm-b1-stage1x2": ("timm", {"variant": "b1", "width_mult": 0.25, "depth_mult": 1.1}),
    "timm-lite-tiny": ("timm", {"variant": "lite0"}),
    "efficientnet_pytorch-tiny": ("efficientnet_pytorch", {}),
    "torchvision-gn-se-before": ("torchvision", {"norm": "gn", "se_placement": "before"}),
}


@pytest.mark.parametrize(("layout", "fields"), list(IMPORT_CASES.values()), ids=list(IMPORT_CASES))
def test_import_public_layout_reproduces_outputs(tiny_config, randomize, tmp_path: Path, layout, fields) -> None:
    config = {**tiny_config, **fields}
    source = randomize(build_model(config), seed=7).eval()
    state = to_layout(source, layout)
    assert detect_layout(state) == layout
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    x = _input(source)
    ref = _outputs(source, x)
    assert not torch.allclose(ref, _outputs(build_model(config), x))  # a fresh model is different
    imported = import_weights(path, config)
    assert imported is not source
    assert torch.equal(_outputs(imported, x), ref)
    for key, value in source.state_dict().items():
        assert torch.equal(imported.state_dict()[key], value), key


def test_import_accepts_wrapped_and_prefixed_state_dicts(tiny_config, randomize, tmp_path: Path) -> None:
    source = randomize(build_model(tiny_config)).eval()
    state = to_layout(source, "timm")
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items())}, path)
    x = _input(source)
    assert torch.equal(_outputs(import_weights(path, tiny_config), x), _outputs(source, x))


def test_import_own_layout(tiny_config, randomize, tmp_path: Path) -> None:
    source = randomize(build_model(tiny_config)).eval()
    x = _input(source)
    pth = tmp_path / "own.pth"
    torch.save(source.state_dict(), pth)
    assert torch.equal(_outputs(import_weights(pth, tiny_config), x), _outputs(source, x))
    st = tmp_path / "own.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st))
    assert torch.equal(_outputs(import_weights(st, tiny_config), x), _outputs(source, x))


@pytest.mark.parametrize("layout", ["torchvision", "timm"])
def test_import_public_layout_from_safetensors(tiny_config, randomize, tmp_path: Path, layout: str) -> None:
    # timm publishes its weights as model.safetensors. safetensors stores tensors sorted by name,
    # so the file's key order is not the library's module order that the positional mapping needs.
    source = randomize(build_model(tiny_config)).eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in to_layout(source, layout).items()}, str(path))
    x = _input(source)
    assert torch.equal(_outputs(import_weights(path, tiny_config), x), _outputs(source, x))


class NotATensor:
    def __init__(self) -> None:
        self.payload = "executable pickle content"


def test_pickle_with_python_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "extra": NotATensor()}, path)
    with pytest.raises(EffdeployError) as err:
        import_weights(path, "b0")
    msg = _one_line(err)
    assert str(path) in msg


def test_non_tensor_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "epoch": 3}, path)
    with pytest.raises(EffdeployError) as err:
        import_weights(path, "b0")
    assert str(path) in _one_line(err)


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "none.pth"
    with pytest.raises(EffdeployError) as err:
        import_weights(path, "b0")
    assert str(path) in _one_line(err)


def test_unrecognised_layout(tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    torch.save({"encoder.layer1.weight": torch.zeros(3)}, path)
    with pytest.raises(EffdeployError) as err:
        import_weights(path, "b0")
    msg = _one_line(err)
    assert str(path) in msg and "layout" in msg


def test_b0_weights_into_b1_config_fail_naming_key_and_shapes(randomize, tmp_path: Path) -> None:
    b0 = build_model("b0")
    path = tmp_path / "b0_torchvision.pth"
    torch.save(to_layout(b0, "torchvision"), path)
    with pytest.raises(EffdeployError) as err:
        import_weights(path, "b1")
    msg = _one_line(err)
    m = re.search(r"'([\w.]+)' has shape (\([\d, ]+\)) but '([\w.]+)' needs (\([\d, ]+\))", msg)
    assert m, msg
    their_key, their_shape, our_key, our_shape = m.groups()
    assert their_key.startswith("features.")
    assert our_key.startswith("blocks.")
    assert their_shape != our_shape


def test_import_truncated_and_extended_files(tiny_config, tmp_path: Path) -> None:
    source = build_model(tiny_config)
    state = to_layout(source, "torchvision")
    short = OrderedDict(list(state.items())[:-1])  # classifier bias missing
    torch.save(short, tmp_path / "short.pth")
    with pytest.raises(EffdeployError) as err:
        import_weights(tmp_path / "short.pth", tiny_config)
    assert "classifier.bias" in _one_line(err)
    long = OrderedDict(state)
    long["classifier.2.weight"] = torch.zeros(3)
    torch.save(long, tmp_path / "long.pth")
    with pytest.raises(EffdeployError) as err:
        import_weights(tmp_path / "long.pth", tiny_config)
    assert "classifier.2.weight" in _one_line(err)


def test_saved_config_json_is_complete(tiny_model, tmp_path: Path) -> None:
    path = save_checkpoint(tiny_model, tmp_path / "m.safetensors")
    cfg = json.loads(read_metadata(path)["config"])
    # a fully concrete config: scaling fields written out, not left to the variant
    for key in ("width_mult", "depth_mult", "resolution", "se_placement", "activation", "preprocess"):
        assert key in cfg
    assert cfg["width_mult"] == tiny_model.config.width_mult

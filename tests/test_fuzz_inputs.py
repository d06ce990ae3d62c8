"""Property tests: whatever bytes or structures reach the loaders, the result is a loaded object or
one EffdeployError, never another exception (a traceback is a bug, whatever the input).

Hypothesis draws random bytes for every binary loader (checkpoints, pickled weights, training
states, calibration sets), random JSON for a checkpoint's embedded config, and random YAML-able
structures (with the real field names, so that the draws get past the first level) for configs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from effdeploy.config import (
    AugmentConfig,
    DataConfig,
    ExportConfig,
    ModelConfig,
    PreprocessConfig,
    QuantConfig,
    ReorderConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
    parse,
)
from effdeploy.data.calibration import load_calibration_set
from effdeploy.errors import EffdeployError
from effdeploy.model.checkpoints import FORMAT_TAG, load_checkpoint, load_pickle_weights_only, read_state_dict
from effdeploy.model.profile import profile_config

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["b0", "lite0", "after", "before", "w8a8", "onnx", "1e400", "nan", "-inf", ".inf"])
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "reorder": ReorderConfig,
    "export": ExportConfig,
    "quant": QuantConfig,
}
NESTED = {"preprocess": PreprocessConfig, "augment": AugmentConfig}
STAGE_KEYS = ["expand", "kernel", "stride", "repeats", "channels"]


def _section(model_cls) -> st.SearchStrategy:
    """A mapping with some of ``model_cls``'s real field names (and now and then a stray one)."""
    keys = st.sampled_from([*model_cls.model_fields, "not_a_field"])

    def value_for(key: str) -> st.SearchStrategy:
        if key in NESTED:
            return _section(NESTED[key]) | json_values
        if key == "stages":
            stage = st.dictionaries(st.sampled_from(STAGE_KEYS), st.integers(-3, 2000) | json_values, max_size=5)
            return st.lists(stage, max_size=3) | json_values
        return json_values

    return st.lists(keys.flatmap(lambda k: st.tuples(st.just(k), value_for(k))), max_size=5).map(dict)


run_configs = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "checkpoint": json_values,
        **{name: _section(cls) | json_values for name, cls in SECTIONS.items()},
    },
)


def _ok_or_clean_error(fn, *args) -> object | None:
    try:
        return fn(*args)
    except EffdeployError as err:
        assert str(err).strip(), "an error must say something"
        return None


@FUZZ
@given(data=run_configs)
@example(data={"model": {"phi": 100}})
@example(data={"model": {"phi": float("inf")}})
@example(data={"model": {"phi": [1]}})
@example(data={"model": {"preprocess": 5}})
@example(
    data={
        "model": {"depth_mult": 64, "stages": [{"expand": 1, "kernel": 3, "stride": 1, "repeats": 64, "channels": 8}]}
    }
)
@example(data={"quant": {"overrides": [{"pattern": "(" * 300}]}})
@example(data={"quant": {"by_precision": {"w4a8": {"observer": 5}}}})
def test_any_run_config_structure_parses_or_is_one_clean_error(data: dict) -> None:
    run = _ok_or_clean_error(parse, RunConfig, data, "fuzz.yaml")
    if run is not None:
        # a config that validates is describable: the analytic profile never trips on it
        prof = profile_config(run.model)
        assert prof.params > 0 and math.isfinite(run.model.width_mult)


@FUZZ
@given(data=run_configs)
def test_any_yaml_config_file_loads_or_is_one_clean_error(tmp_path: Path, data: dict) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    _ok_or_clean_error(load_run_config, path)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@example(raw=b"[" * 5000)
@example(raw=b"\xff\xfe\x00 not utf-8")
@example(raw=b"model: !!python/object/apply:os.system ['true']")
def test_any_config_bytes_load_or_are_one_clean_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    _ok_or_clean_error(load_run_config, path)


@FUZZ
@given(raw=st.binary(max_size=400))
@example(raw=b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
@example(raw=(2**62).to_bytes(8, "little") + b"{}")
def test_random_bytes_load_or_are_one_clean_error(tmp_path: Path, raw: bytes) -> None:
    # (a few bytes can be a valid file: b"N." is a pickled None, 8 length bytes + "{}" an empty
    # safetensors file; what must never happen is an exception other than EffdeployError)
    for name, loader in (
        ("model.safetensors", load_checkpoint),
        ("weights.safetensors", read_state_dict),
        ("weights.pt", read_state_dict),
        ("train_state.pt", load_pickle_weights_only),
        ("calibration.safetensors", load_calibration_set),
    ):
        path = tmp_path / name
        path.write_bytes(raw)
        _ok_or_clean_error(loader, path)


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    from effdeploy.model.efficientnet import EfficientNet

    cfg = ModelConfig(variant="b0", width_mult=0.25, depth_mult=0.5, resolution=32, num_classes=10)
    return {k: v.contiguous() for k, v in EfficientNet(cfg).state_dict().items()}


@settings(FUZZ, max_examples=60)  # each valid draw builds a model
@given(config=json_values | run_configs.map(lambda d: d.get("model", d)))
@example(config=[1, 2])
@example(config="b0")
@example(config={"variant": "b0", "phi": 16})
def test_any_embedded_config_loads_or_is_one_clean_error(tmp_path: Path, tiny_state, config) -> None:
    path = tmp_path / "model.safetensors"
    text = json.dumps(config, allow_nan=True)
    save_file(tiny_state, str(path), metadata={"format": FORMAT_TAG, "config": text})
    _ok_or_clean_error(load_checkpoint, path)


def test_embedded_config_that_is_not_an_object_names_the_file(tmp_path: Path, tiny_state) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tiny_state, str(path), metadata={"format": FORMAT_TAG, "config": "[1, 2]"})
    with pytest.raises(EffdeployError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "not a JSON object" in str(err.value)

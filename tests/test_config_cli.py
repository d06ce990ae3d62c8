"""config.py (validation, one-line errors, YAML loading) and the `effdeploy` CLI as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cli
from pydantic import ValidationError

from effdeploy.config import ModelConfig, PreprocessConfig, load_yaml, parse
from effdeploy.errors import EffdeployError
from effdeploy.model.arch import FAMILY
from effdeploy.model.profile import profile_config

B3_PARAMS = 12233232  # torchvision efficientnet_b3
B0_PARAMS = 5288548  # torchvision efficientnet_b0


# --------------------------------------------------------------------------- config


def test_unknown_variant_names_field() -> None:
    with pytest.raises(ValidationError) as err:
        ModelConfig(variant="b9")
    assert "variant" in str(err.value)
    assert "b9" in str(err.value)


def test_unknown_se_placement_names_field() -> None:
    with pytest.raises(ValidationError) as err:
        ModelConfig(se_placement="middle")
    assert any(e["loc"] == ("se_placement",) for e in err.value.errors())


def test_parse_turns_validation_error_into_one_line() -> None:
    with pytest.raises(EffdeployError) as err:
        parse(ModelConfig, {"variant": "b0", "se_placement": "middle", "norm": "ln"}, "my.yaml")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("my.yaml")
    assert "se_placement" in msg and "norm" in msg  # every bad field is named
    with pytest.raises(EffdeployError) as err:
        parse(ModelConfig, {"variant": "b9"}, "src")
    assert "\n" not in str(err.value) and "variant" in str(err.value)


def test_parse_returns_model_on_success() -> None:
    cfg = parse(ModelConfig, {"variant": "B2"}, "src")
    assert isinstance(cfg, ModelConfig)
    assert cfg.variant == "b2"  # variant names are case-insensitive
    assert cfg.width_mult == FAMILY["b2"].width
    assert cfg.resolution == FAMILY["b2"].resolution == cfg.preprocess.resolution


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(EffdeployError) as err:
        parse(ModelConfig, {"variant": "b0", "se_placment": "before"}, "cfg")
    assert "se_placment" in str(err.value)


def test_explicit_fields_override_variant() -> None:
    cfg = ModelConfig(variant="b3", resolution=256, se_placement="none")
    assert cfg.resolution == 256 and cfg.preprocess.resolution == 256
    assert cfg.se_placement == "none"
    assert cfg.width_mult == FAMILY["b3"].width


def test_phi_overrides_variant_scaling() -> None:
    cfg = ModelConfig(variant="b3", phi=0)
    assert (cfg.width_mult, cfg.depth_mult, cfg.resolution) == (1.0, 1.0, 224)


def test_preprocess_resolution_must_match() -> None:
    with pytest.raises(EffdeployError) as err:
        parse(ModelConfig, {"resolution": 224, "preprocess": {"resolution": 200}}, "cfg")
    assert "resolution" in str(err.value) and "\n" not in str(err.value)


def test_config_is_frozen_and_round_trips_json() -> None:
    cfg = ModelConfig(variant="lite1", norm="gn")
    with pytest.raises(ValidationError):
        cfg.variant = "b0"
    again = ModelConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg
    assert again.arch() == cfg.arch()
    assert isinstance(cfg.preprocess, PreprocessConfig)


@pytest.mark.parametrize(
    "fields",
    [{"width_mult": 0}, {"dropout": 1.0}, {"num_classes": 0}, {"resolution": 4}, {"activation": "gelu"}],
)
def test_out_of_range_values_rejected(fields: dict) -> None:
    with pytest.raises(EffdeployError) as err:
        parse(ModelConfig, fields, "cfg")
    assert next(iter(fields)) in str(err.value)


def test_load_yaml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(EffdeployError) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_yaml_invalid(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  variant: b0\n   se_placement: [before\n")
    with pytest.raises(EffdeployError) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_yaml_non_mapping_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(EffdeployError) as err:
        load_yaml(path)
    assert str(path) in str(err.value)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  variant: b1\n")
    assert load_yaml(good) == {"model": {"variant": "b1"}}


# --------------------------------------------------------------------------- CLI


def test_cli_help(repo_root: Path) -> None:
    proc = run_cli("--help", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    listed = {line.strip("│|+ ").split(" ", 1)[0] for line in proc.stdout.splitlines()}
    for verb in ("profile", "train", "reorder", "export", "quantize", "bench", "compare"):
        assert verb in listed, f"{verb} not listed as a command:\n{proc.stdout}"


def test_cli_profile_json_b3(repo_root: Path) -> None:
    proc = run_cli("profile", "--model", "b3", "--json", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip()
    assert len(out.splitlines()) == 1
    data = json.loads(out)
    assert isinstance(data, dict)
    assert {"params", "macs", "resolution", "per_kind"} <= set(data)
    assert data["params"] == B3_PARAMS
    assert data["resolution"] == FAMILY["b3"].resolution
    assert data["macs"] == profile_config(ModelConfig(variant="b3")).macs
    assert sum(v["params"] for v in data["per_kind"].values()) == data["params"]


def test_cli_profile_se_none_has_fewer_params(repo_root: Path) -> None:
    proc = run_cli("profile", "--model", "b0", "--se-placement", "none", "--json", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["params"] < B0_PARAMS
    assert data["se_placement"] == "none"
    assert data["per_kind"]["se"]["params"] == 0


def test_cli_profile_unknown_model(repo_root: Path) -> None:
    proc = run_cli("profile", "--model", "b42", cwd=repo_root)
    line = assert_one_line_error(proc)
    assert "b42" in line
    assert proc.stdout == ""


def test_cli_profile_config_file(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "good.yaml"
    cfg.write_text("model:\n  variant: b0\n  se_placement: before\n")
    proc = run_cli("profile", "--config", str(cfg), "--json", cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["se_placement"] == "before"
    assert data["variant"] == "b0"
    assert data["params"] == B0_PARAMS  # same parameter shapes as "after"


def test_cli_profile_config_typo(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model:\n  variant: b0\n  se_placment: before\n")
    proc = run_cli("profile", "--config", str(cfg), "--json", cwd=repo_root)
    line = assert_one_line_error(proc)
    assert "se_placment" in line
    assert str(cfg) in line


def test_cli_profile_missing_config(repo_root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "absent.yaml"
    proc = run_cli("profile", "--config", str(cfg), cwd=repo_root)
    line = assert_one_line_error(proc)
    assert str(cfg) in line


def test_cli_bench_bad_backend_is_one_line_error(repo_root: Path) -> None:
    proc = run_cli("bench", "--backend", "tpu9", cwd=repo_root)
    line = assert_one_line_error(proc)
    assert "--backend: unknown 'tpu9'" in line

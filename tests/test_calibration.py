"""Calibration sets: deterministic stratified builds (`effdeploy calib build`), provenance
(`effdeploy calib info`), one-line errors, and the shipped default set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

from effdeploy.config import DEFAULT_CALIBRATION, PreprocessConfig, load_run_config
from effdeploy.data.calibration import (
    build_calibration_set,
    load_calibration_set,
    save_calibration_set,
)
from effdeploy.errors import EffdeployError

AFTER_CONFIG = "configs/cifar10_b0w05_after.yaml"
CIFAR_TRAIN_REL = "../shared/data/cifar10/train"
CLASSES = {"ant": 8, "bee": 7, "cow": 9}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFFDEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 classes of 7-9 random-colour 32x32 JPEGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for name, n in CLASSES.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.jpg")
    return root


def _pre(repo_root: Path) -> PreprocessConfig:
    return load_run_config(repo_root / AFTER_CONFIG).model.preprocess


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- CLI build / info


def test_calib_build_is_deterministic_and_info(folder: Path, tmp_path: Path, repo_root: Path) -> None:
    config = str(repo_root / AFTER_CONFIG)
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / f"{name}.safetensors"
        proc = run_cli(
            "calib",
            "build",
            "--data",
            str(folder),
            "--out",
            str(out),
            "--n",
            "12",
            "--seed",
            str(seed),
            "--config",
            config,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        assert str(out) in proc.stdout
        outs[name] = out.read_bytes()
    assert outs["a"] == outs["b"]  # same seed: byte-identical
    assert outs["a"] != outs["c"]  # another seed: another sample

    proc = run_cli("calib", "info", str(tmp_path / "a.safetensors"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["n"] == 12 and info["images"] == 12
    assert info["seed"] == 0
    assert info["source"] == folder.as_posix()
    assert "sha256" in json.dumps(info)
    assert len(info["source_list_sha256"]) == 64 and len(info["sample_list_sha256"]) == 64
    assert info["shape"] == [12, 32, 32, 3]
    assert info["class_counts"] == {"ant": 4, "bee": 4, "cow": 4}  # stratified
    assert "files" not in info
    assert info["preprocess"]["resolution"] == 32

    cal = load_calibration_set(tmp_path / "a.safetensors")
    counts = np.bincount(cal.labels, minlength=3)
    assert counts.tolist() == [4, 4, 4]
    assert len(set(cal.provenance["files"])) == 12
    assert sorted(cal.provenance["files"]) == cal.provenance["files"]
    other = load_calibration_set(tmp_path / "c.safetensors")
    assert other.provenance["files"] != cal.provenance["files"]
    assert other.provenance["seed"] == 1


def test_calib_info_missing_file_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("calib", "info", str(tmp_path / "nope.safetensors"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("effdeploy: error:"), proc.stderr
    assert "nope.safetensors" in lines[0]


def test_build_uneven_n_is_balanced(folder: Path, repo_root: Path) -> None:
    cal = build_calibration_set(folder, 10, 3, _pre(repo_root))
    counts = np.bincount(cal.labels, minlength=3)
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1
    assert cal.provenance["class_counts"] == dict(zip(CLASSES, counts.tolist(), strict=True))
    again = build_calibration_set(folder, 10, 3, _pre(repo_root))
    np.testing.assert_array_equal(cal.pixels, again.pixels)
    np.testing.assert_array_equal(cal.labels, again.labels)


def test_build_rejects_bad_n(folder: Path, repo_root: Path) -> None:
    for n in (0, 25):
        with pytest.raises(EffdeployError) as err:
            build_calibration_set(folder, n, 0, _pre(repo_root))
        _one_line(err)


# --------------------------------------------------------------------------- load errors


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EffdeployError) as err:
        load_calibration_set(tmp_path / "missing.safetensors")
    assert str(tmp_path / "missing.safetensors") in _one_line(err)


def test_load_rejects_other_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"pixels": np.zeros((2, 8, 8, 3), np.uint8), "labels": np.zeros(2, np.int64)}, str(path))
    with pytest.raises(EffdeployError) as err:
        load_calibration_set(path)
    msg = _one_line(err)
    assert str(path) in msg and "calibration" in msg


def test_load_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01not safetensors at all" * 10)
    with pytest.raises(EffdeployError) as err:
        load_calibration_set(path)
    assert str(path) in _one_line(err)


def test_check_matches_rejects_other_resolution(folder: Path, tmp_path: Path, repo_root: Path) -> None:
    pre = _pre(repo_root)
    path = save_calibration_set(build_calibration_set(folder, 6, 0, pre), tmp_path / "cal.safetensors")
    cal = load_calibration_set(path)
    cal.check_matches(pre, str(path))  # the model it was built for: fine
    with pytest.raises(EffdeployError) as err:
        cal.check_matches(pre.model_copy(update={"resolution": 64}), str(path))
    msg = _one_line(err)
    assert str(path) in msg and "resolution" in msg
    with pytest.raises(EffdeployError):
        cal.check_matches(pre.model_copy(update={"resize": "center_crop"}))
    # normalisation is applied later, so a different mean is compatible
    cal.check_matches(pre.model_copy(update={"mean": (0.5, 0.5, 0.5)}))


# --------------------------------------------------------------------------- the shipped set


def test_shipped_default_set(repo_root: Path) -> None:
    path = repo_root / DEFAULT_CALIBRATION
    assert path.is_file()
    assert path.stat().st_size < 2_000_000
    cal = load_calibration_set(path)
    assert cal.pixels.shape == (512, 32, 32, 3) and cal.pixels.dtype == np.uint8
    assert cal.labels.shape == (512,)
    prov = cal.provenance
    assert prov["seed"] == 0 and prov["n"] == 512
    assert prov["source"].endswith("cifar10/train")
    assert len(prov["class_counts"]) == 10
    assert all(51 <= c <= 52 for c in prov["class_counts"].values())
    assert sum(prov["class_counts"].values()) == 512
    counts = np.bincount(cal.labels, minlength=10)
    assert counts.tolist() == list(prov["class_counts"].values())
    cal.check_matches(_pre(repo_root), str(path))


def test_shipped_default_set_rebuilds_identically(
    repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (repo_root / CIFAR_TRAIN_REL).is_dir():
        pytest.skip(f"{(repo_root / CIFAR_TRAIN_REL).resolve()} not present")
    monkeypatch.chdir(repo_root)
    shipped_path = repo_root / DEFAULT_CALIBRATION
    shipped = load_calibration_set(shipped_path)
    rebuilt = build_calibration_set(CIFAR_TRAIN_REL, 512, 0, _pre(repo_root))
    np.testing.assert_array_equal(rebuilt.pixels, shipped.pixels)
    np.testing.assert_array_equal(rebuilt.labels, shipped.labels)
    assert rebuilt.provenance == shipped.provenance
    out = save_calibration_set(rebuilt, tmp_path / "rebuilt.safetensors")
    assert out.read_bytes() == shipped_path.read_bytes()

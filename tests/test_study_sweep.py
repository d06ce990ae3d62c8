"""Sweep cells: the content-hash cache, skipped and failing cells, the process pool, Ray's absence."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from effdeploy.errors import EffdeployError
from effdeploy.study import cache, sweep
from effdeploy.study.cache import Cell


def fake_cell(run, out_dir: Path, log) -> None:
    """Stands in for quantize_run: counts its calls in ./calls.log and writes a cell's files."""
    import torch

    with open("calls.log", "a") as f:
        f.write(f"{run.name} {run.quant.precisions[0]}\n")
    if run.quant.precisions[0] == "w2a2":
        raise RuntimeError("no kernel for 2-bit weights\nsecond line of the message")
    log("quantizing")
    labels = np.arange(20) % 10
    np.savez(out_dir / "outputs.npz", labels=labels, float=np.eye(10, dtype=np.float32)[labels])
    report = {"name": run.name, "threads": torch.get_num_threads(), "pid": os.getpid()}
    (out_dir / "report.json").write_text(json.dumps(report))


def _calls() -> list[str]:
    p = Path("calls.log")
    return p.read_text().splitlines() if p.exists() else []


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A working tree with a checkpoint, a calibration set, eval images and a config, all relative."""
    monkeypatch.chdir(tmp_path)
    Path("models/m").mkdir(parents=True)
    Path("models/m/model.safetensors").write_bytes(b"weights v1")
    Path("calibration").mkdir()
    Path("calibration/cal.safetensors").write_bytes(b"pixels")
    for cls in ("cat", "dog"):
        Path("data/test", cls).mkdir(parents=True)
        Path("data/test", cls, "0.png").write_bytes(b"png " + cls.encode())
    cfg = {
        "checkpoint": "models/m/model.safetensors",
        "model": {"variant": "b0", "width_mult": 0.5, "resolution": 32, "num_classes": 10},
        "data": {"train": "data/train", "test": "data/test"},
        "quant": {"calibration": "calibration/cal.safetensors", "precisions": ["w8a8", "w4a8"]},
    }
    Path("configs").mkdir()
    Path("configs/m.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def _cells(*precisions, label="m", **overrides):
    return [Cell(f"{label}/{p}", Path("configs/m.yaml"), p, overrides) for p in precisions]


def test_unchanged_inputs_are_not_rerun(tree):
    first = sweep.run_cells(_cells("w8a8", "w4a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in first] == ["ran", "ran"]
    assert len(_calls()) == 2
    for o in first:
        d = Path(o.dir)
        assert d.name == o.key[:16] and d.parent == Path("study/cells")
        assert {p.name for p in d.iterdir()} == {"outputs.npz", "report.json", "cell.json"}
        described = json.loads((d / "cell.json").read_text())
        assert described["checkpoint"]["sha256"] == cache.file_sha256("models/m/model.safetensors")
        assert described["config"]["quant"]["precisions"] == [o.label.split("/")[1]]
    again = sweep.run_cells(_cells("w8a8", "w4a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in again] == ["cached", "cached"]
    assert [o.key for o in again] == [o.key for o in first]
    assert len(_calls()) == 2
    # no temporary directories are left behind
    assert sorted(p.name for p in Path("study/cells").iterdir()) == sorted(o.key[:16] for o in first)


def test_changed_checkpoint_bytes_rerun(tree):
    first = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    Path("models/m/model.safetensors").write_bytes(b"weights v2")
    second = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert second[0].status == "ran" and second[0].key != first[0].key
    assert len(_calls()) == 2
    # the same bytes again: the first cell's result is reused
    Path("models/m/model.safetensors").write_bytes(b"weights v1")
    third = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert third[0].status == "cached" and third[0].key == first[0].key
    assert len(_calls()) == 2


def test_touching_a_file_without_changing_it_does_not_rerun(tree):
    sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    os.utime("models/m/model.safetensors", (1, 1))
    again = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert again[0].status == "cached" and len(_calls()) == 1


def test_changed_config_value_calibration_eval_data_or_code_rerun(tree, monkeypatch):
    base = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    keys = {base.key}
    # a config value, through the cell's overrides
    o = sweep.run_cells(_cells("w8a8", quant={"snr_images": 64}), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    assert o.status == "ran"
    keys.add(o.key)
    # the same value written in the config file gives the same key as the override
    cfg = yaml.safe_load(Path("configs/m.yaml").read_text())
    cfg["quant"]["snr_images"] = 64
    Path("configs/m.yaml").write_text(yaml.safe_dump(cfg))
    same = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    assert same.status == "cached" and same.key == o.key
    # calibration bytes
    Path("calibration/cal.safetensors").write_bytes(b"other pixels")
    o = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    assert o.status == "ran" and o.key not in keys
    keys.add(o.key)
    # one more evaluation image
    Path("data/test/cat/1.png").write_bytes(b"png")
    o = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    assert o.status == "ran" and o.key not in keys
    keys.add(o.key)
    # another quantizer version
    monkeypatch.setattr(cache, "code_version", lambda: "0.1.0+quant.000000000000")
    o = sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)[0]
    assert o.status == "ran" and o.key not in keys
    assert len(_calls()) == 5


def test_code_version_hashes_the_quantizer_sources():
    import effdeploy

    v = cache.code_version()
    assert v.startswith(effdeploy.__version__ + "+quant.") and len(v.split(".")[-1]) == 12
    assert cache.code_version() == v


def test_data_identity_is_content_of_the_listing(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"12345")
    one = cache.data_identity(tmp_path)
    assert one["files"] == 1
    (tmp_path / "a" / "x.png").write_bytes(b"123456")  # a different size: a different identity
    assert cache.data_identity(tmp_path)["listing_sha256"] != one["listing_sha256"]
    with pytest.raises(cache.MissingInput, match="not found"):
        cache.data_identity(tmp_path / "nope")


def test_missing_checkpoint_is_a_skipped_cell_with_its_reason(tree):
    cells = _cells("w8a8") + _cells("w8a8", label="later", checkpoint="models/s1/model.safetensors")
    out = sweep.run_cells(cells, "study", cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in out] == ["ran", "skipped"]
    assert out[1].reason == "checkpoint not there yet: models/s1/model.safetensors"
    assert out[1].key is None and out[1].dir is None
    assert len(_calls()) == 1


def test_a_failing_cell_is_recorded_and_the_others_continue(tree):
    out = sweep.run_cells(_cells("w8a8", "w2a2", "w4a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in out] == ["ran", "failed", "ran"]
    assert out[1].reason == "RuntimeError: no kernel for 2-bit weights"
    assert out[1].dir is None and not cache.is_done("study", out[1].key)
    log = Path("study/logs", out[1].key[:16] + ".log").read_text()
    assert "Traceback" in log and "second line of the message" in log
    # a failed cell is tried again on the next sweep
    again = sweep.run_cells(_cells("w2a2"), "study", cell_fn=fake_cell, log=lambda m: None)
    assert again[0].status == "failed" and len(_calls()) == 4


def test_same_inputs_under_two_labels_run_once(tree):
    cells = _cells("w8a8") + _cells("w8a8", label="alias")
    out = sweep.run_cells(cells, "study", cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in out] == ["ran", "ran"] and out[0].key == out[1].key
    assert len(_calls()) == 1


def test_only_filter_skips_unselected_cells_but_reports_cached_ones(tree):
    sweep.run_cells(_cells("w8a8"), "study", cell_fn=fake_cell, log=lambda m: None)
    out = sweep.run_cells(
        _cells("w8a8", "w4a8"), "study", cell_fn=fake_cell, selected=lambda c: "w4a4" in c.label, log=lambda m: None
    )
    assert [o.status for o in out] == ["cached", "skipped"]
    assert out[1].reason == "not selected (--only)"


def test_progress_lines_carry_an_eta(tree):
    lines: list[str] = []
    sweep.run_cells(_cells("w8a8", "w4a8"), "study", cell_fn=fake_cell, log=lines.append)
    assert lines[0] == "sweep: 2 cell(s) to run in this process; 0 cached"
    assert any(line.startswith("  cell 1/2 m/w8a8: done") and " ETA " in line for line in lines)
    assert any(line.startswith("  cell 2/2 m/w4a8: done") and line.endswith("ETA -") for line in lines)


@pytest.mark.slow  # two spawned workers each import torch: ~8 s on a busy machine
def test_process_pool_runs_cells_in_workers_with_one_torch_thread(tree):
    out = sweep.run_cells(_cells("w8a8", "w4a8", "w2a2"), "study", jobs=2, cell_fn=fake_cell, log=lambda m: None)
    assert [o.status for o in out] == ["ran", "ran", "failed"]
    reports = [json.loads(Path(o.dir, "report.json").read_text()) for o in out[:2]]
    assert all(r["threads"] == 1 for r in reports)
    assert all(r["pid"] != os.getpid() for r in reports)
    assert out[2].reason == "RuntimeError: no kernel for 2-bit weights"


def test_jobs_must_be_positive(tree):
    with pytest.raises(EffdeployError, match="--jobs"):
        sweep.run_cells(_cells("w8a8"), "study", jobs=0, cell_fn=fake_cell)


def test_ray_absent_is_a_clear_error(tree, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(EffdeployError, match=r"pip install 'effdeploy\[ray\]'"):
        sweep.run_cells(_cells("w8a8"), "study", ray_address="auto", cell_fn=fake_cell)
    assert _calls() == []


@pytest.mark.slow
def test_ray_local_cluster_runs_cells(tree):
    ray = pytest.importorskip("ray")
    try:
        out = sweep.run_cells(
            _cells("w8a8", "w2a2"), "study", ray_address="local", cell_fn=fake_cell, log=lambda m: None
        )
    finally:
        ray.shutdown()
    assert [o.status for o in out] == ["ran", "failed"]
    assert json.loads(Path(out[0].dir, "report.json").read_text())["threads"] == 1

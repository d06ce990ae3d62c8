"""Artifact sets are all-or-nothing: after an export or quantize run that fails, is interrupted
(Ctrl-C) or is terminated (SIGTERM), the output directory holds the previous complete set,
byte for byte, and no staging folder or `.tmp` file; after one that succeeds, the new set,
with no stale file of the old one, and every other command's files untouched.

The exporters are replaced by fakes that write known bytes (a real ONNX + TFLite export takes
tens of seconds here); the staging, the manifest and the CLI's signal handling are the real ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from PIL import Image

from effdeploy.config import ExportConfig, ModelConfig, RunConfig
from effdeploy.fileio import atomic_write_bytes, hold_signals, staged_dir
from effdeploy.model.checkpoints import save_checkpoint
from effdeploy.model.efficientnet import EfficientNet

TINY = {"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 10}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Staging folders and temporary files anywhere under ``parent``."""
    return sorted(str(p) for p in parent.rglob("*") if ".staging-" in p.name or p.name.endswith(".tmp"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- staged_dir itself


def _previous_set(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    (out / "a.bin").write_bytes(b"old a")
    (out / "b.bin").write_bytes(b"old b")
    (out / "manifest.json").write_text('{"set": "old"}')
    (out / "someone_else.json").write_text("not ours")
    return snapshot(out)


OWNED = {"a.bin", "b.bin", "manifest.json"}.__contains__


def test_success_replaces_the_set_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _previous_set(out)
    with staged_dir(out, owns=OWNED, last="manifest.json") as stage:
        assert stage.parent == out.parent and stage.name.startswith(".out.staging-")
        (stage / "a.bin").write_bytes(b"new a")
        (stage / "manifest.json").write_text('{"set": "new"}')
        assert snapshot(out)["a.bin"] == b"old a"  # nothing visible until the set is complete
    assert snapshot(out) == {
        "a.bin": b"new a",
        "manifest.json": b'{"set": "new"}',
        "someone_else.json": b"not ours",  # another command's file stays; stale b.bin is gone
    }
    assert leftovers(tmp_path) == []


def test_fresh_directory_is_created_with_the_set(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with staged_dir(out, owns=OWNED) as stage:
        (stage / "a.bin").write_bytes(b"a")
    assert snapshot(out) == {"a.bin": b"a"}
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError, SystemExit])
def test_failure_midway_leaves_the_previous_set(tmp_path: Path, raised: type[BaseException]) -> None:
    out = tmp_path / "out"
    before = _previous_set(out)
    with pytest.raises(raised):
        with staged_dir(out, owns=OWNED, last="manifest.json") as stage:
            atomic_write_bytes(stage / "a.bin", b"new a")
            (stage / ".b.bin.123.tmp").write_bytes(b"half written")
            raise raised()
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_failure_while_moving_puts_the_previous_set_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import effdeploy.fileio as fileio

    out = tmp_path / "out"
    before = _previous_set(out)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 5:  # 3 old files moved aside, one new file moved in, then the disk fails
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        with staged_dir(out, owns=OWNED, last="manifest.json") as stage:
            for name in ("a.bin", "b.bin", "manifest.json"):
                (stage / name).write_bytes(b"new " + name.encode())
    assert len(calls) > 5  # the rollback ran
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_an_error_names_the_file_where_it_would_have_been(tmp_path: Path) -> None:
    from effdeploy.errors import EffdeployError

    out = tmp_path / "out"
    with pytest.raises(EffdeployError) as err:
        with staged_dir(out) as stage:
            raise EffdeployError(f"{stage / 'model.onnx'}: ONNX export failed")
    assert str(err.value) == f"{out / 'model.onnx'}: ONNX export failed"


def test_signals_wait_until_the_set_is_in_place() -> None:
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        with hold_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            held = list(received)
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert held == []
    assert received == [signal.SIGTERM]


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    save_checkpoint(EfficientNet(ModelConfig(**TINY)), root / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    return root


def _run(tiny: Path, formats=("onnx", "tflite")) -> RunConfig:
    return RunConfig(
        name="tiny",
        checkpoint=tiny / "model.safetensors",
        model=ModelConfig(**TINY),
        export=ExportConfig(formats=formats, fidelity_data=tiny / "images", fidelity_images=4, threads=1),
    )


@pytest.fixture
def fake_exporters(monkeypatch: pytest.MonkeyPatch):
    """Exporters that write ``<format> <version>`` bytes; the one named ``fail_on`` calls ``fail``
    (Ctrl-C by default) instead."""
    import effdeploy.export.onnx
    import effdeploy.export.pipeline as pipeline
    import effdeploy.export.tflite
    from effdeploy.runtime.torch_backend import TorchBackend

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    state = {"version": "v1", "fail_on": None, "fail": ctrl_c, "models": []}

    def write(fmt: str):
        def export(model, path, **_kwargs):
            state["models"].append(model)
            if state["fail_on"] == fmt:
                state["fail"]()
            atomic_write_bytes(path, f"{fmt} {state['version']}".encode())

        return export

    monkeypatch.setattr(effdeploy.export.onnx, "export_onnx", write("onnx"))
    monkeypatch.setattr(effdeploy.export.tflite, "export_tflite", write("tflite"))
    monkeypatch.setattr(effdeploy.export.tflite, "tflite_io", lambda _path: {})
    monkeypatch.setattr(effdeploy.export.tflite, "edge_transposes", lambda _path: 0)
    monkeypatch.setattr(pipeline, "load_backend", lambda _name, _path, **_kw: TorchBackend(state["models"][-1]))
    return state


def _quiet(*_args) -> None:
    pass


def _check_manifest(out: Path, version: str, formats: tuple[str, ...]) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    names = {"onnx": "model.onnx", "tflite": "model.tflite"}
    assert [f["name"] for f in manifest["files"]] == [names[f] for f in formats]
    for record in manifest["files"]:
        data = (out / record["name"]).read_bytes()
        assert data == f"{record['format']} {version}".encode()
        assert record["sha256"] == sha256(data) and record["bytes"] == len(data)


def test_interrupted_export_keeps_the_previous_set(tiny: Path, tmp_path: Path, fake_exporters) -> None:
    from effdeploy.export.pipeline import export_run

    out = tmp_path / "artifacts" / "tiny"
    export_run(_run(tiny), out, log=_quiet)
    (out / "bench.json").write_text("another command's file")
    _check_manifest(out, "v1", ("onnx", "tflite"))
    before = snapshot(out)

    fake_exporters.update(version="v2", fail_on="tflite")  # Ctrl-C after the new ONNX is written
    with pytest.raises(KeyboardInterrupt):
        export_run(_run(tiny), out, log=_quiet)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []

    fake_exporters.update(fail_on=None)
    export_run(_run(tiny, formats=("onnx",)), out, log=_quiet)
    _check_manifest(out, "v2", ("onnx",))
    assert not (out / "model.tflite").exists()  # the old set's TFLite is not left beside the new set
    assert (out / "bench.json").read_text() == "another command's file"
    assert leftovers(tmp_path) == []


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    import effdeploy.cli as cli_module

    def run(*args) -> tuple[int, str]:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["effdeploy", *map(str, args)])
        capsys.readouterr()
        try:
            cli_module.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_export_through_the_cli(
    cli, tiny: Path, tmp_path: Path, fake_exporters, signum: int, status: int
) -> None:
    config = tmp_path / "tiny.yaml"
    run = _run(tiny)
    config.write_text(yaml.safe_dump(json.loads(run.model_dump_json())))
    out = tmp_path / "artifacts"
    code, err = cli("export", "--config", config, "--out", out)
    assert code == 0, err
    before = snapshot(out)

    # a real signal to this process, delivered while the new set is half written
    fake_exporters.update(version="v2", fail_on="tflite", fail=lambda: os.kill(os.getpid(), signum) or time.sleep(5))
    code, err = cli("export", "--config", config, "--out", out)
    assert code == status
    assert [line for line in err.splitlines() if line.startswith("effdeploy:")] == ["effdeploy: interrupted"]
    assert "Traceback" not in err
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- quantize


def test_quantize_set_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import effdeploy.quant.pipeline as qp

    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"export's file")  # the same directory holds export's set
    (out / "manifest.json").write_text("{}")
    (out / "report.json").write_text('{"run": 1}')
    (out / "model_w4a8.onnx").write_bytes(b"w4a8 run 1")
    (out / "peer_onnxruntime_w4a8.onnx").write_bytes(b"peer run 1")
    before = snapshot(out)

    def interrupted(inputs, precision, stage, *, log=print, methods=None):
        assert stage.parent == out.parent and stage != out
        (stage / "model_w8a8.onnx").write_bytes(b"w8a8 run 2")
        raise KeyboardInterrupt

    monkeypatch.setattr(qp, "load_inputs", lambda run, *, log=print: None)
    monkeypatch.setattr(qp, "quantize_precision", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qp.quantize_run(RunConfig(), out)
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []

    def precision_done(inputs, precision, stage, *, log=print, methods=None):
        if precision == "w8a8":
            (stage / "model_w8a8.onnx").write_bytes(b"w8a8 run 2")
        return qp.PrecisionResult(precision)

    def complete(inputs, results, stage):
        # a failing peer's message names the file it was writing: in the staging folder
        report = {"run": 2, "peers": [{"error": f"{stage / 'peer_x_w8a8.onnx'}: quantize_static failed"}]}
        (stage / "report.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(qp, "quantize_precision", precision_done)
    monkeypatch.setattr(qp, "quantize_peers", lambda inputs, stage, *, log=print, tools=None: {})
    monkeypatch.setattr(qp, "write_report", complete)
    expected = {"run": 2, "peers": [{"error": f"{out / 'peer_x_w8a8.onnx'}: quantize_static failed"}]}
    assert qp.quantize_run(RunConfig(), out) == expected  # recorded paths are where files are found
    assert snapshot(out) == {
        "manifest.json": b"{}",
        "model.onnx": b"export's file",
        "model_w8a8.onnx": b"w8a8 run 2",
        "report.json": json.dumps(expected).encode(),
    }
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- a real process


DRIVER = """
import sys, time
import effdeploy.export.onnx as onnx
from effdeploy.fileio import atomic_path

def slow_export(model, path, **kwargs):
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"half an ONNX file")
        print("effdeploy-test: exporting", file=sys.stderr, flush=True)
        time.sleep(120)

onnx.export_onnx = slow_export
from effdeploy.cli import main
sys.argv = ["effdeploy", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_killing_a_real_export_process(tiny: Path, tmp_path: Path, signum: int, status: int) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(json.loads(_run(tiny).model_dump_json())))
    out = tmp_path / "artifacts"
    out.mkdir()
    for name, data in {"model.onnx": b"old onnx", "model.tflite": b"old tflite", "manifest.json": b"{}"}.items():
        (out / name).write_bytes(data)
    before = snapshot(out)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, "export", "--config", str(config), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        for line in proc.stderr:
            if line.startswith("effdeploy-test: exporting"):
                break
        else:
            pytest.fail("the export never started")
        assert any(".staging-" in p.name for p in tmp_path.iterdir())  # mid-export, a set half written
        proc.send_signal(signum)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == status
    finally:
        proc.kill()
    assert [line for line in rest.splitlines() if line.startswith("effdeploy:")] == ["effdeploy: interrupted"]
    assert "Traceback" not in rest
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []

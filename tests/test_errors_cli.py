"""Every bad input to the `effdeploy` command is one line, `effdeploy: error: ...`, status 2, no
traceback and no file left behind; an internal error is one summary line and status 1.

Most cases call ``effdeploy.cli.main()`` in this process (the same function the console script
runs, with its exit status and stderr) because a subprocess costs seconds of torch import on a
busy machine; a few run as real subprocesses to prove the whole path (signals, the interpreter's
exit status, EFFDEPLOY_VERBOSE).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT, run_cli
from PIL import Image

from effdeploy.config import ModelConfig
from effdeploy.model.checkpoints import save_checkpoint
from effdeploy.model.efficientnet import EfficientNet

TINY = {"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 10}
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``cli(*args)``: run ``effdeploy.cli.main()`` with ``args``; the exit status and its output."""
    import effdeploy.cli as cli_module

    def run(*args: str, cwd: Path | None = None) -> Result:
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", ["effdeploy", *map(str, args)])
        monkeypatch.delenv("EFFDEPLOY_VERBOSE", raising=False)
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            cli_module.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def user_error(result: Result) -> str:
    """Status 2, exactly one stderr line `effdeploy: error: ...`, no traceback; returns the line."""
    lines = result.err.strip().splitlines()
    assert result.code == 2, result
    assert len(lines) == 1, result.err
    assert lines[0].startswith("effdeploy: error: "), result.err
    assert "Traceback" not in result.err
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels in a few bytes (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint, a 10-class training folder and a config naming both."""
    root = tmp_path_factory.mktemp("work")
    torch.manual_seed(0)
    save_checkpoint(EfficientNet(ModelConfig(**TINY)), root / "model.safetensors")
    image_folder(root / "train", {name: 2 for name in CIFAR})
    config = {
        "checkpoint": str(root / "model.safetensors"),
        "model": TINY,
        "data": {"train": str(root / "train"), "test": None, "val_fraction": 0.0},
        "train": {"epochs": 1, "batch_size": 4},
        "reorder": {"steps": 1, "batch_size": 4, "warmup_steps": 0},
        "quant": {"calibration": str(root / "calibration.safetensors"), "eval_data": str(root / "train")},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return root


# --------------------------------------------------------------------------- checkpoints


def test_embedded_config_that_is_json_but_not_an_object(cli, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in EfficientNet(ModelConfig(**TINY)).state_dict().items()}
    bad = tmp_path / "model.safetensors"
    save_file(state, str(bad), metadata={"format": "effdeploy-checkpoint/1", "config": "[1, 2, 3]"})
    image_folder(tmp_path / "data", {"cat": 1})
    line = user_error(cli("eval", "--checkpoint", bad, "--data", tmp_path / "data"))
    assert str(bad) in line and "not a JSON object" in line


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles whose loading would run ``touch marker``: plain (protocol 2, which reaches the
    GLOBAL opcode) and inside a torch.save zip file."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plain = pickle.dumps({"state_dict": Payload()}, protocol=2)
    zipped = marker.parent / "zipped.pt"
    torch.save({"epoch": Payload()}, zipped)
    return {"plain": plain, "zip": zipped.read_bytes()}


def test_malicious_pickle_never_runs(cli, work: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for kind, payload in _malicious_pickles(marker).items():
        weights = tmp_path / f"evil_{kind}.pt"
        weights.write_bytes(payload)
        line = user_error(cli("import-weights", weights, "--out", tmp_path / f"out_{kind}.safetensors"))
        assert str(weights) in line and "weights-only" in line
        run_dir = tmp_path / f"run_{kind}"
        run_dir.mkdir()
        save_checkpoint(EfficientNet(ModelConfig(**TINY)), run_dir / "last.safetensors")
        (run_dir / "train_state.pt").write_bytes(payload)
        line = user_error(cli("train", "--config", work / "run.yaml", "--out", run_dir, "--resume"))
        assert str(run_dir / "train_state.pt") in line
        assert not marker.exists(), f"the {kind} pickle ran its payload"
        assert not (tmp_path / f"out_{kind}.safetensors").exists()
    # the payload itself works: unpickled without the guard it runs (the test proves something)
    pickle.loads(_malicious_pickles(marker)["plain"])
    assert marker.exists()


def test_resume_with_a_corrupt_training_state(cli, work: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(EfficientNet(ModelConfig(**TINY)), run_dir / "last.safetensors")
    for content in (b"\x80\x02garbage that is not a pickle", b"", pickle.dumps([1, 2], protocol=2)):
        (run_dir / "train_state.pt").write_bytes(content)
        before = tree(run_dir)
        line = user_error(cli("train", "--config", work / "run.yaml", "--out", run_dir, "--resume"))
        assert str(run_dir / "train_state.pt") in line
        assert tree(run_dir) == before


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_batch_size_must_be_positive(cli, work: Path, value: str) -> None:
    line = user_error(
        cli("eval", "--checkpoint", work / "model.safetensors", "--data", work / "train", "--batch-size", value)
    )
    assert "--batch-size" in line


@pytest.mark.parametrize("phi", ["100", "inf", "nan", "-inf"])
def test_profile_phi_out_of_range(cli, phi: str) -> None:
    result = cli("profile", "--phi", phi)
    assert "phi" in user_error(result)
    assert result.out == ""


def test_profile_config_with_a_model_section_that_is_not_a_mapping(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: 5\n")
    assert str(cfg) in user_error(cli("profile", "--config", cfg))


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("--threads", "-1"), "--threads"),
        (("--threads", "0"), "--threads"),
        (("--epochs", "-5"), "--epochs"),
        (("--epochs", "0"), "--epochs"),
        (("--limit", "0"), "--limit"),
    ],
)
def test_train_overrides_are_validated_like_config_fields(cli, work: Path, tmp_path: Path, args, option) -> None:
    out = tmp_path / "run"
    line = user_error(cli("train", "--config", work / "run.yaml", "--out", out, *args))
    assert line.startswith(f"effdeploy: error: {option}")
    assert not out.exists()  # no untrained model, no run directory


def test_reorder_negative_steps_refused(cli, work: Path, tmp_path: Path) -> None:
    out = tmp_path / "reordered"
    args = ("reorder", "--checkpoint", work / "model.safetensors", "--to", "before", "--config", work / "run.yaml")
    line = user_error(cli(*args, "--out", out, "--steps", "-5"))
    assert line.startswith("effdeploy: error: --steps")
    assert not out.exists()


@pytest.mark.parametrize(("verb", "option"), [("quantize", "--precisions"), ("export", "--formats")])
@pytest.mark.parametrize("value", ["", " ", ","])
def test_empty_lists_are_an_error_not_the_default(cli, work: Path, tmp_path: Path, verb, option, value) -> None:
    out = tmp_path / "out"
    line = user_error(cli(verb, "--config", work / "run.yaml", "--out", out, option, value))
    assert line.startswith(f"effdeploy: error: {option}: ")
    assert not out.exists()


def test_an_item_left_empty_is_an_error(cli, work: Path, tmp_path: Path) -> None:
    line = user_error(cli("quantize", "--config", work / "run.yaml", "--out", tmp_path / "o", "--precisions", "w8a8,"))
    assert "--precisions" in line and "empty item" in line


def test_usage_errors_are_one_line(cli) -> None:
    assert "--bogus" in user_error(cli("eval", "--bogus"))
    assert "--config" in user_error(cli("train"))
    assert "nosuch" in user_error(cli("nosuch"))
    assert "--batch-size" in user_error(cli("eval", "--batch-size", "many"))


def test_a_model_too_large_to_build_is_refused_before_allocating(cli, work: Path, tmp_path: Path) -> None:
    cfg = yaml.safe_load((work / "run.yaml").read_text())
    cfg["model"] = {"variant": "b0", "phi": 16, "num_classes": 10}  # 1.8 billion parameters
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    line = user_error(cli("train", "--config", path, "--out", out))
    assert "parameters" in line and "EFFDEPLOY_MAX_PARAMS" in line
    assert not out.exists()


def test_training_memory_estimate_refuses_a_batch_that_cannot_fit(
    cli, work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from effdeploy.config import RunConfig, parse
    from effdeploy.train.trainer import training_memory_bytes

    cfg = yaml.safe_load((work / "run.yaml").read_text())
    need = training_memory_bytes(parse(RunConfig, cfg, "run.yaml"))
    monkeypatch.setenv("EFFDEPLOY_MAX_TRAIN_GB", str(need / 2 / 2**30))  # half of what it needs
    out = tmp_path / "run"
    line = user_error(cli("train", "--config", work / "run.yaml", "--out", out))
    assert "EFFDEPLOY_MAX_TRAIN_GB" in line and not out.exists()


# --------------------------------------------------------------------------- images


def test_decompression_bomb_is_one_clean_error(cli, work: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    bomb = data / "dog" / "huge.png"
    bomb.write_bytes(png_header(20_000, 10_000))  # 200 megapixels declared in 100 bytes
    out = tmp_path / "cal.safetensors"
    line = user_error(cli("calib", "build", "--data", data, "--out", out, "--n", "5", "--config", work / "run.yaml"))
    assert str(bomb) in line and "too large" in line
    assert not out.exists()


def test_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from effdeploy.data.preprocess import load_rgb
    from effdeploy.errors import EffdeployError

    path = tmp_path / "wide.png"
    path.write_bytes(png_header(9_000, 8_000))  # 72 MP: past our 64 MP cap, below PIL's own guard
    with pytest.raises(EffdeployError) as err:
        load_rgb(path)
    assert "9000 x 8000" in str(err.value)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    monkeypatch.setenv("EFFDEPLOY_MAX_IMAGE_PIXELS", "1000")  # 40 x 30 = 1200
    with pytest.raises(EffdeployError):
        load_rgb(small)
    monkeypatch.setenv("EFFDEPLOY_MAX_IMAGE_PIXELS", "1200")
    assert load_rgb(small).size == (40, 30)


# --------------------------------------------------------------------------- output paths


def _bad_outputs(tmp_path: Path) -> dict[str, Path]:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    existing_dir = tmp_path / "a_dir"
    existing_dir.mkdir()
    return {
        "proc": Path("/proc/effdeploy-test/out"),
        "under_a_file": blocker / "sub" / "out",
        "existing_dir": existing_dir,
    }


@pytest.mark.parametrize("case", ["proc", "under_a_file", "existing_dir"])
def test_unwritable_output_file_fails_before_work(cli, work: Path, tmp_path: Path, case: str) -> None:
    out = _bad_outputs(tmp_path)[case]
    before = tree(tmp_path)
    calib = ("calib", "build", "--data", work / "train", "--n", "4", "--config", work / "run.yaml", "--out", out)
    assert str(out) in user_error(cli(*calib))
    weights = tmp_path / "weights.pt"
    torch.save(EfficientNet(ModelConfig(**TINY)).state_dict(), weights)
    before_weights = tree(tmp_path)
    imported = ("import-weights", weights, "--model", "b0", "--num-classes", "10", "--out", out)
    assert str(out) in user_error(cli(*imported))
    assert tree(tmp_path) == before_weights and set(before) <= set(before_weights)
    assert (tmp_path / "a_file").read_text() == "keep me"


@pytest.mark.parametrize("case", ["proc", "under_a_file", "a_regular_file"])
def test_unwritable_output_directory_fails_before_work(cli, work: Path, tmp_path: Path, case: str) -> None:
    outs = _bad_outputs(tmp_path)
    outs["a_regular_file"] = tmp_path / "a_file"
    out = outs[case]
    before = tree(tmp_path)
    reorder = ("reorder", "--checkpoint", work / "model.safetensors", "--to", "before")
    for verb in (("quantize",), ("export",), ("train",), reorder):
        line = user_error(cli(*verb, "--config", work / "run.yaml", "--out", out))
        assert str(out) in line and "--out" in line
    assert tree(tmp_path) == before
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_check_helpers_create_nothing(tmp_path: Path) -> None:
    from effdeploy.fileio import check_writable_dir, check_writable_file

    check_writable_dir(tmp_path / "new" / "deeper", "--out")
    check_writable_file(tmp_path / "new" / "model.safetensors", "--out")
    assert tree(tmp_path) == []


# --------------------------------------------------------------------------- eval: labels by class name


def _dog_model(path: Path) -> Path:
    """A model that answers 'dog' (output 5 of the CIFAR-10 order) for every image."""
    model = EfficientNet(ModelConfig(**TINY))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[CIFAR.index("dog")] = 10.0
    return save_checkpoint(model, path)


def test_eval_on_a_folder_with_some_of_the_classes(cli, work: Path, tmp_path: Path) -> None:
    ckpt = _dog_model(tmp_path / "ckpt" / "model.safetensors")
    data = image_folder(tmp_path / "some", {"cat": 3, "dog": 1})
    result = cli("eval", "--checkpoint", ckpt, "--data", data, "--config", work / "run.yaml", "--json")
    assert result.code == 0, result.err
    # every image is called 'dog': the one dog is right, the three cats wrong. Labelled by
    # position (cat 0 = airplane, dog 1 = automobile), all four would be wrong: 0%.
    assert json.loads(result.out)["top1"] == pytest.approx(1 / 4)
    # the run.yaml a training run leaves beside its checkpoint says the same
    (ckpt.parent / "run.yaml").write_text((work / "run.yaml").read_text())
    result = cli("eval", "--checkpoint", ckpt, "--data", data, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["top1"] == pytest.approx(1 / 4)


def test_eval_class_the_model_lacks_is_an_error(cli, work: Path, tmp_path: Path) -> None:
    ckpt = _dog_model(tmp_path / "model.safetensors")
    data = image_folder(tmp_path / "some", {"cat": 1, "zebra": 1})
    line = user_error(cli("eval", "--checkpoint", ckpt, "--data", data, "--config", work / "run.yaml"))
    assert "zebra" in line and str(data) in line


def test_eval_subset_without_known_class_names_is_an_error(cli, tmp_path: Path) -> None:
    ckpt = _dog_model(tmp_path / "model.safetensors")
    data = image_folder(tmp_path / "some", {"cat": 1, "dog": 1})
    line = user_error(cli("eval", "--checkpoint", ckpt, "--data", data))
    assert "class names" in line


# --------------------------------------------------------------------------- internal errors, -v


def _boom(*_args, **_kwargs):
    raise RuntimeError("simulated bug\nsecond line")


def test_internal_error_is_one_summary_line(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import effdeploy.model.profile

    monkeypatch.setattr(effdeploy.model.profile, "profile_config", _boom)
    result = cli("profile")
    assert result.code == 1
    assert result.err.strip().splitlines() == [
        "effdeploy: internal error: RuntimeError: simulated bug (run with -v for the traceback)"
    ]
    verbose = cli("-v", "profile")
    assert verbose.code == 1
    assert "Traceback" in verbose.err and "_boom" in verbose.err
    assert verbose.err.strip().splitlines()[-1] == "effdeploy: internal error: RuntimeError: simulated bug"


DRIVER = """
import sys
import effdeploy.model.profile as profile
def boom(*args, **kwargs):
    raise ZeroDivisionError("simulated bug")
profile.profile_config = boom
from effdeploy.cli import main
sys.argv = ["effdeploy", *sys.argv[1:]]
main()
"""


def test_internal_error_in_a_real_process_and_verbose_env(tmp_path: Path) -> None:
    def run(env_verbose: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "EFFDEPLOY_VERBOSE"}
        if env_verbose is not None:
            env["EFFDEPLOY_VERBOSE"] = env_verbose
        return subprocess.run(
            [sys.executable, "-c", DRIVER, "profile"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            timeout=120,
        )

    quiet = run(None)
    assert quiet.returncode == 1
    assert quiet.stderr.strip() == (
        "effdeploy: internal error: ZeroDivisionError: simulated bug (run with -v for the traceback)"
    )
    loud = run("1")
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "boom" in loud.stderr


def test_user_error_in_a_real_process(tmp_path: Path) -> None:
    proc = run_cli("profile", "--phi", "inf", cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("effdeploy: error: ") and "phi" in proc.stderr

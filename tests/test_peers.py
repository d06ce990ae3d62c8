"""The peers (onnxruntime quantize_static, ai-edge-quantizer) run on the same model and images
and are measured like ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_quant_core import _trained_like

from effdeploy.quant.peers import equal_batch, peers_for, run_peers


def test_peers_for_precisions() -> None:
    names = [p.name for p in peers_for(8, 8)]
    assert names == ["ort-minmax", "ort-minmax-default-session", "ort-percentile", "aeq-static"]
    assert [p.name for p in peers_for(4, 8)] == names
    assert peers_for(4, 4) == [] and peers_for(6, 8) == []  # no peer expresses these


def test_equal_batches_split_the_calibration_set_evenly() -> None:
    assert equal_batch(512) == 32 and equal_batch(100) == 25 and equal_batch(16) == 16
    assert equal_batch(97) == 1  # a prime: one image at a time rather than a short last batch


@pytest.mark.slow
def test_onnxruntime_entropy_defaults_give_minmax_ranges(tiny_config: dict, tmp_path) -> None:
    """Why no Entropy peer runs: with quantize_static's defaults (128 bins, 128 quantized bins)
    onnxruntime's KL search has one candidate, the whole histogram, so every range is MinMax's."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    from effdeploy.export.onnx import torch_to_onnx
    from effdeploy.quant.peers import _folded_float, _Reader

    model = _folded_float(_trained_like(tiny_config))
    float_path = tmp_path / "float.onnx"
    torch_to_onnx(model, float_path, opset=21, resolution=model.config.resolution, name="tiny")
    cal = torch.randn(32, 3, 32, 32).numpy()
    ranges = {}
    for method in ("MinMax", "Entropy"):
        calibrator = create_calibrator(
            float_path, augmented_model_path=tmp_path / f"aug_{method}.onnx", calibrate_method=CalibrationMethod[method]
        )
        calibrator.collect_data(_Reader(cal, "images"))
        ranges[method] = {
            k: tuple(np.asarray(v.range_value).ravel().tolist()) for k, v in calibrator.compute_data().data.items()
        }
    assert len(ranges["MinMax"]) > 20
    assert ranges["Entropy"] == ranges["MinMax"]


@pytest.mark.slow
def test_run_peers_measures_each(tiny_config: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = _trained_like(tiny_config)
    cal = torch.randn(16, 3, 32, 32).numpy()
    held = torch.randn(12, 3, 32, 32).numpy()
    labels = np.arange(12) % 10
    with torch.no_grad():
        float_logits = model(torch.from_numpy(held)).numpy()
    messages: list[str] = []
    rows = run_peers(model, cal, held, labels, float_logits, 8, 8, tmp_path, log=messages.append)
    assert [r["peer"] for r in rows] == [p.name for p in peers_for(8, 8)]
    assert all("error" not in r for r in rows), rows
    for r in rows:
        assert (tmp_path / r["file"]).is_file() and r["bytes"] > 0
        assert 0 <= r["agreement"] <= 1 and np.isfinite(r["output_snr_db"])
    sessions = {r["peer"]: r["session_options"] for r in rows}
    assert sessions["ort-minmax"]["session.x64quantprecision"] == 1
    assert sessions["ort-minmax-default-session"]["session.x64quantprecision"] == 0
    # the default-session row reuses the MinMax model: same file, only the session differs
    assert rows[0]["file"] == rows[1]["file"]
    assert rows[-1]["file"].endswith(".tflite") and len(messages) == len(rows)


def _graph_bytes(path) -> bytes:
    """An ONNX model's bytes without the exporter's per-node source locations (stack traces)."""
    import onnx

    m = onnx.load(path)
    for node in m.graph.node:
        del node.metadata_props[:]
    return m.SerializeToString()


@pytest.mark.slow
def test_peers_calibrate_once_per_model(tiny_config: dict, tmp_path) -> None:
    """A second precision reuses the first one's calibration (onnxruntime's range cache,
    ai-edge-quantizer's ranges): its artifacts must be exactly those of calibrating afresh,
    since activation ranges do not depend on the weights' bits."""
    from effdeploy.quant.peers import PeerWork

    model = _trained_like(tiny_config)
    cal = torch.randn(16, 3, 32, 32).numpy()
    held = torch.randn(4, 3, 32, 32).numpy()
    labels = np.arange(4)
    with torch.no_grad():
        float_logits = model(torch.from_numpy(held)).numpy()
    args = (model, cal, held, labels, float_logits)
    (tmp_path / "w").mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "fresh").mkdir()
    shared = PeerWork(tmp_path / "w")
    run_peers(*args, 8, 8, tmp_path / "shared", log=lambda m: None, work=shared)
    assert sorted(p.name for p in (tmp_path / "w").glob("ort_ranges_*.json")) == [
        "ort_ranges_MinMax.json",
        "ort_ranges_Percentile.json",
    ]
    assert shared.aeq_ranges is not None
    reused = run_peers(*args, 4, 8, tmp_path / "shared", log=lambda m: None, work=shared)
    fresh = run_peers(*args, 4, 8, tmp_path / "fresh", log=lambda m: None)
    assert [r["file"] for r in reused] == [r["file"] for r in fresh]
    for r in fresh:
        a, b = tmp_path / "shared" / r["file"], tmp_path / "fresh" / r["file"]
        if r["file"].endswith(".onnx"):
            assert _graph_bytes(a) == _graph_bytes(b), r["file"]
        else:
            assert a.read_bytes() == b.read_bytes(), r["file"]

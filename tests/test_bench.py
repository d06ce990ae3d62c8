"""effdeploy bench: statistics by hand, the machine record, artifact roles, round-robin order,
and an end-to-end run on a tiny model whose numbers must match what quantize measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from PIL import Image

from effdeploy.bench.artifacts import classify, find_artifacts
from effdeploy.bench.machine import cpu_info
from effdeploy.bench.pipeline import BenchOptions, latency_ratios, time_round_robin
from effdeploy.bench.record import Record
from effdeploy.bench.stats import latency_stats
from effdeploy.errors import EffdeployError


def test_latency_stats_by_hand() -> None:
    s = latency_stats([float(v) for v in range(1, 11)], warmup=3)
    # linear-interpolated percentiles of 1..10: p90 at rank 8.1 -> 9.1, p99 at rank 8.91 -> 9.91
    assert s["runs"] == 10 and s["warmup"] == 3 and s["min"] == 1.0
    assert s["median"] == 5.5 and s["mean"] == 5.5
    assert s["p90"] == pytest.approx(9.1) and s["p99"] == pytest.approx(9.91)
    assert s["std"] == pytest.approx(8.25**0.5)  # population variance of 1..10 is (100 - 1) / 12
    with pytest.raises(ValueError):
        latency_stats([])


AVX2_ONLY = """processor\t: 0
model name\t: Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma
"""
VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse avx avx2 fma avx512f avx512bw avx512_vnni
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes crc32 asimddp i8mm
"""


def test_cpu_info_reads_int8_flags() -> None:
    a = cpu_info(AVX2_ONLY)
    assert a["model"] == "Intel(R) Core(TM) i7-6700 CPU @ 3.40GHz"
    assert a["flags"] == ["avx2", "fma"] and a["vnni"] is False
    v = cpu_info(VNNI)
    assert v["flags"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"] and v["vnni"] is True
    assert cpu_info(ARM)["flags"] == ["asimddp", "i8mm"]


def test_exact_int8_path_only_where_int8_may_saturate() -> None:
    from effdeploy.runtime.cpu import int8_may_saturate

    assert int8_may_saturate(cpu_info(AVX2_ONLY) | {"arch": "x86_64"}) is True
    assert int8_may_saturate(cpu_info(VNNI) | {"arch": "x86_64"}) is False
    assert int8_may_saturate(cpu_info(ARM) | {"arch": "aarch64"}) is False


def test_artifact_roles(tmp_path: Path) -> None:
    names = [
        "model.onnx",
        "model.tflite",
        "model_w8a8.onnx",
        "model_w4a8.tflite",
        "peer_ort-minmax_w8a8.onnx",
        "peer_aeq-static_w8a8.tflite",
        "model_w8a8_edgetpu.tflite",
        "report.json",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    got = [(a.name, a.format, a.precision, a.producer) for a in find_artifacts(tmp_path, Path("ckpt"))]
    assert got == [
        ("pytorch", "pytorch", "fp32", "PyTorch eager"),
        ("model.onnx", "onnx", "fp32", "effdeploy export"),
        ("model.tflite", "tflite", "fp32", "effdeploy export"),
        ("model_w8a8.onnx", "onnx", "w8a8", "effdeploy"),
        ("peer_ort-minmax_w8a8.onnx", "onnx", "w8a8", "onnxruntime quantize_static (ort-minmax)"),
        ("peer_aeq-static_w8a8.tflite", "tflite", "w8a8", "ai-edge-quantizer (aeq-static)"),
        ("model_w4a8.tflite", "tflite", "w4a8", "effdeploy"),
    ]
    assert classify(tmp_path / "model_w8a8_edgetpu.tflite") is None
    with pytest.raises(EffdeployError, match="no artifact directory"):
        find_artifacts(tmp_path / "missing")


def test_round_robin_rotates_the_order() -> None:
    calls: list[str] = []
    fns = [lambda x, n=n: calls.append(n) for n in "abc"]
    samples = time_round_robin(fns, np.zeros(1), runs=3, warmup=2, repeats=2)
    # warm-up: each function twice, in turn; then each round starts one function later
    assert calls[:6] == list("aabbcc")
    assert calls[6:15] == list("abcbcacab")
    assert [len(rep) for per_fn in samples for rep in per_fn] == [3] * 6


def test_ratios_pair_same_backend_and_format() -> None:
    def rec(name, fmt, prec, backend, median, **opts):
        r = Record(name, fmt, prec, "x", backend, "cpu", 1, options=opts)
        r.latency_ms = {"median": median}
        return r

    records = [
        rec("model.onnx", "onnx", "fp32", "onnxruntime", 2.0),
        rec("model.tflite", "tflite", "fp32", "litert", 4.0, xnnpack=True),
        rec("model_w8a8.onnx", "onnx", "w8a8", "onnxruntime", 1.5),
        rec("model_w8a8.tflite", "tflite", "w8a8", "litert", 1.0, xnnpack=True),
    ]
    got = {r["artifact"]: (r["reference"], r["ratio"]) for r in latency_ratios(records)}
    assert got == {"model_w8a8.onnx": ("model.onnx", 0.75), "model_w8a8.tflite": ("model.tflite", 0.25)}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"backends": ""}, "--backend: empty list"),
        ({"backends": "torch,gpu"}, "--backend: unknown 'gpu'"),
        ({"runs": 0}, "--runs: must be at least 1"),
        ({"threads": 0}, "--threads: must be at least 1"),
        ({"warmup": -1}, "--warmup: must be at least 0"),
    ],
)
def test_bad_options(kw: dict, message: str) -> None:
    with pytest.raises(EffdeployError, match=message):
        BenchOptions.parse(**kw)


def test_serial_implies_android() -> None:
    assert "android" in BenchOptions.parse(backends="litert", serials=["emulator-5554"]).backends


# ---- end to end on a tiny model --------------------------------------------------------------

CIFAR_PRE = {"resize": "resize", "interpolation": "bilinear", "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, repo_root: Path):
    """A tiny model exported and quantized (W8A8, ONNX QDQ + full-integer TFLite) into one directory."""
    import os

    from effdeploy.config import RunConfig, parse
    from effdeploy.export.pipeline import export_run
    from effdeploy.model.checkpoints import save_checkpoint
    from effdeploy.model.efficientnet import build_model
    from effdeploy.quant.pipeline import quantize_run

    tmp = tmp_path_factory.mktemp("bench")
    os.environ["EFFDEPLOY_CACHE"] = str(tmp / "cache")
    rng = np.random.default_rng(0)
    for c in range(3):
        d = tmp / "data" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(8):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            img[..., c] = 255
            Image.fromarray(img).save(d / f"{i:03d}.png")
    cfg = {"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 3}
    model = build_model({**cfg, "preprocess": CIFAR_PRE})
    ckpt = save_checkpoint(model.eval(), tmp / "tiny.safetensors")
    run = parse(
        RunConfig,
        {
            "name": "tiny",
            "checkpoint": str(ckpt),
            "model": json.loads(model.config.model_dump_json()),
            "data": {"train": str(tmp / "data"), "test": str(tmp / "data")},
            "export": {"fidelity_data": str(tmp / "data"), "fidelity_images": 8},
            "quant": {
                "precisions": ["w8a8"],
                "calibration": str(repo_root / "calibration/cifar10_train_512_seed0.safetensors"),
                "calibration_images": 32,
                "snr_images": 8,
                "runtimes": ["onnxruntime", "litert"],
                "peers": False,
                "learn_ranges": False,
                "range_search": False,
            },
        },
        "test",
    )
    art = tmp / "artifacts"
    export_run(run, art, log=lambda m: None)
    report = quantize_run(run, art, log=lambda m: None)
    return run, art, report


@pytest.mark.slow
def test_bench_end_to_end_matches_quantize(quantized) -> None:
    from effdeploy.bench.pipeline import bench_run

    run, art, report = quantized
    opts = BenchOptions.parse(backends="torch,onnxruntime,litert", runs=4, warmup=1, repeats=2, images=24)
    result = bench_run(run, art, opts, log=lambda m: None)
    recs = {(r["artifact"], r["backend"]): r for r in result["records"]}
    assert set(recs) == {
        ("pytorch", "torch"),
        ("model.onnx", "onnxruntime"),
        ("model.tflite", "litert"),
        ("model_w8a8.onnx", "onnxruntime"),
        ("model_w8a8.tflite", "litert"),
    }
    assert all(r["status"] == "ok" and r["latency_ms"]["runs"] == 8 for r in recs.values())
    assert recs[("pytorch", "torch")]["snr_db"] == "inf"
    assert recs[("model.onnx", "onnxruntime")]["snr_db"] > 90  # float export: bit-near exact
    # the same artifacts on the same 24 held-out images: bench and quantize must agree exactly
    ours = next(r for r in report["results"] if r["method"]["name"] == "ours")
    for file, key in (("model_w8a8.onnx", "onnx_qdq"), ("model_w8a8.tflite", "tflite_int8")):
        backend = "onnxruntime" if file.endswith("onnx") else "litert"
        assert recs[(file, backend)]["snr_db"] == pytest.approx(ours["artifacts"][key]["output_snr_db"], abs=1e-4)
        assert recs[(file, backend)]["top1"] == pytest.approx(ours["artifacts"][key]["top1"])
    assert recs[("model_w8a8.onnx", "onnxruntime")]["options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert recs[("model_w8a8.tflite", "litert")]["options"]["xnnpack"] is True
    assert {r["artifact"] for r in result["ratios"]} == {"model_w8a8.onnx", "model_w8a8.tflite"}
    assert result["machine"]["cpu"]["model"] and result["options"]["images"] == 24
    on_disk = json.loads((art / "bench.json").read_text())
    assert on_disk["records"] == result["records"]
    md = (art / "bench.md").read_text()
    assert md.count("| format | backend | device | status | size MB | top-1 | SNR dB | ms median | ms p90 | FPS |") == 1
    assert (art / "bench.png").stat().st_size > 5000
    # a second run appends to the log and the history, never overwrites them
    bench_run(run, art, opts, log=lambda m: None)
    assert (art / "bench.md").read_text().count("| format |") == 2
    assert len((art / "bench_history.jsonl").read_text().splitlines()) == 2


def test_bench_without_artifacts_is_one_line_error(tmp_path: Path, repo_root: Path) -> None:
    proc = run_cli(
        "bench",
        "--config",
        str(repo_root / "configs/cifar10_b0w05_after.yaml"),
        "--artifacts",
        str(tmp_path / "none"),
        cwd=repo_root,
    )
    line = assert_one_line_error(proc)
    assert proc.returncode == 2 and "no artifact directory" in line

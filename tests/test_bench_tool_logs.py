"""Parsers of benchmark_model / benchmark_litert_model output, on logs in the tools' real formats
(the line shapes of tflite/tools/benchmark and litert/tools, with the variants older builds
print). Expected values are the printed numbers converted by hand (us -> ms)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from effdeploy.bench.tool_logs import parse_benchmark_litert_model, parse_benchmark_model, parse_stats_line

# a newer LiteRT build on a phone: INFO prefix, percentiles, peak memory monitoring
NEW_LOG = """\
INFO: STARTING!
INFO: Log parameter values verbosely: [0]
INFO: Num threads: [4]
INFO: Graph: [/data/local/tmp/effdeploy/model_w8a8.tflite]
INFO: Loaded model /data/local/tmp/effdeploy/model_w8a8.tflite
INFO: The input model file size (MB): 4.68
INFO: Initialized session in 12.3ms.
INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
INFO: count=41 first=13021 curr=11903 min=11770 max=13021 avg=12112.5 std=270 p5=11790 median=12080 p95=12700

INFO: Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
INFO: count=84 first=11990 curr=11850 min=11702 max=12688 avg=11920.1 std=180 p5=11745 median=11893 p95=12233

INFO: Inference timings in us: Init: 12300, First inference: 13021, Warmup (avg): 12112.5, Inference (avg): 11920.1
INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the \
actual memory footprint of the model at runtime. Take the information at your discretion.
INFO: Memory footprint delta from the start of the tool (MB): init=3.2 overall=9.8
INFO: Overall peak memory footprint (MB) via periodic monitoring: 14.6
INFO: Memory status at the end of exeution:
INFO: - VmRSS              : 48 MB
"""

# a TF 2.x era build: no prefix, no percentiles, "(all same)" glued on as the source prints it
PLAIN_LOG = """\
STARTING!
Num runs: [50]
Graph: [/data/local/tmp/mobilenet.tflite]
Loaded model /data/local/tmp/mobilenet.tflite
The input model file size (MB): 16.9
Initialized session in 4.1ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=3 curr=250000(all same)

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=251000 curr=249000 min=248500 max=260250 avg=251234 std=1803

Inference timings in us: Init: 4100, First inference: 250000, Warmup (avg): 250000, Inference (avg): 251234
Memory footprint delta from the start of the tool (MB): init=20.5 overall=31
"""

# TF1: "Average inference timings", curr= before count=, and TF 2.2's peak memory line
TF1_LOG = """\
Running benchmark for at least 1 iterations and at least 0.5 seconds
curr=105000 count=5 min=98000 max=120000 avg=104400 std=7889
Running benchmark for at least 50 iterations and at least 1 seconds
curr=97000 count=50 min=95500 max=101000 avg=97500.5 std=1200
Average inference timings in us: Warmup: 104400, Init: 35000, Inference: 97500.5
Peak memory footprint (MB): init=2.25 overall=40.5
"""


def test_newer_build_log_in_milliseconds() -> None:
    p = parse_benchmark_model(NEW_LOG)
    inf, warm = p["inference"], p["warmup"]
    assert inf["count"] == 84 and warm["count"] == 41  # the last stats line is the timed loop
    assert inf["avg_ms"] == pytest.approx(11.9201)
    assert inf["min_ms"] == pytest.approx(11.702) and inf["max_ms"] == pytest.approx(12.688)
    assert inf["std_ms"] == pytest.approx(0.180)
    assert inf["first_ms"] == pytest.approx(11.990) and inf["curr_ms"] == pytest.approx(11.850)
    assert (inf["p5_ms"], inf["median_ms"], inf["p95_ms"]) == pytest.approx((11.745, 11.893, 12.233))
    assert warm["first_ms"] == pytest.approx(13.021) and warm["median_ms"] == pytest.approx(12.080)
    assert p["init_ms"] == pytest.approx(12.3)
    assert p["first_inference_ms"] == pytest.approx(13.021)
    assert p["warmup_avg_ms"] == pytest.approx(12.1125)
    assert p["inference_avg_ms"] == pytest.approx(11.9201)
    assert p["model_size_mb"] == pytest.approx(4.68)
    assert (p["init_footprint_mb"], p["overall_footprint_mb"]) == pytest.approx((3.2, 9.8))
    assert p["peak_memory_mb"] == pytest.approx(14.6)
    assert p["delegates"] == [] and p["delegate_failures"] == [] and p["errors"] == []


def test_plain_log_without_percentiles_and_all_same_warmup() -> None:
    p = parse_benchmark_model(PLAIN_LOG)
    inf, warm = p["inference"], p["warmup"]
    assert inf["count"] == 50 and inf["avg_ms"] == pytest.approx(251.234)
    assert inf["median_ms"] is None and inf["p5_ms"] is None  # older builds print no percentiles
    assert warm["all_same"] and warm["count"] == 3
    assert warm["min_ms"] == warm["max_ms"] == warm["avg_ms"] == warm["median_ms"] == pytest.approx(250.0)
    assert warm["std_ms"] == 0.0
    assert p["peak_memory_mb"] is None  # no periodic monitoring asked for
    assert p["overall_footprint_mb"] == pytest.approx(31.0)


def test_tf1_log() -> None:
    p = parse_benchmark_model(TF1_LOG)
    assert p["inference"]["count"] == 50 and p["inference"]["curr_ms"] == pytest.approx(97.0)
    assert p["inference"]["avg_ms"] == pytest.approx(97.5005) and p["inference"]["std_ms"] == pytest.approx(1.2)
    assert p["warmup"]["count"] == 5 and p["warmup"]["max_ms"] == pytest.approx(120.0)
    assert p["warmup_avg_ms"] == pytest.approx(104.4)
    assert p["init_ms"] == pytest.approx(35.0)
    assert p["inference_avg_ms"] == pytest.approx(97.5005)
    assert p["first_inference_ms"] is None
    assert (p["peak_init_mb"], p["peak_memory_mb"]) == pytest.approx((2.25, 40.5))


@pytest.mark.parametrize(
    ("line", "count", "value_ms", "all_same"),
    [
        ("INFO: count=0", 0, None, False),
        ("INFO: count=0 p5=0 median=0 p95=0", 0, None, False),  # percentiles of nothing print as 0
        ("INFO: count=1 curr=800 p5=800 median=800 p95=800", 1, 0.8, True),
        ("count=5 curr=1234(all same)", 5, 1.234, True),  # as stats_calculator.h prints it
        ("count=5 curr=1234 (all same)", 5, 1.234, True),
        ("curr=1500 count=7(all same)", 7, 1.5, True),  # TF1 order
    ],
)
def test_stats_line_variants(line: str, count: int, value_ms: float | None, all_same: bool) -> None:
    s = parse_stats_line(line)
    assert s["count"] == count and s["all_same"] == all_same
    for key in ("min_ms", "max_ms", "avg_ms", "median_ms", "curr_ms"):
        assert s[key] == (None if value_ms is None else pytest.approx(value_ms)), key
    assert s["std_ms"] == (None if value_ms is None else 0.0)


def test_stats_line_big_average_in_exponent_form() -> None:
    """A double of 1e6 us and more prints in exponent form (6 significant digits)."""
    s = parse_stats_line("INFO: count=3 first=1300000 curr=1200000 min=1200000 max=1300000 avg=1.23457e+06 std=47140")
    assert s["avg_ms"] == pytest.approx(1234.57) and s["max_ms"] == pytest.approx(1300.0)


def test_lines_that_are_not_stats_lines() -> None:
    assert parse_stats_line("Timings (microseconds): count=84 first=11990 curr=11850 min=11702") is None
    assert parse_stats_line("INFO: Memory (bytes): count=0") is None
    assert parse_stats_line("INFO: Min num runs: [50]") is None
    # op profiling output mixed into a log does not replace the timed loop
    log = NEW_LOG + "Timings (microseconds): count=1 curr=99\n"
    assert parse_benchmark_model(log)["inference"]["count"] == 84


def test_single_stats_line_is_the_timed_loop() -> None:
    p = parse_benchmark_model("count=50 first=2000 curr=1900 min=1800 max=2100 avg=1950.5 std=50\n")
    assert p["warmup"] is None and p["inference"]["avg_ms"] == pytest.approx(1.9505)


def test_warmup_without_runs_prints_nan_average() -> None:
    text = "INFO: Inference timings in us: Init: 9000, First inference: 0, Warmup (avg): nan, Inference (avg): 500\n"
    p = parse_benchmark_model(text)
    assert p["warmup_avg_ms"] is None and p["first_inference_ms"] == 0.0 and p["inference_avg_ms"] == 0.5


def test_delegate_lines() -> None:
    text = """\
INFO: Created TensorFlow Lite XNNPACK delegate for CPU.
INFO: NNAPI accelerators available: [qti-dsp,qti-gpu,nnapi-reference]
INFO: Explicitly applied NNAPI delegate, and the model graph will be partially executed by the delegate w/ 3 \
delegate kernels.
INFO: Explicitly applied GPU delegate, and the model graph will be completely executed by the delegate.
Though XNNPACK delegate is explicitly applied, the model graph will not be executed by the delegate.
"""
    p = parse_benchmark_model(text)
    assert p["nnapi_accelerators"] == ["qti-dsp", "qti-gpu", "nnapi-reference"]
    assert p["delegates"] == [
        {"delegate": "NNAPI", "coverage": "partial", "kernels": 3},
        {"delegate": "GPU", "coverage": "complete", "kernels": 1},
        {"delegate": "XNNPACK", "coverage": "none", "kernels": 0},
    ]


def test_failed_delegate_and_errors() -> None:
    text = "INFO: STARTING!\nERROR: Failed to apply GPU delegate.\nERROR: Benchmarking failed.\n"
    p = parse_benchmark_model(text)
    assert p["delegate_failures"] == ["GPU"]
    assert p["errors"] == ["Failed to apply GPU delegate.", "Benchmarking failed."]
    assert p["inference"] is None and p["inference_avg_ms"] is None


# benchmark_litert_model (C++): the run loops' stats lines, then its own results block
LITERT_CPP_LOG = """\
INFO: Running benchmark for at least 5 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=5 first=30500 curr=8100 min=8000 max=30500 avg=12600 std=8956 p5=8000 median=8100 p95=30500

INFO: Running benchmark for at least 50 iterations and at least 0 seconds but terminate if exceeding 150 seconds.
INFO: count=50 first=8210 curr=8050 min=7900 max=9400 avg=8123.4 std=210 p5=7950 median=8080 p95=8700

INFO: [benchmark_litert_model.h:71]
========== BENCHMARK RESULTS ==========
INFO: [benchmark_litert_model.h:72] Model initialization: 245.67 ms
INFO: [benchmark_litert_model.h:73] Warmup (first):       30.50 ms
INFO: [benchmark_litert_model.h:75] Warmup (avg):         12.60 ms (5 runs)
INFO: [benchmark_litert_model.h:77] Inference (avg):      8.12 ms (50 runs)
INFO: [benchmark_litert_model.h:81] Inference (min):      7.90 ms
INFO: [benchmark_litert_model.h:83] Inference (max):      9.40 ms
INFO: [benchmark_litert_model.h:85] Inference (std):      0.21
INFO: [benchmark_litert_model.h:93] Throughput:           70.62 MB/s
INFO: [benchmark_litert_model.h:101]
Memory Usage:
INFO: [benchmark_litert_model.h:102] Init footprint:       12.50 MB
INFO: [benchmark_litert_model.h:104] Overall footprint:    20.25 MB
INFO: [benchmark_litert_model.h:109] Peak memory:          35.75 MB
INFO: [benchmark_litert_model.h:115] ======================================
"""


def test_litert_cpp_log_by_label() -> None:
    p = parse_benchmark_litert_model(LITERT_CPP_LOG)
    assert p["init_ms"] == pytest.approx(245.67)
    assert p["warmup_first_ms"] == pytest.approx(30.50)
    assert (p["warmup_avg_ms"], p["warmup_runs"]) == (pytest.approx(12.60), 5)
    assert (p["avg_ms"], p["runs"]) == (pytest.approx(8.12), 50)
    assert (p["min_ms"], p["max_ms"], p["std_ms"]) == pytest.approx((7.90, 9.40, 0.21))
    assert p["median_ms"] is None  # the C++ summary prints none; the stats line has it:
    assert p["inference"]["median_ms"] == pytest.approx(8.080) and p["inference"]["avg_ms"] == pytest.approx(8.1234)
    assert p["throughput_mb_s"] == pytest.approx(70.62)
    assert (p["init_footprint_mb"], p["overall_footprint_mb"], p["peak_memory_mb"]) == pytest.approx(
        (12.5, 20.25, 35.75)
    )
    assert p["fully_accelerated"] is None


def test_litert_python_twin_log() -> None:
    """The padded lines of ai-edge-litert's litert-benchmark (labels padded to one column)."""
    text = (
        "2025-06-01 10:00:00 INFO benchmark_litert_model: Model:           m.tflite\n"
        "2025-06-01 10:00:00 INFO benchmark_litert_model: Warmup runs:     5\n\n"
        + "=" * 40
        + "\n BENCHMARK RESULTS\n"
        + "=" * 40
        + "\nModel initialization:  3.10 ms\n"
        "Warmup (first):        1.90 ms\n"
        "Warmup (avg):          1.20 ms (5 runs)\n"
        "Inference (avg):       1.05 ms (50 runs)\n"
        "Inference (min):       0.98 ms\n"
        "Inference (max):       1.40 ms\n"
        "Inference (median):    1.03 ms\n"
        "Inference (std):       0.07 ms\n"
        "Inference (p5):        0.99 ms\n"
        "Inference (p95):       1.21 ms\n"
        "Throughput:            0.57 MB/s\n"
        "Fully accelerated:     False\n" + "=" * 40 + "\n"
    )
    p = parse_benchmark_litert_model(text)
    assert (p["avg_ms"], p["runs"], p["warmup_runs"]) == (pytest.approx(1.05), 50, 5)
    assert (p["median_ms"], p["p5_ms"], p["p95_ms"]) == pytest.approx((1.03, 0.99, 1.21))
    assert p["std_ms"] == pytest.approx(0.07) and p["init_ms"] == pytest.approx(3.10)
    assert p["fully_accelerated"] is False
    assert p["peak_memory_mb"] is None and p["stats"] == []


def test_litert_python_twin_real_output(tmp_path) -> None:
    """The twin that ships in ai-edge-litert, run for real on a tiny model: its output parses and
    agrees with the JSON it writes beside it."""
    import json

    from test_bench_android import tiny_tflite

    model = tiny_tflite(tmp_path / "tiny.tflite")
    result = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "ai_edge_litert.tools.benchmark_litert_model", f"--model={model}",
         "--num_runs=20", "--warmup_runs=3", f"--result_json={result}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"litert-benchmark does not run here: {proc.stderr.strip().splitlines()[-1][:200]}")
    p = parse_benchmark_litert_model(proc.stdout + proc.stderr)
    lat = json.loads(result.read_text())["latency"]
    assert p["runs"] == lat["num_runs"] == 20 and p["warmup_runs"] == lat["num_warmup_runs"] == 3
    for key in ("avg_ms", "min_ms", "max_ms", "median_ms", "p5_ms", "p95_ms", "std_ms"):
        assert p[key] == pytest.approx(lat[key], abs=0.006), key  # printed with 2 decimals
    assert isinstance(p["fully_accelerated"], bool)

"""The Android bench over adb, end to end against the adb stand-in (tests/fixtures/adb_standin).

The stand-in proves the plumbing and the parsing (device listing, push/pull/shell, quoting,
exit codes, disconnects, the tools' real output formats, logits read back byte for byte); it
never says anything about phone speed: its "phones" are folders, and its benchmark tool runs the
real .tflite with LiteRT on this machine.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effdeploy.bench.android import (
    NNAPI_DEPRECATED,
    bench_android,
    find_adb,
    find_benchmark_binary,
    latency_from_benchmark_model,
    list_devices,
    resolve_option_sets,
)
from effdeploy.bench.tool_logs import parse_benchmark_model
from effdeploy.errors import EffdeployError
from effdeploy.metrics import snr_db, topk_accuracy
from effdeploy.runtime import available_backends, load_backend
from effdeploy.runtime.android_backend import ToolMissing

FIXTURES = Path(__file__).parent / "fixtures" / "adb_standin"
ADB = str(FIXTURES / "adb")
TOOL = FIXTURES / "benchmark_standin.py"

PIXEL = {
    "serial": "PIXEL8",
    "state": "device",
    "model": "Pixel_8",
    "product": "shiba",
    "device": "shiba",
    "transport_id": 3,
    "props": {"ro.build.version.sdk": "35", "ro.build.version.release": "15", "ro.product.model": "Pixel 8"},
}
GALAXY = {
    "serial": "R5CW31XYZ",
    "state": "device",
    "model": "SM_S911B",
    "product": "dm1qxeea",
    "device": "dm1q",
    "transport_id": 4,
    "props": {"ro.build.version.sdk": "33", "ro.build.version.release": "13", "ro.product.model": "SM-S911B"},
}


def tiny_tflite(path: Path, int8: bool = False, input_name: str = "images") -> Path:
    """A real, tiny TFLite classifier written with the flatbuffer schema (milliseconds to build):
    NHWC [1,4,4,3] -> MEAN over H, W -> FULLY_CONNECTED -> 10 logits; float32, or full-integer
    int8 with its own scales."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    rng = np.random.default_rng(1)
    w = rng.normal(size=(10, 3)).astype(np.float32)
    b = rng.normal(scale=0.1, size=10).astype(np.float32)
    buffers = [s.BufferT()]

    def buffer(arr: np.ndarray) -> int:
        bt = s.BufferT()
        bt.data = np.frombuffer(np.ascontiguousarray(arr).tobytes(), np.uint8)
        buffers.append(bt)
        return len(buffers) - 1

    def tensor(name: str, shape: list[int], ttype: int, buf: int = 0, q: tuple | None = None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name, shape, ttype, buf
        if q is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [q[0]], [q[1]]
        return t

    T = s.TensorType
    axes = tensor("axes", [2], T.INT32, buffer(np.array([1, 2], np.int32)))
    if int8:
        s_in, s_w = 1 / 64, float(np.abs(w).max() / 127)
        wq = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
        bq = np.round(b / (s_in * s_w)).astype(np.int32)
        tensors = [
            tensor(input_name, [1, 4, 4, 3], T.INT8, q=(s_in, 0)), axes, tensor("mean", [1, 3], T.INT8, q=(s_in, 0)),
            tensor("w", [10, 3], T.INT8, buffer(wq), q=(s_w, 0)),
            tensor("b", [10], T.INT32, buffer(bq), q=(s_in * s_w, 0)),
            tensor("logits", [1, 10], T.INT8, q=(0.02, 3)),
        ]  # fmt: skip
    else:
        tensors = [
            tensor(input_name, [1, 4, 4, 3], T.FLOAT32), axes, tensor("mean", [1, 3], T.FLOAT32),
            tensor("w", [10, 3], T.FLOAT32, buffer(w)), tensor("b", [10], T.FLOAT32, buffer(b)),
            tensor("logits", [1, 10], T.FLOAT32),
        ]  # fmt: skip
    codes = []
    for code, version in (
        (s.BuiltinOperator.MEAN, 2 if int8 else 1),
        (s.BuiltinOperator.FULLY_CONNECTED, 4 if int8 else 1),
    ):
        oc = s.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, code, version
        codes.append(oc)
    mean = s.OperatorT()
    mean.opcodeIndex, mean.inputs, mean.outputs = 0, [0, 1], [2]
    mean.builtinOptionsType, mean.builtinOptions = s.BuiltinOptions.ReducerOptions, s.ReducerOptionsT()
    fc = s.OperatorT()
    fc.opcodeIndex, fc.inputs, fc.outputs = 1, [2, 3, 4], [5]
    fc.builtinOptionsType, fc.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
    sg = s.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [0], [5], [mean, fc], "main"
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, codes, [sg], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("tiny")
    return {
        "fp32": tiny_tflite(d / "tiny_fp32.tflite"),
        # a TF-style input name: its ':' must be escaped as '::' in --input_layer_value_files
        "int8": tiny_tflite(d / "tiny_w8a8.tflite", int8=True, input_name="serving_default_x:0"),
    }


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (3, 3, 4, 4)).astype(np.float32)


class Phones:
    """The stand-in's state folder: which phones are plugged in, and what each was told."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def connect(self, *devices: dict) -> None:
        (self.root / "devices.json").write_text(json.dumps(list(devices)))

    def commands(self, serial: str) -> list[str]:
        log = self.root / serial / "shell.log"
        return [json.loads(line)["command"] for line in log.read_text().splitlines()] if log.exists() else []

    def fs(self, serial: str) -> Path:
        return self.root / serial / "fs"


@pytest.fixture
def phones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Phones:
    root = tmp_path / "adb_standin"
    root.mkdir()
    monkeypatch.setenv("ADB_STANDIN_ROOT", str(root))
    monkeypatch.setenv("ADB_STANDIN_PYTHON", sys.executable)
    for var in ("ADB", "EFFDEPLOY_BENCHMARK_MODEL", "EFFDEPLOY_BENCHMARK_LITERT_MODEL", "ADB_STANDIN_DISCONNECT",
                "BENCHMARK_STANDIN_OLD"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    return Phones(root)


def _bench(artifacts, serials=None, **kw):
    kw.setdefault("adb", ADB)
    kw.setdefault("binary", TOOL)
    kw.setdefault("runs", 6)
    kw.setdefault("warmup", 2)
    kw.setdefault("log", lambda _line: None)
    return bench_android(list(artifacts), serials, **kw)


def test_two_phones_in_one_call(phones: Phones, tiny: dict) -> None:
    phones.connect(PIXEL, GALAXY)
    recs = _bench([tiny["fp32"]], threads=2, option_sets=["xnnpack", "nnapi"])
    assert [(r.device.split()[0], r.options["option_set"]) for r in recs] == [
        ("PIXEL8", "xnnpack"), ("PIXEL8", "nnapi"), ("R5CW31XYZ", "xnnpack"), ("R5CW31XYZ", "nnapi"),
    ]  # fmt: skip
    assert recs[0].device == "PIXEL8 (Pixel 8, Android 15, API 35)"
    for r in recs:
        assert r.ok, r.status
        assert (r.backend, r.format, r.precision, r.threads) == ("android", "tflite", "fp32", 2)
        lat = r.latency_ms
        # the counts come from the tool's own stats lines: the flags reached it
        assert lat["runs"] == 6 and lat["warmup"] == 2
        assert lat["min"] <= lat["median"] <= lat["max"] and lat["p90"] is None and lat["p99"] is None
        assert r.peak_memory_mb > 0
        assert r.snr_db is None and r.top1 is None  # no images given
    # Android 15 (API 35) deprecates NNAPI: said on that phone's NNAPI record only
    assert NNAPI_DEPRECATED in recs[1].notes and NNAPI_DEPRECATED not in recs[3].notes
    assert "NNAPI delegate runs the whole graph" in recs[1].notes
    assert recs[0].notes == ["XNNPACK delegate runs the whole graph"]
    bench_cmds = [c for c in phones.commands("PIXEL8") if "--graph=" in c]
    assert len(bench_cmds) == 2 and all("--num_threads=2" in c and "--num_runs=6" in c for c in bench_cmds)


def test_delegate_outcomes_become_status_and_notes(phones: Phones, tiny: dict) -> None:
    galaxy = {
        **GALAXY,
        "delegates": {"gpu": "fail", "nnapi": "partial:3"},
        "nnapi_accelerators": ["qti-dsp", "nnapi-reference"],
    }
    phones.connect(galaxy)
    gpu, nnapi, cpu = _bench([tiny["fp32"]], option_sets=["gpu", "nnapi:qti-dsp", "cpu"])
    assert gpu.status == "benchmark_model exited 1: Failed to apply GPU delegate."
    assert gpu.latency_ms is None
    assert nnapi.ok and "--nnapi_accelerator_name=qti-dsp" in nnapi.options["flags"]
    assert "NNAPI delegate runs part of the graph (3 delegate kernels), the rest on the CPU" in nnapi.notes
    assert "NNAPI accelerators: qti-dsp, nnapi-reference" in nnapi.notes
    assert cpu.ok and cpu.notes == []  # --use_xnnpack=false: no delegate at all


def test_disconnect_keeps_what_was_measured(phones: Phones, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    phones.connect(PIXEL, GALAXY)
    # PIXEL8's shell commands: getprop, mkdir, chmod (binary), mkdir (model), then one per option
    # set; after 5 it is gone, so the second option set (cpu) meets the disconnect
    monkeypatch.setenv("ADB_STANDIN_DISCONNECT", "PIXEL8:5")
    lines: list[str] = []
    recs = _bench([tiny["fp32"]], option_sets=["xnnpack", "cpu", "nnapi"], log=lines.append)
    assert "--use_xnnpack=false" in phones.commands("PIXEL8")[5]
    pixel = [r for r in recs if r.device.startswith("PIXEL8")]
    galaxy = [r for r in recs if r.device.startswith("R5CW31XYZ")]
    assert [r.options["option_set"] for r in pixel] == ["xnnpack", "cpu"]
    assert pixel[0].ok and pixel[0].latency_ms["runs"] == 6  # measured before the disconnect: kept
    assert pixel[1].status.startswith("device disconnected:") and "device 'PIXEL8' not found" in pixel[1].status
    assert [r.status for r in galaxy] == ["ok", "ok", "ok"]  # the next phone carries on
    assert any("disconnected" in line for line in lines)
    assert [d["serial"] for d in list_devices(ADB)] == ["R5CW31XYZ"]


def test_disconnect_during_image_runs_keeps_the_latency(
    phones: Phones, tiny: dict, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    phones.connect(PIXEL)
    # getprop, mkdir, chmod, --help, mkdir, the timed run, rm + mkdir of the io folder, image 0;
    # gone at image 1
    monkeypatch.setenv("ADB_STANDIN_DISCONNECT", "PIXEL8:9")
    (rec,) = _bench([tiny["fp32"]], images=images, float_logits=np.ones((3, 10)), option_sets=["xnnpack"])
    assert "--output_filepath=/data/local/tmp/effdeploy/io/out_1.bin" in phones.commands("PIXEL8")[9]
    assert rec.status.startswith("device disconnected:")
    assert rec.latency_ms["runs"] == 6  # measured before the phone left
    assert rec.snr_db is None and rec.images is None


def test_missing_benchmark_model_is_a_skip_naming_where_to_get_it(phones: Phones, tiny: dict) -> None:
    phones.connect(PIXEL)
    (rec,) = _bench([tiny["fp32"]], binary=None)
    assert rec.status.startswith("skipped: benchmark_model not given")
    for hint in ("android_aarch64", "LiteRT releases", "//tflite/tools/benchmark:benchmark_model", "bazel",
                 "--benchmark-model", "EFFDEPLOY_BENCHMARK_MODEL"):  # fmt: skip
        assert hint in rec.status, hint
    assert phones.commands("PIXEL8") == []  # nothing was pushed or run
    with pytest.raises(ToolMissing, match="android_aarch64"):
        find_benchmark_binary(None)


def test_benchmark_model_given_but_absent_names_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFFDEPLOY_BENCHMARK_MODEL", raising=False)
    with pytest.raises(EffdeployError, match="--benchmark-model: .*nope"):
        find_benchmark_binary(tmp_path / "nope")
    monkeypatch.setenv("EFFDEPLOY_BENCHMARK_MODEL", str(tmp_path / "gone"))
    with pytest.raises(EffdeployError, match="EFFDEPLOY_BENCHMARK_MODEL: .*gone"):
        find_benchmark_binary(None)
    monkeypatch.setenv("EFFDEPLOY_BENCHMARK_MODEL", str(TOOL))
    assert find_benchmark_binary(None) == TOOL
    assert find_benchmark_binary(FIXTURES / "adb") == FIXTURES / "adb"  # the explicit path wins


def _fake_exe(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


def test_adb_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = _fake_exe(tmp_path / "explicit" / "adb")
    env = _fake_exe(tmp_path / "env" / "adb")
    on_path = _fake_exe(tmp_path / "path" / "adb")
    bundled = _fake_exe(tmp_path / "site" / "adbutils" / "binaries" / "adb")
    # an installed adbutils whose adb_path() finds its bundled binary
    (tmp_path / "site" / "adbutils" / "__init__.py").write_text(f"def adb_path():\n    return {bundled!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "adbutils", raising=False)
    monkeypatch.setenv("ADB", env)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))

    assert find_adb(explicit) == explicit
    assert find_adb(None) == env
    monkeypatch.delenv("ADB")
    assert find_adb(None) == on_path
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert find_adb(None) == bundled
    # an adbutils without adb_path(): its binaries folder still counts
    (tmp_path / "site" / "adbutils" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "adbutils")
    assert find_adb(None) == bundled
    monkeypatch.setitem(sys.modules, "adbutils", None)  # not installed
    with pytest.raises(ToolMissing, match=r"pip install adbutils.*platform-tools"):
        find_adb(None)
    with pytest.raises(EffdeployError, match="--adb: .*missing"):
        find_adb(str(tmp_path / "missing"))
    monkeypatch.setenv("ADB", str(tmp_path / "nowhere"))
    with pytest.raises(EffdeployError, match="ADB: .*nowhere"):
        find_adb(None)


def test_list_devices_parses_every_state(phones: Phones) -> None:
    phones.connect(
        PIXEL,
        {"serial": "192.168.1.20:5555", "state": "offline", "transport_id": 7},
        {"serial": "0A1B2C", "state": "unauthorized", "transport_id": 8},
    )
    assert list_devices(ADB) == [
        {"serial": "PIXEL8", "state": "device", "model": "Pixel_8", "product": "shiba", "device": "shiba",
         "transport_id": 3},
        {"serial": "192.168.1.20:5555", "state": "offline", "model": None, "product": None, "device": None,
         "transport_id": 7},
        {"serial": "0A1B2C", "state": "unauthorized", "model": None, "product": None, "device": None,
         "transport_id": 8},
    ]  # fmt: skip


def test_phones_that_cannot_run_are_skip_records(phones: Phones, tiny: dict) -> None:
    phones.connect({"serial": "0A1B2C", "state": "unauthorized", "transport_id": 8})
    (rec,) = _bench([tiny["fp32"]])
    assert rec.status == "skipped: no Android phone in state 'device' (adb devices -l lists none)"
    (rec,) = _bench([tiny["fp32"]], ["0A1B2C"])
    assert rec.status == "skipped: 0A1B2C: state unauthorized" and rec.device == "0A1B2C"
    (rec,) = _bench([tiny["fp32"]], ["192.168.1.20:5555"])
    assert rec.status == "skipped: 192.168.1.20:5555: not connected (adb devices -l)"
    assert rec.device == "192.168.1.20:5555"


def test_quoted_arguments_cannot_inject(phones: Phones, tiny: dict, images: np.ndarray, tmp_path: Path) -> None:
    phones.connect(PIXEL)
    model = tmp_path / "tiny model;touch INJECTED.tflite"
    model.write_bytes(tiny["fp32"].read_bytes())
    host = load_backend("litert", tiny["fp32"]).run(images)
    (rec,) = _bench([model], images=images, float_logits=host, option_sets=["xnnpack"])
    assert rec.ok and rec.artifact == model.name and rec.snr_db == float("inf")  # the right file ran
    remote = "/data/local/tmp/effdeploy/" + model.name
    graph = shlex.quote(f"--graph={remote}")
    assert graph == "'--graph=/data/local/tmp/effdeploy/tiny model;touch INJECTED.tflite'"
    commands = phones.commands("PIXEL8")
    assert sum(graph in c for c in commands) == 1 + len(images)  # the timed run and one per image
    assert not list(phones.fs("PIXEL8").rglob("INJECTED*"))  # no injected command ran
    # ... which the stand-in would have shown: the same command unquoted does run it
    subprocess.run([ADB, "-s", "PIXEL8", "shell", f"echo --graph={remote}"], check=True, capture_output=True)
    assert (phones.fs("PIXEL8") / "INJECTED.tflite").exists()


def test_phone_logits_reproduce_the_host(phones: Phones, tiny: dict, images: np.ndarray) -> None:
    """int8 I/O through raw files both ways: the phone's logits are the host LiteRT's, bit for bit,
    so SNR and top-1 measured on the phone equal the host's."""
    phones.connect(PIXEL)
    images = images[:2]
    host = load_backend("litert", tiny["int8"]).run(images)
    reference = load_backend("litert", tiny["fp32"]).run(images)
    labels = np.array([3, 1])
    backend = load_backend("android", tiny["int8"], adb=ADB, binary=TOOL)
    phone = backend.run(images)
    np.testing.assert_array_equal(phone, host)
    assert any("serving_default_x::0:" in c for c in phones.commands("PIXEL8"))  # ':' escaped in the name
    (rec,) = _bench([tiny["int8"]], images=images, float_logits=reference, labels=labels, option_sets=["xnnpack"])
    assert rec.precision == "w8a8" and rec.images == 2
    assert rec.snr_db == pytest.approx(snr_db(reference, host), abs=1e-9)
    assert 10 < rec.snr_db < 60  # int8 logits: a real, finite loss against float
    assert rec.top1 == topk_accuracy(host, labels)


def test_old_benchmark_model_reports_latency_only(
    phones: Phones, tiny: dict, images: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    phones.connect(PIXEL)
    monkeypatch.setenv("BENCHMARK_STANDIN_OLD", "1")
    (rec,) = _bench([tiny["fp32"]], images=images, float_logits=np.zeros((3, 10)), option_sets=["cpu"])
    assert rec.ok and rec.snr_db is None and rec.images is None
    assert any("no --output_filepath" in n for n in rec.notes)
    assert rec.latency_ms["runs"] == 6 and rec.latency_ms["mean"] > 0 and rec.latency_ms["median"] is None
    assert rec.peak_memory_mb > 0  # the old "Peak memory footprint (MB): init=.. overall=.." line
    assert not any("--input_layer_value_files" in c for c in phones.commands("PIXEL8"))
    with pytest.raises(EffdeployError, match="no --output_filepath"):
        load_backend("android", tiny["fp32"], adb=ADB, binary=TOOL)


def test_benchmark_litert_model_gpu_and_npu(phones: Phones, tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    phones.connect(PIXEL, {**GALAXY, "delegates": {"npu": "fail"}})
    monkeypatch.setenv("EFFDEPLOY_BENCHMARK_LITERT_MODEL", str(TOOL))
    recs = _bench([tiny["fp32"]], option_sets=["litert-gpu", "litert-npu"], dispatch_library="/vendor/lib64")
    gpu, npu, gpu2, npu2 = recs
    assert gpu.ok and npu.ok and gpu2.ok, [r.status for r in recs]
    assert npu.options["tool"] == "benchmark_litert_model"
    assert npu.options["flags"] == ["--use_npu=true", "--dispatch_library_path=/vendor/lib64"]
    assert gpu.latency_ms["runs"] == 6 and gpu.latency_ms["warmup"] == 2
    assert gpu.latency_ms["median"] is not None  # from the run loop's stats line
    assert npu2.status.startswith("benchmark_litert_model exited 1: Failed to create compiled model")
    with pytest.raises(EffdeployError, match="dispatch library"):
        _bench([tiny["fp32"]], option_sets=["litert-npu"])


def test_default_option_sets() -> None:
    names = [s["name"] for s in resolve_option_sets(None)]
    assert names == ["xnnpack", "cpu", "gpu", "nnapi"]
    flags = {s["name"]: s["flags"] for s in resolve_option_sets(None, litert=True, npu=True)}
    assert flags["xnnpack"] == ["--use_xnnpack=true"] and flags["cpu"] == ["--use_xnnpack=false"]
    assert flags["gpu"] == ["--use_gpu=true"] and flags["nnapi"] == ["--use_nnapi=true"]
    assert flags["litert-gpu"] == ["--use_gpu=true"] and flags["litert-npu"] == ["--use_npu=true"]
    with pytest.raises(EffdeployError, match="unknown"):
        resolve_option_sets(["tpu"])


def test_latency_record_from_the_readme_log() -> None:
    text = (
        "INFO: count=41 first=13021 curr=11903 min=11770 max=13021 avg=12112.5 std=270\n"
        "INFO: count=84 first=11990 curr=11850 min=11702 max=12688 avg=11920.1 std=180"
        " p5=11745 median=11893 p95=12233\n"
    )
    lat = latency_from_benchmark_model(parse_benchmark_model(text), warmup=5)
    assert lat == {
        "runs": 84, "warmup": 41, "min": pytest.approx(11.702), "median": pytest.approx(11.893), "p90": None,
        "p99": None, "mean": pytest.approx(11.9201), "std": pytest.approx(0.18), "max": pytest.approx(12.688),
        "p5": pytest.approx(11.745), "p95": pytest.approx(12.233),
    }  # fmt: skip


def test_backend_is_registered_and_light_to_import() -> None:
    assert "android" in available_backends()
    code = (
        "import sys, effdeploy.runtime.android_backend\n"
        "print(sorted(m for m in ('torch', 'ai_edge_litert', 'onnxruntime') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_efficientnet_on_the_phone_matches_the_host(phones: Phones, tmp_path: Path) -> None:
    """A real exported (tiny) EfficientNet: SNR and top-1 measured from the phone's outputs equal
    those of the same .tflite run on the host."""
    import torch

    from effdeploy.export.tflite import export_tflite
    from effdeploy.model.efficientnet import build_model

    model = build_model({"variant": "b0", "width_mult": 0.25, "depth_mult": 0.25, "resolution": 32, "num_classes": 10})
    path = export_tflite(model.eval(), tmp_path / "effnet_fp32.tflite")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x).numpy()
    labels = reference.argmax(1)
    host = load_backend("litert", path).run(x.numpy())
    phones.connect(PIXEL)
    (rec,) = _bench([path], images=x.numpy(), float_logits=reference, labels=labels, option_sets=["xnnpack"])
    assert rec.ok, rec.status
    assert rec.snr_db == pytest.approx(snr_db(reference, host), abs=1e-6)
    assert rec.snr_db > 100  # float export: only float rounding separates it from PyTorch (measured 117 dB)
    assert rec.top1 == topk_accuracy(host, labels) == 1.0

"""Third-party noise stays off the terminal unless -v asks for it; effdeploy's own output stays.

The noise strings below are what these libraries printed on a real `effdeploy export` (torch.onnx,
absl and oneDNN from the converter under litert-torch, torchao, LiteRT) and on onnxruntime's
`quantize_static`. The subprocess tests trigger each source for real and read stderr.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from effdeploy import quiet

REPO_ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_SET = REPO_ROOT / "calibration" / "cifar10_train_512_seed0.safetensors"

# One substring per noise source, as the libraries print them.
NOISE = {
    "torch.onnx": "torchvision is not installed. Skipping",
    "absl": "All log messages before absl::InitializeLog()",
    "oneDNN": "oneDNN custom operations are on",
    "onnxruntime": "Please consider",
    "XNNPACK": "Created TensorFlow Lite XNNPACK delegate",
    "third-party warning": "warning raised inside onnxruntime",
}
CALIBRATOR_CHATTER = "Collecting tensor data and making histogram"  # onnxruntime, on stdout
TORCHAO_NOISE = ("Failed to load", "is an Enum subclass")

# Lines copied from a real run's stderr.
REAL_NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796228589.012269    7795 port.cc:153] oneDNN custom operations are on. You may see "
    "slightly different numerical results due to floating-point round-off errors from different "
    "computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n",
    "W1202 16:23:11.249000 7795 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass\n",
]
OUR_LINES = [
    "exporting tflite -> artifacts/cifar10_b0w05_after/model.tflite\n",
    "  w8a8 minmax: top-1 79.42% (-1.48), agreement 94.06%, SNR 15.18 dB (16 s)\n",
    "effdeploy: error: configs/x.yaml: config file not found\n",
    "INFO in a sentence is not a log prefix\n",
    # errors of native libraries are not noise
    "E0000 00:00:1796228589.012269    7795 port.cc:153] something failed\n",
    "F0000 00:00:1796228589.012269    7795 port.cc:153] fatal\n",
]


@pytest.mark.parametrize("line", REAL_NOISE_LINES)
def test_real_noise_lines_are_noise(line: str) -> None:
    assert quiet.is_noise(line)


@pytest.mark.parametrize("line", OUR_LINES)
def test_our_lines_and_native_errors_are_kept(line: str) -> None:
    assert not quiet.is_noise(line)


def test_fd2_capture_drops_noise_and_writes_back_the_rest(capfd: pytest.CaptureFixture) -> None:
    """What a native library writes to fd 2 inside a capture: noise dropped, the rest kept in order;
    nested captures are one; fd 2 is restored afterwards."""
    capture = quiet._Fd2Capture()
    with capture:
        os.write(2, REAL_NOISE_LINES[1].encode())
        os.write(2, b"first kept line\n")
        with capture:  # nested: still captured, written back only when the outer one closes
            os.write(2, REAL_NOISE_LINES[2].encode())
            os.write(2, b"second kept line\n")
        assert capfd.readouterr().err == ""  # nothing has reached the real stderr yet
    os.write(2, b"after the capture\n")
    assert capfd.readouterr().err == "first kept line\nsecond kept line\nafter the capture\n"


def test_root_logger_filter_drops_only_third_party_warnings() -> None:
    def record(path: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("root", level, path, 1, "msg", None, None)

    ort = "/venv/lib/python3.11/site-packages/onnxruntime/quantization/quantize.py"
    assert not quiet._root_filter(record(ort, logging.WARNING))
    assert quiet._root_filter(record(ort, logging.ERROR))  # errors still reach the user
    assert quiet._root_filter(record("/work/main/effdeploy/quant/peers.py", logging.WARNING))
    assert quiet._root_filter(record("/home/u/my_onnxruntime_notes.py", logging.WARNING))


# A script that sets off every noise source cheaply, and prints lines of its own to stderr.
PROBE = textwrap.dedent(
    """
    import os, sys, warnings, logging
    if os.environ.get("QUIET") == "1":
        from effdeploy.quiet import quiet_third_party
        quiet_third_party(verbose=os.environ.get("VERBOSE") == "1")
    import numpy as np

    def ours(msg):
        print("ours: " + msg, file=sys.stderr, flush=True)

    ours("start")
    from torch.onnx._internal.exporter import _registration
    _registration._get_overload("torchvision::nms")  # what the ONNX exporter does for torchvision ops
    import litert_converter.mlir.ir  # the converter's native library (absl, oneDNN)
    ours("imported the converter")

    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1] + "/f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": np.ones((1, 4), np.float32)}])
        def get_next(self):
            return next(self.batches, None)

    quantize_static(sys.argv[1] + "/f.onnx", sys.argv[1] + "/q.onnx", Reader(), quant_format=QuantFormat.QDQ)
    quantize_static(
        sys.argv[1] + "/f.onnx", sys.argv[1] + "/p.onnx", Reader(), quant_format=QuantFormat.QDQ,
        calibrate_method=CalibrationMethod.Percentile)  # a histogram calibrator: prints to stdout
    ours("quantized with onnxruntime")

    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_litert.interpreter import Interpreter
    m = s.ModelT(); m.version = 3; m.buffers = [s.BufferT(), s.BufferT(), s.BufferT()]
    code = s.OperatorCodeT(); code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.ADD; code.version = 1
    m.operatorCodes = [code]
    tensors = []
    for i, name in enumerate(("x", "y")):
        t = s.TensorT(); t.shape = [1, 4]; t.type = s.TensorType.FLOAT32; t.buffer = i + 1; t.name = name
        tensors.append(t)
    op = s.OperatorT(); op.opcodeIndex = 0; op.inputs = [0, 0]; op.outputs = [1]
    op.builtinOptionsType = s.BuiltinOptions.AddOptions; op.builtinOptions = s.AddOptionsT()
    g = s.SubGraphT(); g.tensors = tensors; g.inputs = [0]; g.outputs = [1]; g.operators = [op]
    m.subgraphs = [g]
    interp = Interpreter(model_content=bytes(flatbuffer_utils.convert_object_to_bytearray(m)), num_threads=1)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], np.full((1, 4), 1.5, np.float32))
    interp.invoke()
    ours("litert computed %s" % interp.get_tensor(interp.get_output_details()[0]["index"]).tolist())

    warnings.warn_explicit(
        "a warning raised inside onnxruntime", UserWarning, "q.py", 1, module="onnxruntime.quantization"
    )
    warnings.warn("ours: our own warning")
    logging.getLogger("effdeploy.probe").error("ours: an error log")
    if os.environ.get("TORCHAO") == "1":
        import torchao
        ours("imported torchao")
    print("ours: done")
    """
)

OUR_STDERR = [
    "ours: start",
    "ours: imported the converter",
    "ours: quantized with onnxruntime",
    "ours: litert computed [[3.0, 3.0, 3.0, 3.0]]",
    "ours: our own warning",
    "ours: an error log",
]


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONWARNINGS": "", **env},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("ours: done\n")
    return proc


def test_quiet_removes_every_noise_source_and_keeps_ours(tmp_path: Path) -> None:
    proc = _probe(tmp_path, QUIET="1")
    assert proc.stdout == "ours: done\n"  # no calibrator chatter
    for source, text in NOISE.items():
        assert text not in proc.stderr, f"{source} noise reached stderr:\n{proc.stderr}"
    for line in OUR_STDERR:
        assert line in proc.stderr
    # our own lines, in order, and nothing else but the warning's source line
    kept = [line for line in proc.stderr.splitlines() if line.startswith("ours") or "ours: " in line]
    assert [next(o for o in OUR_STDERR if o in k) for k in kept] == OUR_STDERR


@pytest.mark.slow
@pytest.mark.parametrize("env", [{}, {"QUIET": "1", "VERBOSE": "1"}], ids=["not-called", "verbose"])
def test_verbose_and_unquieted_runs_show_the_noise(tmp_path: Path, env: dict) -> None:
    """The probe really sets off every source (else the quiet test proves nothing), and
    ``verbose=True`` leaves all of it in place."""
    proc = _probe(tmp_path, **env)
    assert CALIBRATOR_CHATTER in proc.stdout
    for source, text in NOISE.items():
        assert text in proc.stderr, f"{source} noise missing with {env}:\n{proc.stderr}"
    for line in OUR_STDERR:
        assert line in proc.stderr


@pytest.mark.slow
def test_quiet_silences_torchao(tmp_path: Path) -> None:
    loud = _probe(tmp_path, TORCHAO="1")
    for text in TORCHAO_NOISE:
        assert text in loud.stderr
    quiet_run = _probe(tmp_path, TORCHAO="1", QUIET="1")
    for text in TORCHAO_NOISE:
        assert text not in quiet_run.stderr
    assert "ours: imported torchao" in quiet_run.stderr


@pytest.mark.slow
def test_cli_export_is_quiet_by_default_and_loud_with_v(tmp_path: Path) -> None:
    """`effdeploy export` of a tiny model: our progress and fidelity table, no library noise;
    with -v the libraries speak again."""
    import yaml

    from effdeploy.config import ModelConfig
    from effdeploy.model.checkpoints import save_checkpoint
    from effdeploy.model.efficientnet import EfficientNet

    if not CALIBRATION_SET.is_file():
        pytest.skip(f"shipped calibration set missing: {CALIBRATION_SET}")
    model_cfg = {
        "variant": "b0",
        "width_mult": 0.25,
        "depth_mult": 0.5,
        "resolution": 32,
        "num_classes": 10,
        "preprocess": {"resize": "resize", "interpolation": "bilinear"},
    }
    ckpt = save_checkpoint(EfficientNet(ModelConfig(**model_cfg)), tmp_path / "model.safetensors")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "checkpoint": str(ckpt),
                "model": model_cfg,
                "export": {"fidelity_data": str(CALIBRATION_SET), "fidelity_images": 4, "threads": 1},
            }
        )
    )
    exe = Path(sys.executable).with_name("effdeploy")
    env = {k: v for k, v in os.environ.items() if k != "EFFDEPLOY_VERBOSE"}

    def export(out: str, *options: str, verbose: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [
                str(exe),
                *(["-v"] if verbose else []),
                "export",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / out),
                *options,
            ],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc

    quiet_run = export("quiet")
    assert "exporting onnx ->" in quiet_run.stderr and "exporting tflite ->" in quiet_run.stderr
    assert "manifest:" in quiet_run.stdout and "100.00%" in quiet_run.stdout
    for text in (NOISE["torch.onnx"], NOISE["absl"], NOISE["oneDNN"], NOISE["XNNPACK"], *TORCHAO_NOISE):
        assert text not in quiet_run.stderr, quiet_run.stderr
    assert [line for line in quiet_run.stderr.splitlines() if line.strip()] == [
        f"exporting onnx -> {tmp_path / 'quiet' / 'model.onnx'}",
        f"exporting tflite -> {tmp_path / 'quiet' / 'model.tflite'}",
    ]

    loud = export("loud", "--formats", "tflite", verbose=True)
    for text in (NOISE["absl"], NOISE["XNNPACK"]):
        assert text in loud.stderr

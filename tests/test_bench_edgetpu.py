"""The Coral Edge TPU path of the bench: preflight of a .tflite against coral.ai's model
requirements, the edgetpu_compiler driver and its output parser, the libedgetpu backend, and
bench records that say why a step could not run.

Fast tests build small TFLite flatbuffers by hand (one rule each; the passing one also runs in
LiteRT, so the builder makes real models). Slow tests emit our int8 EfficientNet and a float
export with the project's own emitters. No Coral tool is installed here: the compiler's output is
read from real-format fixtures (tests/fixtures/edgetpu/README.md) and a stand-in script.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from effdeploy.bench import edgetpu as bench_mod
from effdeploy.bench.edgetpu import bench_edgetpu
from effdeploy.bench.edgetpu_compiler import (
    INSTALL_HINT,
    CompileResult,
    Skipped,
    compile_edgetpu,
    format_size,
    parse_compiler_output,
    parse_operation_log,
    parse_size,
    parse_table,
)
from effdeploy.bench.edgetpu_preflight import (
    AFTER_UNMAPPED,
    DATA_TYPE,
    LIMITATION,
    MAPPED,
    NOT_SUPPORTED,
    RANK,
    OpRow,
    format_preflight,
    preflight,
)
from effdeploy.errors import EffdeployError
from effdeploy.runtime import load_backend

FIXTURES = Path(__file__).parent / "fixtures" / "edgetpu"


def _libedgetpu_installed() -> bool:
    try:
        ctypes.CDLL("libedgetpu.so.1")
    except OSError:
        return False
    return True


needs_no_libedgetpu = pytest.mark.skipif(_libedgetpu_installed(), reason="libedgetpu is installed on this machine")


# --- a hand-built TFLite flatbuffer ---------------------------------------------------------


class Graph:
    """Tensors and operators of one subgraph, packed with LiteRT's schema object API."""

    def __init__(self) -> None:
        self.tensors: list[dict] = []
        self.ops: list[tuple] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    def tensor(self, shape, dtype="INT8", data=None, q=(0.05, 0), sig=None) -> int:
        self.tensors.append({"shape": list(shape), "dtype": dtype, "data": data, "q": q, "sig": sig})
        return len(self.tensors) - 1

    def const(self, values, dtype, q=None) -> int:
        arr = np.asarray(values, {"INT8": np.int8, "INT32": np.int32, "FLOAT32": np.float32}.get(dtype, np.int8))
        return self.tensor(arr.shape, dtype, data=arr.tobytes(), q=q)

    def op(self, kind, inputs, outputs, options=None, custom=None) -> None:
        self.ops.append((kind, list(inputs), list(outputs), options, custom))


def tflite_bytes(*graphs: Graph) -> bytes:
    from ai_edge_litert import schema_py_generated as S
    from ai_edge_litert.tools import flatbuffer_utils

    model = S.ModelT()
    model.version, model.description = 3, b"effdeploy test model"
    model.buffers, model.operatorCodes, model.subgraphs = [S.BufferT()], [], []
    codes: dict[tuple, int] = {}
    for g in graphs:
        sg = S.SubGraphT()
        sg.tensors, sg.operators, sg.inputs, sg.outputs, sg.name = [], [], list(g.inputs), list(g.outputs), b"main"
        for i, spec in enumerate(g.tensors):
            t = S.TensorT()
            t.name, t.shape, t.type = f"t{i}".encode(), spec["shape"], getattr(S.TensorType, spec["dtype"])
            if spec["sig"] is not None:
                t.shapeSignature = spec["sig"]
            if spec["q"] is not None:
                q = S.QuantizationParametersT()
                q.scale, q.zeroPoint = [float(spec["q"][0])], [int(spec["q"][1])]
                t.quantization = q
            buf = S.BufferT()
            if spec["data"] is not None:
                buf.data = np.frombuffer(spec["data"], np.uint8).copy()
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
            sg.tensors.append(t)
        for kind, ins, outs, options, custom in g.ops:
            if (kind, custom) not in codes:
                c = S.OperatorCodeT()
                c.builtinCode = getattr(S.BuiltinOperator, kind)
                c.deprecatedBuiltinCode, c.version = min(c.builtinCode, 127), 1
                c.customCode = custom.encode() if custom else None
                codes[(kind, custom)] = len(model.operatorCodes)
                model.operatorCodes.append(c)
            o = S.OperatorT()
            o.opcodeIndex, o.inputs, o.outputs = codes[(kind, custom)], ins, outs
            if options is not None:
                o.builtinOptionsType = getattr(S.BuiltinOptions, type(options).__name__[:-1])
                o.builtinOptions = options
            sg.operators.append(o)
        model.subgraphs.append(sg)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _options(name: str, **fields):
    from ai_edge_litert import schema_py_generated as S

    o = getattr(S, name)()
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def stem_head(
    *,
    act="LOGISTIC",
    mean_axes=(1, 2),
    channels=4,
    dilation=(1, 1),
    weight_dtype="INT8",
    batch=1,
    sig=None,
) -> Graph:
    """PAD -> CONV_2D -> act -> MUL -> DEPTHWISE_CONV_2D -> MEAN -> RESHAPE -> FULLY_CONNECTED,
    int8 throughout with int32 biases: the shape of our network's stem, one block and its head."""
    g = Graph()
    s = 0.05
    x = g.tensor([batch, 8, 8, 3], sig=sig)
    padded = g.tensor([batch, 10, 10, 3])
    g.op("PAD", [x, g.const([[0, 0], [1, 1], [1, 1], [0, 0]], "INT32")], [padded])
    w = g.const(np.ones((channels, 3, 3, 3)), weight_dtype, q=(s, 0))
    conv = g.tensor([batch, 8, 8, channels])
    conv_opts = _options("Conv2DOptionsT", padding=1, strideW=1, strideH=1)
    g.op("CONV_2D", [padded, w, g.const(np.zeros(channels), "INT32", q=(s * s, 0))], [conv], conv_opts)
    gate = g.tensor([batch, 8, 8, channels], q=(1 / 256, -128))
    g.op(act, [conv], [gate])
    mul = g.tensor([batch, 8, 8, channels])
    g.op("MUL", [conv, gate], [mul], _options("MulOptionsT"))
    dw_w = g.const(np.ones((1, 3, 3, channels)), "INT8", q=(s, 0))
    dw = g.tensor([batch, 8, 8, channels])
    dw_opts = _options(
        "DepthwiseConv2DOptionsT", padding=0, strideW=1, strideH=1, depthMultiplier=1,
        dilationHFactor=dilation[0], dilationWFactor=dilation[1],
    )  # fmt: skip
    g.op("DEPTHWISE_CONV_2D", [mul, dw_w, g.const(np.zeros(channels), "INT32", q=(s * s, 0))], [dw], dw_opts)
    kept = [1 if i in {a % 4 for a in mean_axes} else d for i, d in enumerate([batch, 8, 8, channels])]
    pooled = g.tensor(kept)
    g.op("MEAN", [dw, g.const(list(mean_axes), "INT32")], [pooled], _options("ReducerOptionsT", keepDims=True))
    flat = g.tensor([batch, channels])
    g.op("RESHAPE", [pooled, g.const([batch, channels], "INT32")], [flat])
    logits = g.tensor([batch, 10], q=(0.1, 0))
    fc_w = g.const(np.ones((10, channels)), "INT8", q=(s, 0))
    fc_b = g.const(np.zeros(10), "INT32", q=(s * s, 0))
    g.op("FULLY_CONNECTED", [flat, fc_w, fc_b], [logits], _options("FullyConnectedOptionsT"))
    g.inputs, g.outputs = [x], [logits]
    return g


def write(tmp_path: Path, name: str, *graphs: Graph) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_bytes(tflite_bytes(*graphs))
    return path


def statuses(p) -> list[tuple[str, int, str]]:
    return [(r.operator, r.count, r.status) for r in p.rows]


# --- preflight ------------------------------------------------------------------------------

STEM_HEAD_OPS = ["PAD", "CONV_2D", "LOGISTIC", "MUL", "DEPTHWISE_CONV_2D", "MEAN", "RESHAPE", "FULLY_CONNECTED"]


def test_preflight_passes_a_full_int8_model_that_litert_runs(tmp_path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    path = write(tmp_path, "model_w8a8.tflite", stem_head())
    it = Interpreter(model_path=str(path))  # the builder makes real models: LiteRT runs this one
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    it.set_tensor(inp["index"], np.zeros(inp["shape"], np.int8))
    it.invoke()
    assert it.get_tensor(it.get_output_details()[0]["index"]).shape == (1, 10)

    p = preflight(path)
    assert statuses(p) == [(op, 1, MAPPED) for op in STEM_HEAD_OPS]
    assert p.passed and p.problems == []
    assert (p.total_ops, p.ops_on_edgetpu, p.ops_on_cpu) == (8, 8, 0)
    assert p.input_dtypes == ["INT8"] and p.weight_dtypes == ["INT32", "INT8"]


def test_an_unsupported_op_sends_every_later_op_to_the_cpu(tmp_path) -> None:
    """HARD_SWISH is not in the Edge TPU op table; without -a the compiler maps one segment."""
    p = preflight(write(tmp_path, "hs.tflite", stem_head(act="HARD_SWISH")))
    assert statuses(p) == [
        ("PAD", 1, MAPPED),
        ("CONV_2D", 1, MAPPED),
        ("HARD_SWISH", 1, NOT_SUPPORTED),
        *[(op, 1, AFTER_UNMAPPED) for op in STEM_HEAD_OPS[3:]],
    ]
    assert (p.ops_on_edgetpu, p.ops_on_cpu) == (2, 6) and not p.passed
    assert "HARD_SWISH is not in the Edge TPU's supported-op table" in p.problems
    assert "5 operators after op 2 (HARD_SWISH) run on the CPU: one segment is mapped (no -a)" in p.problems


@pytest.mark.parametrize(
    ("axes", "channels", "mapped"),
    [
        ((1, 2), 4, True),  # spatial mean: what our network does
        ((0,), 4, False),  # over the batch dimension
        ((-4,), 4, False),  # the batch dimension, counted from the end
        ((3,), 8, True),  # z-reduction over a multiple of 4 channels
        ((3,), 6, False),  # z-reduction over 6 channels
    ],
)
def test_mean_limitations(tmp_path, axes, channels, mapped) -> None:
    p = preflight(write(tmp_path, "m.tflite", stem_head(mean_axes=axes, channels=channels)))
    row = next(r for r in p.rows if r.operator == "MEAN")
    assert row.status == (MAPPED if mapped else LIMITATION)
    assert p.passed == mapped
    if not mapped:  # the ops after MEAN leave the Edge TPU too
        assert [r.status for r in p.rows if r.operator in ("RESHAPE", "FULLY_CONNECTED")] == [AFTER_UNMAPPED] * 2


def test_fully_connected_output_must_be_one_dimensional(tmp_path) -> None:
    """coral.ai: 'Output tensor is one-dimensional': [1, N] is, [1, 2, N] (keep_num_dims) is not."""
    g = stem_head()
    g.tensors[g.outputs[0]]["shape"] = [1, 2, 5]
    p = preflight(write(tmp_path, "fc.tflite", g))
    assert statuses(p)[-1] == ("FULLY_CONNECTED", 1, LIMITATION)
    assert "FULLY_CONNECTED: output [1, 2, 5] is not one-dimensional" in p.problems


def test_depthwise_dilation_must_match_in_x_and_y(tmp_path) -> None:
    assert preflight(write(tmp_path, "d22.tflite", stem_head(dilation=(2, 2)))).passed
    p = preflight(write(tmp_path, "d21.tflite", stem_head(dilation=(2, 1))))
    assert ("DEPTHWISE_CONV_2D", 1, LIMITATION) in statuses(p)
    assert "DEPTHWISE_CONV_2D: dilation 2 in y but 1 in x (must be the same)" in p.problems


def test_only_three_innermost_dimensions_may_exceed_one(tmp_path) -> None:
    """Batch 2 makes a 4-D activation with a non-trivial 4th dimension: the rank rule fails on the
    very first op; the 5-D [1, 1, 8, 8, 3] shape only has ones outside the innermost three."""
    p = preflight(write(tmp_path, "b2.tflite", stem_head(batch=2)))
    assert statuses(p)[0] == ("PAD", 1, RANK) and p.ops_on_edgetpu == 0
    g = Graph()
    x, y = g.tensor([1, 1, 8, 8, 3]), g.tensor([1, 1, 8, 8, 3])
    g.op("RELU", [x], [y])
    g.inputs, g.outputs = [x], [y]
    assert statuses(preflight(write(tmp_path, "r5.tflite", g))) == [("RELU", 1, MAPPED)]


def test_dynamic_shapes_fail(tmp_path) -> None:
    p = preflight(write(tmp_path, "dyn.tflite", stem_head(sig=[-1, 8, 8, 3])))
    assert not p.passed and p.ops_on_cpu == 0
    assert p.problems == ["dynamic-sized tensors (1, e.g. 't0'): the compiler needs static sizes"]


def test_exactly_one_subgraph(tmp_path) -> None:
    second = Graph()
    a, b = second.tensor([1, 4]), second.tensor([1, 4])
    second.op("RELU", [a], [b])
    second.inputs, second.outputs = [a], [b]
    p = preflight(write(tmp_path, "two.tflite", stem_head(), second))
    assert statuses(p)[-1] == ("RELU", 1, AFTER_UNMAPPED)
    assert "2 subgraphs: the Edge TPU compiler supports exactly one" in p.problems and not p.passed


def test_int4_weights_are_an_unsupported_data_type(tmp_path) -> None:
    """Our W4A8 TFLite stores conv weights as INT4: the Edge TPU is 8-bit only."""
    p = preflight(write(tmp_path, "w4.tflite", stem_head(weight_dtype="INT4")))
    assert statuses(p)[:3] == [("PAD", 1, MAPPED), ("CONV_2D", 1, DATA_TYPE), ("LOGISTIC", 1, AFTER_UNMAPPED)]
    assert "CONV_2D: INT4 constant (must be int8/uint8, or int32 for biases)" in p.problems


def test_float_io_runs_quantize_and_dequantize_on_the_cpu_without_splitting(tmp_path) -> None:
    """A QUANTIZE of a float input and a DEQUANTIZE to a float output stay on the CPU at the
    graph's edges; the int8 body between them maps. effdeploy wants int8 I/O, so it fails."""
    g = Graph()
    xf, yf = g.tensor([1, 8], "FLOAT32", q=None), g.tensor([1, 8], "FLOAT32", q=None)
    x8, y8 = g.tensor([1, 8]), g.tensor([1, 8])
    g.op("QUANTIZE", [xf], [x8])
    g.op("RELU", [x8], [y8])
    g.op("DEQUANTIZE", [y8], [yf])
    g.inputs, g.outputs = [xf], [yf]
    p = preflight(write(tmp_path, "fio.tflite", g))
    assert statuses(p) == [("QUANTIZE", 1, DATA_TYPE), ("RELU", 1, MAPPED), ("DEQUANTIZE", 1, DATA_TYPE)]
    assert "model input is FLOAT32: full-integer models have int8/uint8 I/O" in p.problems
    assert "model output is FLOAT32: full-integer models have int8/uint8 I/O" in p.problems


def test_preflight_of_a_file_that_is_not_tflite(tmp_path) -> None:
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"\0" * 64)
    with pytest.raises(EffdeployError, match="x.tflite: not a TFLite model"):
        preflight(bad)
    with pytest.raises(EffdeployError, match="missing.tflite: TFLite model not found"):
        preflight(tmp_path / "missing.tflite")


def test_format_preflight_prints_the_compilers_table(tmp_path) -> None:
    """Same columns as the compiler: the header line is byte-for-byte the one in its output, and
    the table reads back through the compiler-output parser."""
    p = preflight(write(tmp_path, "hs.tflite", stem_head(act="HARD_SWISH")))
    text = format_preflight(p)
    published = (FIXTURES / "partly_mapped.stdout").read_text().splitlines()
    real_header = next(line for line in published if line.startswith("Operator"))
    assert real_header in text.splitlines()
    assert "HARD_SWISH                     1          Operation not supported" in text.splitlines()
    assert parse_table(text) == p.rows
    assert "Number of operations that will run on Edge TPU: 2" in text
    assert "FAIL: 6 of 8 operations would not run on the Edge TPU" in text


# --- compiler output ------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("0.00B") == 0
    assert parse_size("768.00B") == 768
    assert parse_size("604.50KiB") == 619008  # 604.5 * 1024
    assert parse_size("3.45MiB") == 3617587  # 3.45 * 1048576 = 3617587.2
    with pytest.raises(ValueError):
        parse_size("12 MB")
    for printed in ("0.00B", "768.00B", "604.50KiB", "1.41MiB", "7.35MiB"):
        assert format_size(parse_size(printed)) == printed


def test_parse_fully_mapped_output() -> None:
    r = parse_compiler_output((FIXTURES / "fully_mapped.stdout").read_text())
    assert r.outcome == "success" and r.ok and r.error is None
    assert r.compiler_version == "16.0.384591198" and r.compile_ms == 1184
    assert (r.total_ops, r.ops_on_edgetpu, r.ops_on_cpu, r.edgetpu_subgraphs) == (238, 238, 0, 1)
    assert r.on_chip_used_bytes == 1478492  # 1.41 MiB = 1478492.16 B
    assert r.on_chip_remaining_bytes == 6228541  # 5.94 MiB = 6228541.44 B
    assert r.off_chip_bytes == 0
    assert len(r.rows) == 9 and all(row.status == MAPPED for row in r.rows)
    assert OpRow("CONV_2D", 65, MAPPED) in r.rows and OpRow("SUM", 1, MAPPED) in r.rows


def test_parse_partly_mapped_output() -> None:
    r = parse_compiler_output((FIXTURES / "partly_mapped.stdout").read_text())
    assert r.outcome == "partial" and r.ok
    assert (r.total_ops, r.ops_on_edgetpu, r.ops_on_cpu, r.edgetpu_subgraphs) == (189, 2, 187, 1)
    assert r.on_chip_used_bytes == 768 and r.on_chip_remaining_bytes == 7707034  # 7.35 MiB = 7707033.6 B
    assert len(r.rows) == 12 and sum(row.count for row in r.rows) == 189
    assert r.rows[1] == OpRow("HARD_SWISH", 49, NOT_SUPPORTED)
    assert [row for row in r.rows if row.status == MAPPED] == [OpRow("CONV_2D", 1, MAPPED), OpRow("PAD", 1, MAPPED)]
    assert "2/189 ops on the Edge TPU, 187 on the CPU" in r.summary()


def test_parse_operation_logs_match_stdout_tables() -> None:
    for stdout, log in (
        ("fully_mapped.stdout", "model_w8a8_edgetpu.log"),
        ("partly_mapped.stdout", "model_hswish_w8a8_edgetpu.log"),
    ):
        version, rows = parse_operation_log((FIXTURES / log).read_text())
        assert version == "16.0.384591198"
        assert rows == parse_table((FIXTURES / stdout).read_text()) and rows


def test_table_from_the_log_when_stdout_has_none() -> None:
    """Without -s the compiler prints no table; the counts then come from the .log."""
    text = (FIXTURES / "partly_mapped.stdout").read_text()
    no_table = text[: text.index("Operator ")] + "See the operation log file for individual operation details.\n"
    no_table = no_table.replace("Number of operations that will run on Edge TPU: 2\n", "")
    no_table = no_table.replace("Number of operations that will run on CPU: 187\n", "")
    r = parse_compiler_output(no_table, 0, (FIXTURES / "model_hswish_w8a8_edgetpu.log").read_text())
    assert (r.ops_on_edgetpu, r.ops_on_cpu, len(r.rows)) == (2, 187, 12) and r.outcome == "partial"


def test_parse_failures() -> None:
    assert parse_compiler_output((FIXTURES / "not_quantized.stdout").read_text(), None).outcome == "failure"
    r = parse_compiler_output((FIXTURES / "not_quantized.stdout").read_text(), 1)
    assert r.outcome == "failure" and not r.ok
    assert r.error == "Invalid model: model_fp32.tflite; Model not quantized"
    r = parse_compiler_output((FIXTURES / "dynamic_shape.stdout").read_text(), 1)
    assert r.outcome == "failure" and "only supports static-sized tensors" in r.error
    assert r.summary().startswith("edgetpu_compiler 16.0.384591198: compilation failed (ERROR: Attempting")


# --- compiler driver ------------------------------------------------------------------------

STAND_IN = '''#!{python}
"""Stand-in for edgetpu_compiler. It proves effdeploy's driver plumbing and output parsing
only: it compiles nothing. It records its arguments, prints real-format compiler output from a
fixture, and writes <name>_edgetpu.tflite and <name>_edgetpu.log into the -o directory as the
real compiler does."""
import json, shutil, sys
from pathlib import Path

args = sys.argv[1:]
Path({argv!r}).write_text(json.dumps(args))
out_dir, model = Path(args[args.index("-o") + 1]), Path(args[-1])
sys.stdout.write(Path({stdout!r}).read_text())
if {rc} == 0:
    shutil.copyfile({compiled!r} or model, out_dir / (model.stem + "_edgetpu.tflite"))
    shutil.copyfile({log!r}, out_dir / (model.stem + "_edgetpu.log"))
sys.exit({rc})
'''


def stand_in(directory: Path, stdout: str, log: str, rc: int = 0, compiled: Path | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    exe = directory / "edgetpu_compiler"
    exe.write_text(
        STAND_IN.format(
            python=sys.executable,
            argv=str(directory / "argv.json"),
            stdout=str(FIXTURES / stdout),
            log=str(FIXTURES / log),
            rc=rc,
            compiled=str(compiled) if compiled else "",
        )
    )
    exe.chmod(0o755)
    return exe


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("EDGETPU_COMPILER", raising=False)


def test_missing_compiler_is_a_skip(tmp_path, no_compiler) -> None:
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    r = compile_edgetpu(model, tmp_path / "out")
    assert r == Skipped(f"edgetpu_compiler not found: {INSTALL_HINT}")
    assert r.reason.startswith("edgetpu_compiler not found: it runs on x86-64 Linux; install from Coral's apt")


def test_a_named_compiler_that_is_not_there_is_an_error(tmp_path, no_compiler, monkeypatch) -> None:
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    with pytest.raises(EffdeployError, match="nowhere/edgetpu_compiler: edgetpu_compiler not found"):
        compile_edgetpu(model, tmp_path / "out", compiler=tmp_path / "nowhere" / "edgetpu_compiler")
    monkeypatch.setenv("EDGETPU_COMPILER", str(tmp_path / "gone"))
    with pytest.raises(EffdeployError, match=r"from \$EDGETPU_COMPILER"):
        compile_edgetpu(model, tmp_path / "out")


def test_stand_in_compiler_on_path_end_to_end(tmp_path, no_compiler, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    stand_in(bin_dir, "partly_mapped.stdout", "model_hswish_w8a8_edgetpu.log")
    monkeypatch.setenv("PATH", str(bin_dir))
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    out = tmp_path / "out dir"  # a space: arguments go to the compiler as a list, never a shell
    r = compile_edgetpu(model, out)
    assert isinstance(r, CompileResult) and r.outcome == "partial"
    assert json.loads((bin_dir / "argv.json").read_text()) == ["-s", "-o", str(out), str(model)]
    assert r.command == [str(bin_dir / "edgetpu_compiler"), "-s", "-o", str(out), str(model)]
    assert r.model == str(out / "model_w8a8_edgetpu.tflite") and Path(r.model).is_file()
    assert r.log == str(out / "model_w8a8_edgetpu.log")
    assert (r.ops_on_edgetpu, r.ops_on_cpu, r.total_ops) == (2, 187, 189)


def test_failed_compilation_leaves_no_stale_model(tmp_path, no_compiler) -> None:
    exe = stand_in(tmp_path / "bin", "not_quantized.stdout", "model_w8a8_edgetpu.log", rc=1)
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_w8a8_edgetpu.tflite").write_bytes(b"from an earlier run")
    r = compile_edgetpu(model, out, compiler=exe)
    assert r.outcome == "failure" and r.returncode == 1 and r.model is None
    assert r.error == "Invalid model: model_fp32.tflite; Model not quantized"
    assert not (out / "model_w8a8_edgetpu.tflite").exists()


# --- the Edge TPU backend -------------------------------------------------------------------


def compiled_model(tmp_path: Path) -> Path:
    """What edgetpu_compiler writes, in structure: one custom op named edgetpu-custom-op."""
    g = Graph()
    x, y = g.tensor([1, 8, 8, 3]), g.tensor([1, 10], q=(0.1, 0))
    g.op("CUSTOM", [x], [y], custom="edgetpu-custom-op")
    g.inputs, g.outputs = [x], [y]
    return write(tmp_path, "model_w8a8_edgetpu.tflite", g)


def test_preflight_of_a_compiled_model_says_so(tmp_path) -> None:
    p = preflight(compiled_model(tmp_path))
    assert statuses(p) == [("CUSTOM", 1, NOT_SUPPORTED)]
    assert p.problems[:2] == [
        "already compiled for the Edge TPU (edgetpu-custom-op present): give the compiler's input",
        "custom operator 'edgetpu-custom-op'",
    ]


def test_backend_refuses_a_model_not_compiled_for_the_edge_tpu(tmp_path) -> None:
    with pytest.raises(EffdeployError, match="not compiled for the Edge TPU"):
        load_backend("edgetpu", write(tmp_path, "m.tflite", stem_head()))


def test_backend_without_libedgetpu_says_so(tmp_path) -> None:
    model = compiled_model(tmp_path)
    with pytest.raises(EffdeployError, match=r"runtime not installed: cannot load /nonexistent/libedgetpu\.so\.1"):
        load_backend("edgetpu", model, library="/nonexistent/libedgetpu.so.1")
    # a library that loads but is no delegate at all
    with pytest.raises(EffdeployError, match="libc.so.6 is not a TFLite delegate library"):
        load_backend("edgetpu", model, library="libc.so.6")


@needs_no_libedgetpu
def test_backend_default_library_missing_here(tmp_path) -> None:
    with pytest.raises(EffdeployError, match=r"Edge TPU runtime not installed: cannot load libedgetpu\.so\.1"):
        load_backend("edgetpu", compiled_model(tmp_path))


# --- bench records --------------------------------------------------------------------------


def test_bench_without_compiler_records_the_skip_and_the_preflight(tmp_path, no_compiler) -> None:
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    logged = []
    (rec,) = bench_edgetpu([model], work_dir=tmp_path / "work", log=logged.append)
    assert rec.status == f"skipped: edgetpu_compiler not found: {INSTALL_HINT}" and not rec.ok
    assert (rec.artifact, rec.format, rec.precision, rec.producer, rec.backend) == (
        "model_w8a8.tflite", "tflite", "w8a8", "effdeploy", "edgetpu",
    )  # fmt: skip
    assert rec.notes == ["preflight pass: 8/8 ops map to the Edge TPU"]
    assert rec.latency_ms is None and rec.snr_db is None
    assert logged == [f"edgetpu: model_w8a8.tflite: {rec.status}"]


@needs_no_libedgetpu
def test_bench_with_stand_in_compiler_and_no_libedgetpu(tmp_path, no_compiler) -> None:
    compiled = compiled_model(tmp_path / "c")
    exe = stand_in(tmp_path / "bin", "partly_mapped.stdout", "model_hswish_w8a8_edgetpu.log", compiled=compiled)
    model = write(tmp_path, "model_w8a8.tflite", stem_head(act="HARD_SWISH"))
    (rec,) = bench_edgetpu([model], compiler=exe, work_dir=tmp_path / "work", log=lambda s: None)
    assert rec.status.startswith("skipped: Edge TPU runtime not installed: cannot load libedgetpu.so.1")
    assert rec.notes[0] == (
        "preflight fail: 2/8 ops map to the Edge TPU (HARD_SWISH is not in the Edge TPU's supported-op table; "
        "5 operators after op 2 (HARD_SWISH) run on the CPU: one segment is mapped (no -a))"
    )
    assert rec.notes[1].startswith(
        "edgetpu_compiler 16.0.384591198 (partial): 2/189 ops on the Edge TPU, 187 on the CPU"
    )
    assert rec.options["compiler"].endswith(f"-s -o {tmp_path / 'work' / 'model_w8a8'} {model}")
    assert rec.options["edgetpu_model"] == str(tmp_path / "work" / "model_w8a8" / "model_w8a8_edgetpu.tflite")


def test_bench_compile_failure_is_the_status(tmp_path, no_compiler) -> None:
    exe = stand_in(tmp_path / "bin", "not_quantized.stdout", "model_w8a8_edgetpu.log", rc=1)
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    (rec,) = bench_edgetpu([model], compiler=exe, work_dir=tmp_path / "work", log=lambda s: None)
    assert rec.status == "edgetpu_compiler failed: Invalid model: model_fp32.tflite; Model not quantized"


class StubEdgeTPU:
    """Returns fixed logits per image (image i is filled with the value i), counting calls."""

    name = "edgetpu"

    def __init__(self, logits: np.ndarray) -> None:
        self.logits, self.batches = logits, []

    def run(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(len(images))
        return self.logits[[int(img[0, 0, 0]) for img in images]]


def test_bench_measures_latency_snr_and_top1(tmp_path, no_compiler, monkeypatch) -> None:
    ref = np.array([[3, 0, 0], [0, 3, 0], [0, 0, 3], [3, 0, 0]], np.float32)
    out = ref.copy()
    out[0, 1] = 1.0  # the only error: signal 4 * 9 = 36, noise 1
    labels = np.array([0, 1, 2, 1])  # the last image is wrong on both
    images = np.arange(4, dtype=np.float32)[:, None, None, None] * np.ones((4, 3, 8, 8), np.float32)
    stub = StubEdgeTPU(out)
    loaded = []
    monkeypatch.setattr(bench_mod, "load_backend", lambda name, path, **kw: loaded.append((name, path)) or stub)
    exe = stand_in(tmp_path / "bin", "fully_mapped.stdout", "model_w8a8_edgetpu.log")
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    (rec,) = bench_edgetpu(
        [model], compiler=exe, work_dir=tmp_path / "w", runs=7, warmup=2,
        images=images, float_logits=ref, labels=labels, log=lambda s: None,
    )  # fmt: skip
    assert rec.status == "ok"
    assert loaded == [("edgetpu", tmp_path / "w" / "model_w8a8" / "model_w8a8_edgetpu.tflite")]
    assert rec.snr_db == pytest.approx(10 * np.log10(36.0), abs=1e-9)  # 15.563 dB
    assert rec.top1 == 0.75 and rec.images == 4
    assert rec.latency_ms["runs"] == 7 and rec.latency_ms["warmup"] == 2 and rec.latency_ms["min"] >= 0
    assert stub.batches == [1] * (2 + 7 + 4)  # warm-up, timed, then one scoring pass, all at batch 1
    assert rec.notes[1] == (
        "edgetpu_compiler 16.0.384591198 (success): 238/238 ops on the Edge TPU, 0 on the CPU, "
        "1 Edge TPU subgraph, on-chip 1.41MiB used, 5.94MiB remaining, off-chip 0.00B"
    )


def test_bench_keeps_the_record_when_the_device_fails_mid_run(tmp_path, no_compiler, monkeypatch) -> None:
    class Unplugged:
        def run(self, images):
            raise RuntimeError("USB transfer error 2 [LibUsbDataOutCallback]")

    monkeypatch.setattr(bench_mod, "load_backend", lambda name, path, **kw: Unplugged())
    (rec,) = bench_edgetpu([compiled_model(tmp_path)], work_dir=tmp_path / "w", log=lambda s: None)
    assert rec.status == "edgetpu run failed: RuntimeError: USB transfer error 2 [LibUsbDataOutCallback]"
    assert rec.latency_ms is None


@needs_no_libedgetpu
def test_bench_runs_an_already_compiled_model_as_given(tmp_path, no_compiler) -> None:
    (rec,) = bench_edgetpu([compiled_model(tmp_path)], work_dir=tmp_path / "w", log=lambda s: None)
    assert rec.notes == ["already compiled for the Edge TPU: run as given"]
    assert rec.status.startswith("skipped: Edge TPU runtime not installed")


def test_bench_rejects_bad_input(tmp_path) -> None:
    with pytest.raises(EffdeployError, match="nope.tflite: TFLite model not found"):
        bench_edgetpu([tmp_path / "nope.tflite"], work_dir=tmp_path)
    model = write(tmp_path, "model_w8a8.tflite", stem_head())
    with pytest.raises(EffdeployError, match="3 images but 2 labels"):
        bench_edgetpu([model], work_dir=tmp_path, images=np.zeros((3, 3, 8, 8)), labels=np.zeros(2))


# --- our own models (slow: they go through litert-torch and ai-edge-quantizer) ----------------


def emit_int8(placement: str, path: Path) -> Path:
    """The int8 TFLite file of the tiny test config, written by the quantizer's own emitter."""
    from conftest import TINY_CONFIG
    from test_quant_core import _trained_like

    from effdeploy.quant.emit_tflite import emit_tflite
    from effdeploy.quant.sim import QuantSim

    model = _trained_like(TINY_CONFIG, placement)
    x = torch.randn(8, 3, 32, 32)
    sim = QuantSim(model, weight_bits=8, act_bits=8)
    sim.calibrate([x])
    emit_tflite(sim, path, x.numpy(), match_images=2)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["after", "before", "none"])
def test_our_int8_architecture_maps_every_op(tmp_path, placement) -> None:
    """The shipped checkpoints' block structure (B0 stages at 32 px, SE after / before / none),
    emitted full-int8: every operator maps to the Edge TPU."""
    p = preflight(emit_int8(placement, tmp_path / "model_w8a8.tflite"))
    assert p.passed, format_preflight(p)
    assert all(r.status == MAPPED for r in p.rows) and p.ops_on_edgetpu == p.total_ops > 50
    kinds = {r.operator for r in p.rows}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "LOGISTIC", "MUL", "ADD", "FULLY_CONNECTED"} <= kinds
    assert ("MEAN" in kinds) == (placement != "none")  # the SE squeeze; the head pool is a SUM at 1x1
    assert p.input_dtypes == ["INT8"] and p.output_dtypes == ["INT8"]


@pytest.mark.slow
def test_float_export_fails_preflight(tmp_path) -> None:
    from conftest import TINY_CONFIG

    from effdeploy.export.tflite import export_tflite
    from effdeploy.model.efficientnet import build_model

    path = export_tflite(build_model(TINY_CONFIG).eval(), tmp_path / "model.tflite")
    p = preflight(path)
    assert not p.passed and p.ops_on_edgetpu == 0
    assert all(r.status == DATA_TYPE for r in p.rows), format_preflight(p)
    assert p.problems[0] == "Model not quantized (the compiler refuses it)"
    assert "CONV_2D: FLOAT32 activation (must be int8 or uint8)" in " ".join(p.problems)
    assert "model input is FLOAT32: full-integer models have int8/uint8 I/O" in p.problems

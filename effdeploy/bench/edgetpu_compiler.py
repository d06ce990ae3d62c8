"""Coral's ``edgetpu_compiler``: find it, run it, and read what it reports.

``edgetpu_compiler -s -o OUT_DIR model.tflite`` writes ``<name>_edgetpu.tflite`` and
``<name>_edgetpu.log`` into OUT_DIR and prints a summary (sizes in B / KiB / MiB, the Edge TPU
on-chip memory used and remaining, off-chip streaming, the number of Edge TPU subgraphs and
operations) followed, with ``-s``, by the ``Operator  Count  Status`` table; the .log file holds
the compiler version, input and output names and the same table. The compiler runs on x86-64
Linux only; where it cannot be found, ``compile_edgetpu`` returns a ``Skipped`` reason instead of
failing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from effdeploy.bench.edgetpu_preflight import MAPPED, OpRow
from effdeploy.errors import EffdeployError

ENV_VAR = "EDGETPU_COMPILER"
INSTALL_HINT = "it runs on x86-64 Linux; install from Coral's apt repository (edgetpu-compiler package)"
TIMEOUT_S = 600  # the compiler's own per-segment timer defaults to 180 s

_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB)\s*$")
_HEADER = re.compile(r"^Operator\s+Count\s+Status\s*$")
_ROW = re.compile(r"^(\S+)\s+(\d+)\s+(\S.*?)\s*$")
_FAILURE_LINE = re.compile(
    r"^(ERROR: .*|Compilation failed: .*|Invalid model: .*|Model not quantized.*"
    r"|Internal compiler error.*|.*uncaught exception.*)$"
)


@dataclass(frozen=True)
class Skipped:
    """A step that could not run here, with the one-line reason."""

    reason: str


@dataclass
class CompileResult:
    outcome: str  # "success" (every op on the Edge TPU) | "partial" (some on the CPU) | "failure"
    returncode: int | None = None
    compiler_version: str | None = None
    model: str | None = None  # the <name>_edgetpu.tflite written
    log: str | None = None  # the <name>_edgetpu.log written
    total_ops: int | None = None
    ops_on_edgetpu: int | None = None
    ops_on_cpu: int | None = None
    edgetpu_subgraphs: int | None = None
    on_chip_used_bytes: int | None = None
    on_chip_remaining_bytes: int | None = None
    off_chip_bytes: int | None = None
    compile_ms: int | None = None
    rows: list[OpRow] = field(default_factory=list)
    error: str | None = None  # the compiler's own failure lines, joined
    command: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome != "failure"

    def summary(self) -> str:
        """One line: what mapped where, and the memory it took."""
        version = f"edgetpu_compiler {self.compiler_version}" if self.compiler_version else "edgetpu_compiler"
        if not self.ok:
            return f"{version}: compilation failed ({self.error or 'no reason printed'})"
        parts = [f"{self.ops_on_edgetpu}/{self.total_ops} ops on the Edge TPU, {self.ops_on_cpu} on the CPU"]
        if self.edgetpu_subgraphs is not None:
            parts.append(f"{self.edgetpu_subgraphs} Edge TPU subgraph{'s' * (self.edgetpu_subgraphs != 1)}")
        if self.on_chip_used_bytes is not None:
            parts.append(f"on-chip {format_size(self.on_chip_used_bytes)} used")
        if self.on_chip_remaining_bytes is not None:
            parts.append(f"{format_size(self.on_chip_remaining_bytes)} remaining")
        if self.off_chip_bytes is not None:
            parts.append(f"off-chip {format_size(self.off_chip_bytes)}")
        return f"{version} ({self.outcome}): " + ", ".join(parts)


def parse_size(text: str) -> int:
    """``604.50KiB`` -> 619008 bytes (the compiler prints B, KiB or MiB with two decimals)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not an edgetpu_compiler size: {text!r}")
    return int(round(float(m.group(1)) * _UNITS[m.group(2)]))


def format_size(n: int) -> str:
    """Bytes as the compiler prints them: ``768.00B``, ``604.50KiB``, ``1.41MiB``."""
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.2f}{unit}"
    return f"{n:.2f}B"


def parse_table(text: str) -> list[OpRow]:
    """The ``Operator  Count  Status`` rows of compiler stdout or of an ``_edgetpu.log``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _HEADER.match(line)), None)
    if start is None:
        return []
    rows: list[OpRow] = []
    for line in lines[start + 1 :]:
        if not line.strip():
            if rows:
                break
            continue
        m = _ROW.match(line)
        if not m:
            break
        rows.append(OpRow(m.group(1), int(m.group(2)), m.group(3)))
    return rows


def _field(text: str, label: str) -> str | None:
    m = re.search(rf"^{re.escape(label)}:\s*(.+?)\s*$", text, re.MULTILINE)
    return m.group(1) if m else None


def _int(text: str, label: str) -> int | None:
    value = _field(text, label)
    return int(value) if value is not None and value.isdigit() else None


def _size(text: str, label: str) -> int | None:
    value = _field(text, label)
    try:
        return parse_size(value) if value is not None else None
    except ValueError:  # a format this parser does not know: leave the number out
        return None


def parse_operation_log(text: str) -> tuple[str | None, list[OpRow]]:
    """An ``<name>_edgetpu.log``: (compiler version, operator rows)."""
    m = re.search(r"Edge TPU Compiler version (\S+)", text)
    return (m.group(1) if m else None), parse_table(text)


def parse_compiler_output(text: str, returncode: int | None = 0, log_text: str | None = None) -> CompileResult:
    """What ``edgetpu_compiler -s`` printed (stdout, then stderr), read into a CompileResult;
    ``log_text`` (the ``_edgetpu.log``) supplies the table when stdout has none."""
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    log_version, log_rows = parse_operation_log(log_text) if log_text else (None, [])
    ms = re.search(r"Model compiled successfully in (\d+) ms", text)
    errors = [line.strip() for line in text.splitlines() if _FAILURE_LINE.match(line.strip())]
    failed = returncode not in (0, None) or ms is None  # no "Model compiled successfully": no model
    rows = parse_table(text) or log_rows
    result = CompileResult(
        outcome="failure",
        returncode=returncode,
        compiler_version=version.group(1) if version else log_version,
        total_ops=_int(text, "Total number of operations"),
        ops_on_edgetpu=_int(text, "Number of operations that will run on Edge TPU"),
        ops_on_cpu=_int(text, "Number of operations that will run on CPU"),
        edgetpu_subgraphs=_int(text, "Number of Edge TPU subgraphs"),
        on_chip_used_bytes=_size(text, "On-chip memory used for caching model parameters"),
        on_chip_remaining_bytes=_size(text, "On-chip memory remaining for caching model parameters"),
        off_chip_bytes=_size(text, "Off-chip memory used for streaming uncached model parameters"),
        compile_ms=int(ms.group(1)) if ms else None,
        rows=rows,
    )
    if failed:
        result.error = "; ".join(errors) or (
            "Compilation failed!" if "Compilation failed" in text else f"exit status {returncode}, no summary printed"
        )
        return result
    _fill_counts(result)
    partial = (result.ops_on_cpu or 0) > 0 or "not all operations are supported" in text
    result.outcome = "partial" if partial else "success"
    return result


def _fill_counts(result: CompileResult) -> None:
    """Edge TPU / CPU counts: printed only when some op falls back; otherwise from the table,
    or every operation when the compiler printed no table."""
    if result.rows:
        on = sum(r.count for r in result.rows if r.status == MAPPED)
        total = sum(r.count for r in result.rows)
        result.ops_on_edgetpu = on if result.ops_on_edgetpu is None else result.ops_on_edgetpu
        result.ops_on_cpu = total - on if result.ops_on_cpu is None else result.ops_on_cpu
        result.total_ops = total if result.total_ops is None else result.total_ops
    elif result.total_ops is not None and result.ops_on_edgetpu is None:
        result.ops_on_edgetpu, result.ops_on_cpu = result.total_ops, 0


def find_compiler(compiler: str | os.PathLike | None = None) -> Path | Skipped:
    """The compiler to run: ``compiler`` if given, else ``$EDGETPU_COMPILER``, else
    ``edgetpu_compiler`` on PATH; a Skipped reason when none is installed. A path the user named
    that is not an executable is an error, not a skip."""
    for value, origin in ((compiler, "compiler"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if value:
            found = shutil.which(str(value))
            if found is None:
                raise EffdeployError(f"{value}: edgetpu_compiler not found or not executable (from {origin})")
            return Path(found)
    found = shutil.which("edgetpu_compiler")
    if found is None:
        return Skipped(f"edgetpu_compiler not found: {INSTALL_HINT}")
    return Path(found)


def compile_edgetpu(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    compiler: str | os.PathLike | None = None,
    *,
    timeout_s: float = TIMEOUT_S,
) -> CompileResult | Skipped:
    """Run ``edgetpu_compiler -s -o OUT_DIR model.tflite`` and read its stdout and .log."""
    path, out_dir = Path(path), Path(out_dir)
    if not path.is_file():
        raise EffdeployError(f"{path}: TFLite model not found")
    exe = find_compiler(compiler)
    if isinstance(exe, Skipped):
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / f"{path.stem}_edgetpu.tflite"
    log = out_dir / f"{path.stem}_edgetpu.log"
    for stale in (model, log):  # a failed run must not leave an earlier run's files to be read
        stale.unlink(missing_ok=True)
    command = [str(exe), "-s", "-o", str(out_dir), str(path)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return CompileResult("failure", error=f"timed out after {timeout_s:g} s", command=command)
    except OSError as err:
        return Skipped(f"edgetpu_compiler at {exe} cannot run here ({err.strerror or err}): {INSTALL_HINT}")
    log_text = log.read_text(errors="replace") if log.is_file() else None
    result = parse_compiler_output(proc.stdout + "\n" + proc.stderr, proc.returncode, log_text)
    result.command = command
    result.log = str(log) if log_text is not None else None
    if result.ok:
        if not model.is_file():
            result.outcome, result.error = "failure", f"the compiler reported success but wrote no {model.name}"
        else:
            result.model = str(model)
    return result


def command_line(result: CompileResult) -> str:
    """The command as one shell-quoted line, for records and logs."""
    return shlex.join(result.command)

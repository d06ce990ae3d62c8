"""`effdeploy bench` on Android phones over adb: latency, memory, delegates, and SNR / top-1
computed on the phone.

For each phone (one after another) and each .tflite, LiteRT's ``benchmark_model`` runs the model
with each option set (XNNPACK, plain CPU kernels, the GPU delegate, NNAPI) and its log becomes
one ``Record``; ``benchmark_litert_model`` (the CompiledModel path: GPU, NPU) adds its own when
given. With images, the phone's logits come back through ``--output_filepath`` (one image per
invocation, see ``effdeploy.runtime.android_backend``) and are scored against the float logits.

A phone that leaves mid-run keeps what it measured: the option set in progress becomes a record
whose status says so, and the next phone starts. Missing tools (adb, the benchmark binaries) or
phones are skip records with the reason, never a crash.

The plumbing (adb, the phone, the tool binaries) lives with the runtime that runs artifacts; it
is re-exported here for callers of the bench.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effdeploy.bench.record import Record, check_bench_inputs
from effdeploy.bench.tool_logs import parse_benchmark_litert_model, parse_benchmark_model
from effdeploy.errors import EffdeployError
from effdeploy.metrics import snr_db, topk_accuracy
from effdeploy.runtime.android_backend import (
    REMOTE_DIR,
    AdbDevice,
    AdbError,
    DeviceGone,
    PhoneModel,
    ToolFailed,
    ToolMissing,
    failure_reason,
    find_adb,
    find_benchmark_binary,
    find_benchmark_litert_binary,
    list_devices,
    model_io,
    ready_serials,
    supports_output_file,
)

__all__ = [
    "OPTION_SETS",
    "DEFAULT_OPTION_SETS",
    "AdbDevice",
    "bench_android",
    "find_adb",
    "find_benchmark_binary",
    "find_benchmark_litert_binary",
    "list_devices",
    "resolve_option_sets",
]

BENCHMARK_MODEL = "benchmark_model"
BENCHMARK_LITERT_MODEL = "benchmark_litert_model"

# name -> the tool and the flags that select the runtime path on the phone. Setting
# --use_xnnpack explicitly replaces benchmark_model's default delegate choice, so "cpu" is
# LiteRT's built-in kernels and "xnnpack" is XNNPACK, each stated rather than implied.
OPTION_SETS: dict[str, dict] = {
    "xnnpack": {"tool": BENCHMARK_MODEL, "flags": ["--use_xnnpack=true"]},
    "cpu": {"tool": BENCHMARK_MODEL, "flags": ["--use_xnnpack=false"]},
    "gpu": {"tool": BENCHMARK_MODEL, "flags": ["--use_gpu=true"]},
    "nnapi": {"tool": BENCHMARK_MODEL, "flags": ["--use_nnapi=true"]},
    "litert-gpu": {"tool": BENCHMARK_LITERT_MODEL, "flags": ["--use_gpu=true"]},
    "litert-npu": {"tool": BENCHMARK_LITERT_MODEL, "flags": ["--use_npu=true"]},
}
DEFAULT_OPTION_SETS = ("xnnpack", "cpu", "gpu", "nnapi")
ANDROID_15_SDK = 35
NNAPI_DEPRECATED = "NNAPI is deprecated from Android 15 (API 35): prefer the GPU delegate or LiteRT's NPU path"
_PRECISION = re.compile(r"(?<![a-z0-9])(fp32|w8a8|w4a8|w4a4)(?![a-z0-9])")


def resolve_option_sets(option_sets: Sequence | None, litert: bool = False, npu: bool = False) -> list[dict]:
    """Option sets as ``{"name", "tool", "flags"}``: names from ``OPTION_SETS``, ``nnapi:ACCELERATOR``
    (adds ``--nnapi_accelerator_name``), or dicts with ``name`` and ``flags`` (and optionally
    ``tool``). The default is XNNPACK, CPU, GPU and NNAPI, plus the CompiledModel GPU (and NPU,
    with a dispatch library) when ``benchmark_litert_model`` is given."""
    if option_sets is None:
        names: list = list(DEFAULT_OPTION_SETS)
        if litert:
            names.append("litert-gpu")
            if npu:
                names.append("litert-npu")
        option_sets = names
    out = []
    for item in option_sets:
        if isinstance(item, dict):
            if "name" not in item or "flags" not in item:
                raise EffdeployError(f"android option set {item!r}: needs 'name' and 'flags'")
            tool = item.get("tool", BENCHMARK_MODEL)
            if tool not in (BENCHMARK_MODEL, BENCHMARK_LITERT_MODEL):
                raise EffdeployError(f"android option set {item['name']!r}: unknown tool {tool!r}")
            out.append({"name": str(item["name"]), "tool": tool, "flags": [str(f) for f in item["flags"]]})
            continue
        name, _, accelerator = str(item).partition(":")
        if name not in OPTION_SETS or (accelerator and name != "nnapi"):
            known = ", ".join([*OPTION_SETS, "nnapi:ACCELERATOR"])
            raise EffdeployError(f"android option set {item!r}: unknown (known: {known})")
        spec = {"name": str(item), "tool": OPTION_SETS[name]["tool"], "flags": list(OPTION_SETS[name]["flags"])}
        if accelerator:
            spec["flags"].append(f"--nnapi_accelerator_name={accelerator}")
        out.append(spec)
    return out


def _precision(path: Path, io: dict | None) -> str:
    m = _PRECISION.search(path.stem.lower())
    if m:
        return m.group(1)
    if io is not None and io["input"]["dtype"] != np.float32:
        return "w8a8"
    return "fp32"


def latency_from_benchmark_model(parsed: dict, warmup: int) -> dict | None:
    """The record's latency dict from a ``benchmark_model`` log (ms): the timed loop's stats line;
    p90/p99 are not printed by the tool, and median only by newer builds."""
    inf = parsed["inference"]
    if inf is None or inf["count"] == 0:
        if parsed["inference_avg_ms"] is None:
            return None
        mean = parsed["inference_avg_ms"]
        return _latency(None, warmup, None, None, mean, None, None, None, None)
    warm = parsed["warmup"]["count"] if parsed["warmup"] else warmup
    return _latency(
        inf["count"], warm, inf["min_ms"], inf["median_ms"], inf["avg_ms"], inf["std_ms"],
        inf["max_ms"], inf["p5_ms"], inf["p95_ms"],
    )  # fmt: skip


def latency_from_benchmark_litert_model(parsed: dict, warmup: int) -> dict | None:
    """The record's latency dict from a ``benchmark_litert_model`` log: its labels, with the run
    loop's stats line filling what the labels leave out (the C++ tool prints no median)."""
    inf = parsed["inference"] or {}
    if parsed["avg_ms"] is None and not inf.get("count"):
        return None

    def pick(label_key: str, stats_key: str):
        return parsed[label_key] if parsed[label_key] is not None else inf.get(stats_key)

    runs = parsed["runs"] if parsed["runs"] is not None else inf.get("count")
    warm = parsed["warmup_runs"] if parsed["warmup_runs"] is not None else warmup
    return _latency(
        runs, warm, pick("min_ms", "min_ms"), pick("median_ms", "median_ms"), pick("avg_ms", "avg_ms"),
        pick("std_ms", "std_ms"), pick("max_ms", "max_ms"), pick("p5_ms", "p5_ms"), pick("p95_ms", "p95_ms"),
    )  # fmt: skip


def _latency(runs, warmup, lo, median, mean, std, hi, p5, p95) -> dict:
    return {
        "runs": runs,
        "warmup": warmup,
        "min": lo,
        "median": median,
        "p90": None,
        "p99": None,
        "mean": mean,
        "std": std,
        "max": hi,
        "p5": p5,
        "p95": p95,
    }


def delegate_notes(parsed: dict) -> list[str]:
    """One note per delegate line: whole graph, part of it (with its kernel count), or none."""
    notes = []
    for d in parsed.get("delegates", []):
        if d["coverage"] == "complete":
            notes.append(f"{d['delegate']} delegate runs the whole graph")
        elif d["coverage"] == "partial":
            kernels = f"{d['kernels']} delegate kernels"
            notes.append(f"{d['delegate']} delegate runs part of the graph ({kernels}), the rest on the CPU")
        else:
            notes.append(f"{d['delegate']} delegate runs none of the graph: it ran on the CPU")
    if parsed.get("nnapi_accelerators"):
        notes.append(f"NNAPI accelerators: {', '.join(parsed['nnapi_accelerators'])}")
    return notes


@dataclass
class _Settings:
    """What every (phone, artifact, option set) of one bench call shares."""

    tools: dict  # tool -> local binary (Path), or the reason it is missing (str)
    specs: list[dict]
    ios: dict  # artifact -> its tensor details
    threads: int
    runs: int
    warmup: int
    images: np.ndarray | None
    float_logits: np.ndarray | None
    labels: np.ndarray | None
    dispatch_library: str | None
    log: Callable[[str], object]


def bench_android(
    artifacts: list[Path],
    serials: list[str] | None = None,
    *,
    adb: str | None = None,
    binary: str | os.PathLike | None = None,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    images: np.ndarray | None = None,
    float_logits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    option_sets: Sequence | None = None,
    log: Callable[[str], object] = print,
    litert_binary: str | os.PathLike | None = None,
    dispatch_library: str | None = None,
) -> list[Record]:
    """Bench every .tflite in ``artifacts`` on each phone in ``serials`` (default: every phone in
    state ``device``), one record per (phone, artifact, option set).

    ``images`` (float32 NCHW) with ``float_logits`` and/or ``labels``: SNR against the float logits
    and top-1, computed from the phone's own outputs. ``dispatch_library``: the NPU vendor's
    dispatch library for ``litert-npu``, a local file (pushed) or a path on the phone.
    """
    tflites, images = check_bench_inputs(
        "android", [a for a in artifacts if Path(a).suffix == ".tflite"], images, float_logits, labels
    )
    if not tflites:
        return []
    ios = {a: model_io(a) for a in tflites}  # a broken file fails here, before any phone is touched

    tools: dict[str, Path | str] = {}
    for tool, finder, explicit in (
        (BENCHMARK_MODEL, find_benchmark_binary, binary),
        (BENCHMARK_LITERT_MODEL, find_benchmark_litert_binary, litert_binary),
    ):
        try:
            tools[tool] = finder(explicit)
        except ToolMissing as err:
            tools[tool] = str(err)
    specs = resolve_option_sets(
        option_sets, litert=isinstance(tools[BENCHMARK_LITERT_MODEL], Path), npu=dispatch_library is not None
    )
    if dispatch_library is None and any(s["name"] == "litert-npu" for s in specs):
        raise EffdeployError("android option set 'litert-npu': needs a dispatch library (--dispatch-library)")
    records: list[Record] = []

    def skipped(artifact: Path, device: str, reason: str, options: dict | None = None) -> Record:
        rec = _record(artifact, ios[artifact], device, threads, options or {}, f"skipped: {reason}")
        log(f"android: {artifact.name}: {rec.status}")
        return rec

    try:
        adb_path = find_adb(adb)
        ready, problems = ready_serials(adb_path, serials)
    except (ToolMissing, AdbError) as err:
        return [skipped(a, "android", str(err)) for a in tflites]
    for serial, problem in problems:
        records += [skipped(a, serial, problem) for a in tflites]
    if not ready and not problems:
        reason = "no Android phone in state 'device' (adb devices -l lists none)"
        return [skipped(a, "android", reason) for a in tflites]

    runnable = [s for s in specs if isinstance(tools[s["tool"]], Path)]
    for tool in sorted({s["tool"] for s in specs} - {s["tool"] for s in runnable}):
        options = {"tool": tool, "option_sets": [s["name"] for s in specs if s["tool"] == tool]}
        for serial in ready:
            records += [skipped(a, serial, str(tools[tool]), options) for a in tflites]
    if not runnable:
        return records
    settings = _Settings(
        tools, runnable, ios, threads, runs, warmup, images, float_logits, labels, dispatch_library, log
    )
    for serial in ready:
        records += _bench_phone(AdbDevice(adb_path, serial), tflites, settings)
    return records


def _record(artifact: Path, io: dict | None, device: str, threads: int, options: dict, status: str) -> Record:
    return Record(
        artifact=artifact.name,
        format="tflite",
        precision=_precision(artifact, io),
        producer="effdeploy",
        backend="android",
        device=device,
        threads=threads,
        options=options,
        status=status,
        size_mb=artifact.stat().st_size / 1e6,
    )


def _bench_phone(device: AdbDevice, tflites: list[Path], run: _Settings) -> list[Record]:
    """Every artifact and option set on one phone. A disconnect ends the phone's run: the record in
    progress says so (keeping what it measured), the records before it stay as they are."""
    records: list[Record] = []
    name = device.serial
    artifact = tflites[0]
    current: Record | None = None  # the record being measured
    try:
        name = device.describe()
        remote = {tool: device.install(run.tools[tool], tool) for tool in {s["tool"] for s in run.specs}}
        outputs_readable = (
            run.images is not None
            and BENCHMARK_MODEL in remote
            and supports_output_file(device, remote[BENCHMARK_MODEL])
        )
        needs_dispatch = any(s["name"] == "litert-npu" for s in run.specs)
        dispatch = _dispatch_path(device, run.dispatch_library) if needs_dispatch else None
        for artifact in tflites:
            try:
                phone_model = PhoneModel(
                    device, artifact, remote.get(BENCHMARK_MODEL, ""), run.threads, run.ios[artifact]
                )
                for spec in run.specs:
                    flags = list(spec["flags"])
                    if spec["name"] == "litert-npu" and dispatch:
                        flags.append(f"--dispatch_library_path={dispatch}")
                    options = {
                        "tool": spec["tool"], "option_set": spec["name"], "flags": flags,
                        "runs": run.runs, "warmup": run.warmup,
                    }  # fmt: skip
                    current = _record(artifact, run.ios[artifact], name, run.threads, options, "ok")
                    records.append(current)
                    _bench_one(device, current, phone_model, remote[spec["tool"]], run, outputs_readable)
                    run.log(_summary(current))
                    current = None
                phone_model.remove()
            except DeviceGone:
                raise
            except AdbError as err:  # this artifact could not run here (e.g. no room for it): the next may
                _failed(records, current, artifact, run, name, f"failed: {err}")
                current = None
    except DeviceGone as err:
        _failed(records, current, artifact, run, name, f"device disconnected: {err}")
        kept = sum(r.ok for r in records)
        run.log(f"android {device.serial}: disconnected; {kept} records measured before it kept, next phone")
    except AdbError as err:
        _failed(records, current, artifact, run, name, f"failed: {err}")
    return records


def _failed(records: list[Record], current: Record | None, artifact: Path, run: _Settings, device: str, status: str):
    """Mark the record in progress (or, between records, add one) with why the run stopped."""
    if current is None:
        current = _record(artifact, run.ios[artifact], device, run.threads, {}, status)
        records.append(current)
    current.status = status
    run.log(_summary(current))


def _dispatch_path(device: AdbDevice, dispatch_library: str | None) -> str | None:
    """The dispatch library's folder on the phone; a local file is pushed into the work folder."""
    if dispatch_library is None:
        return None
    local = Path(dispatch_library)
    if local.is_file():
        device.push(local, f"{REMOTE_DIR}/{local.name}")
        return REMOTE_DIR
    return dispatch_library


def _bench_one(
    device: AdbDevice, rec: Record, phone_model: PhoneModel, remote_binary: str, run: _Settings, outputs_readable: bool
) -> None:
    """Fill ``rec``: one timed run of the tool, then (with images) SNR and top-1 from the phone's outputs."""
    tool, flags = rec.options["tool"], rec.options["flags"]
    argv = [
        remote_binary,
        *phone_model.base_command(run.runs, run.warmup)[1:],
        "--report_peak_memory_footprint=true",
        *flags,
    ]
    result = device.shell(argv)
    if tool == BENCHMARK_MODEL:
        parsed = parse_benchmark_model(result.text)
        rec.latency_ms = latency_from_benchmark_model(parsed, run.warmup)
    else:
        parsed = parse_benchmark_litert_model(result.text)
        rec.latency_ms = latency_from_benchmark_litert_model(parsed, run.warmup)
        if parsed["fully_accelerated"] is False:
            rec.notes.append("not fully accelerated: part of the graph runs on the CPU")
    rec.peak_memory_mb = parsed["peak_memory_mb"]
    rec.notes += delegate_notes(parsed)
    if "--use_nnapi=true" in flags and (device.sdk or 0) >= ANDROID_15_SDK:
        rec.notes.append(NNAPI_DEPRECATED)
    if result.rc != 0:
        rec.status = failure_reason(tool, result.rc, result.text)
        return
    if rec.latency_ms is None:
        rec.status = f"{tool} printed no timings"
        return
    if run.images is None:
        return
    if tool != BENCHMARK_MODEL:
        rec.notes.append(f"SNR and top-1 not measured: {tool} writes no outputs")
        return
    if not outputs_readable:
        rec.notes.append(
            "latency only: this benchmark_model build has no --output_filepath, "
            "so SNR and top-1 were not measured on the phone"
        )
        return
    try:
        logits = phone_model.logits(run.images, flags)
    except ToolFailed as err:
        rec.notes.append(f"SNR and top-1 not measured: {err}")
        return
    rec.images = len(logits)
    if run.float_logits is not None:
        rec.snr_db = snr_db(run.float_logits, logits)
    if run.labels is not None:
        rec.top1 = topk_accuracy(logits, np.asarray(run.labels), 1)


def _summary(rec: Record) -> str:
    head = f"android {rec.device}: {rec.artifact} [{rec.options.get('option_set', '-')}]"
    if not rec.ok:
        return f"{head}: {rec.status}"
    lat = rec.latency_ms or {}
    ms = lat.get("median") if lat.get("median") is not None else lat.get("mean")
    extra = f", SNR {rec.snr_db:.2f} dB" if rec.snr_db is not None else ""
    return f"{head}: {ms:.3f} ms{extra}" if ms is not None else head

"""`effdeploy bench` on a Coral Edge TPU: each int8 .tflite goes through preflight, then
``edgetpu_compiler``, then the ``libedgetpu`` delegate, as far as this machine allows.

One ``Record`` per artifact. Whatever ran is in it: the preflight verdict and the compiler's
mapping and memory in ``notes``, the latency of batch-1 invokes, SNR against the float logits and
top-1. The first step that cannot run here (no compiler, no libedgetpu, no Edge TPU attached, a
failed compilation) becomes the record's ``status``, in one line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from effdeploy.bench.artifacts import classify
from effdeploy.bench.edgetpu_compiler import CompileResult, Skipped, command_line, compile_edgetpu
from effdeploy.bench.edgetpu_preflight import Preflight, format_preflight, preflight
from effdeploy.bench.record import Record, check_bench_inputs
from effdeploy.bench.stats import latency_stats
from effdeploy.errors import EffdeployError
from effdeploy.metrics import snr_db, topk_accuracy
from effdeploy.runtime import load_backend
from effdeploy.runtime.edgetpu_backend import default_library, is_compiled, read_tflite

__all__ = ["CompileResult", "Preflight", "Skipped", "bench_edgetpu", "compile_edgetpu", "format_preflight", "preflight"]

DEVICE = "Coral Edge TPU"


def bench_edgetpu(
    artifacts: Sequence[str | os.PathLike],
    *,
    compiler: str | os.PathLike | None = None,
    work_dir: Path,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    images: np.ndarray | None = None,
    float_logits: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    log: Callable[[str], object] = print,
) -> list[Record]:
    """Bench every .tflite in ``artifacts`` on the Edge TPU; compiled models go to ``work_dir``.

    ``images`` (float32 NCHW) with ``float_logits`` and/or ``labels``: SNR and top-1 of the Edge
    TPU's outputs. Latency is timed on the first image (a zero image without ``images``)."""
    if runs < 1 or warmup < 0:
        raise EffdeployError(f"edgetpu bench: runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    paths, images = check_bench_inputs("edgetpu", artifacts, images, float_logits, labels)
    work_dir = Path(work_dir)
    records = []
    seen: dict[str, int] = {}
    for path in paths:
        n = seen[path.stem] = seen.get(path.stem, 0) + 1
        out_dir = work_dir / (path.stem if n == 1 else f"{path.stem}_{n}")
        rec = _bench_one(path, out_dir, compiler, threads, runs, warmup, images, float_logits, labels)
        log(f"edgetpu: {path.name}: {rec.status}")
        records.append(rec)
    return records


def _record(path: Path, pf: Preflight | None) -> Record:
    art = classify(path)
    if art is not None:
        precision, producer = art.precision, art.producer
    elif pf is not None and "FLOAT32" in pf.input_dtypes:
        precision, producer = "fp32", "unknown"
    else:
        precision = "w4a8" if pf is not None and "INT4" in pf.weight_dtypes else "w8a8"
        producer = "unknown"
    return Record(
        artifact=path.name,
        format="tflite",
        precision=precision,
        producer=producer,
        backend="edgetpu",
        device=DEVICE,
        size_mb=path.stat().st_size / 1e6,
        options={"delegate": default_library()},
    )


def _preflight_note(pf: Preflight) -> str:
    verdict = "pass" if pf.passed else "fail"
    note = f"preflight {verdict}: {pf.ops_on_edgetpu}/{pf.total_ops} ops map to the Edge TPU"
    return note + (f" ({'; '.join(pf.problems[:3])})" if pf.problems else "")


def _bench_one(
    path: Path,
    out_dir: Path,
    compiler: str | os.PathLike | None,
    threads: int,
    runs: int,
    warmup: int,
    images: np.ndarray | None,
    float_logits: np.ndarray | None,
    labels: np.ndarray | None,
) -> Record:
    fb = read_tflite(path)
    compiled = is_compiled(fb)
    pf = None if compiled else preflight(path)
    rec = _record(path, pf)
    rec.threads = threads
    if pf is not None:
        rec.notes.append(_preflight_note(pf))
    if compiled:
        rec.notes.append("already compiled for the Edge TPU: run as given")
        model = path
    else:
        result = compile_edgetpu(path, out_dir, compiler)
        if isinstance(result, Skipped):
            rec.status = f"skipped: {result.reason}"
            rec.options["compiler"] = "edgetpu_compiler -s"
            return rec
        rec.options.update(compiler=command_line(result), compiler_version=result.compiler_version)
        rec.notes.append(result.summary())
        if not result.ok:
            rec.status = f"edgetpu_compiler failed: {result.error}"
            return rec
        model = Path(result.model)
        rec.options["edgetpu_model"] = str(model)
        rec.size_mb = model.stat().st_size / 1e6
    try:
        backend = load_backend("edgetpu", model, threads=threads)
    except EffdeployError as err:
        rec.status = f"skipped: {err}"
        return rec
    try:
        _measure(rec, backend, _input_shape(fb), runs, warmup, images, float_logits, labels)
    except Exception as err:  # the device can fail mid-run (unplugged, USB error): keep the record
        rec.status = f"edgetpu run failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
    return rec


def _input_shape(fb) -> list[int]:
    """The model's first input as stored (NHWC)."""
    graph = fb.subgraphs[0]
    return [int(d) for d in graph.tensors[graph.inputs[0]].shape]


def _measure(rec: Record, backend, nhwc: list[int], runs, warmup, images, float_logits, labels) -> None:
    """Latency of batch-1 ``run`` calls (perf_counter, after ``warmup`` untimed ones), then SNR
    and top-1 over ``images``."""
    if images is not None and len(images):
        one = images[:1]
    else:  # a zero image: the backend takes NCHW
        one = np.zeros((1, nhwc[3], nhwc[1], nhwc[2]), np.float32)
    for _ in range(warmup):
        backend.run(one)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        backend.run(one)
        samples.append((time.perf_counter() - t0) * 1e3)
    rec.latency_ms = latency_stats(samples, warmup)
    if images is not None and (float_logits is not None or labels is not None):
        out = np.concatenate([backend.run(images[i : i + 1]) for i in range(len(images))])
        rec.images = len(images)
        if float_logits is not None:
            rec.snr_db = snr_db(np.asarray(float_logits), out)
        if labels is not None:
            rec.top1 = topk_accuracy(out, np.asarray(labels), 1)

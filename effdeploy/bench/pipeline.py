"""`effdeploy bench`: every artifact of one model on every backend, timed side by side.

Timing discipline: all host artifacts are loaded in one process and timed round-robin (one
batch-1 inference of each in turn, the order rotated every round), so machine noise lands on all
of them alike; threads are pinned to the same count for every runtime. The whole timing is
repeated ``repeats`` times and a configuration whose medians differ by more than 10% between
repeats marks the run as too noisy. Latencies are compared only as ratios within one run.

Accuracy is measured on real images: output SNR against float PyTorch eager on the same inputs,
and top-1 when the images are labelled.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effdeploy.bench.artifacts import Artifact, find_artifacts
from effdeploy.bench.machine import describe, machine_record
from effdeploy.bench.record import Record
from effdeploy.bench.stats import NOISY_RATIO, latency_stats, median_spread
from effdeploy.config import RunConfig
from effdeploy.errors import EffdeployError
from effdeploy.progress import progress

HOST_BACKENDS = ("torch", "onnxruntime", "litert")
ALL_BACKENDS = (*HOST_BACKENDS, "android", "edgetpu")
DEFAULT_BACKENDS = (*HOST_BACKENDS, "edgetpu")


@dataclass(frozen=True)
class BenchOptions:
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    serials: tuple[str, ...] = ()
    threads: int = 1
    runs: int = 50
    warmup: int = 10
    images: int = 500
    repeats: int = 2
    adb: Path | None = None
    benchmark_model: Path | None = None
    benchmark_litert_model: Path | None = None
    dispatch_library: str | None = None
    edgetpu_compiler: Path | None = None

    @classmethod
    def parse(cls, *, backends: str | None = None, serials=None, **kw) -> BenchOptions:
        """Validated options; each bad value is one error naming its option."""
        names = DEFAULT_BACKENDS
        if backends is not None:
            names = tuple(b.strip() for b in backends.split(",") if b.strip())
            if not names:
                raise EffdeployError("--backend: empty list (choose from " + ", ".join(ALL_BACKENDS) + ")")
            unknown = [b for b in names if b not in ALL_BACKENDS]
            if unknown:
                raise EffdeployError(f"--backend: unknown {unknown[0]!r} (choose from {', '.join(ALL_BACKENDS)})")
        serials = tuple(serials or ())
        if serials and "android" not in names:
            names = (*names, "android")
        for opt, low in (("threads", 1), ("runs", 1), ("warmup", 0), ("images", 0), ("repeats", 1)):
            if opt in kw and kw[opt] < low:
                raise EffdeployError(f"--{opt}: must be at least {low}, got {kw[opt]}")
        return cls(backends=names, serials=serials, **kw)


def _command_line() -> str | None:
    """The effdeploy command that made this result, when run from the command line."""
    import shlex
    import sys

    if not sys.argv or Path(sys.argv[0]).name not in ("effdeploy", "cli.py", "__main__.py"):
        return None
    return " ".join(["effdeploy", *(shlex.quote(a) for a in sys.argv[1:])])


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        return None


def _host_backend(artifact: Artifact, model, threads: int):
    from effdeploy.runtime import load_backend

    if artifact.format == "pytorch":
        return load_backend("torch", model, threads=threads)
    return load_backend(artifact.host_backend, artifact.path, threads=threads)


def _accuracy(rec: Record, logits: np.ndarray, float_logits: np.ndarray, labels: np.ndarray | None) -> None:
    from effdeploy.metrics import snr_db, topk_accuracy

    rec.images = len(logits)
    rec.snr_db = snr_db(float_logits, logits)
    if labels is not None:
        rec.top1 = topk_accuracy(logits, labels, 1)


def time_round_robin(fns: list, sample: np.ndarray, runs: int, warmup: int, repeats: int, desc: str = "timing"):
    """Per function, per repeat: ``runs`` batch-1 latencies in ms, interleaved across functions.

    Each round runs every function once, starting one later than the round before, so no function
    always follows the same neighbour (caches, frequency ramps).
    """
    n = len(fns)
    for f in fns:
        for _ in range(warmup):
            f(sample)
    samples = [[[] for _ in range(repeats)] for _ in range(n)]
    for r in range(repeats):
        for it in progress(range(runs), desc=f"{desc} {r + 1}/{repeats}", unit="round"):
            for k in range(n):
                i = (it + k) % n
                t0 = time.perf_counter_ns()
                fns[i](sample)
                samples[i][r].append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def bench_host(
    artifacts: list[Artifact],
    model,
    inputs: np.ndarray,
    labels: np.ndarray | None,
    float_logits: np.ndarray | None,
    opts: BenchOptions,
    device: str,
    log=print,
) -> list[Record]:
    """Every artifact on its host runtime: load all, measure accuracy, then time round-robin."""
    from effdeploy.runtime.base import run_batched

    records, live = [], []
    for art in artifacts:
        if art.host_backend not in opts.backends:
            continue
        rec = Record(art.name, art.format, art.precision, art.producer, art.host_backend, device, opts.threads)
        rec.size_mb = art.size_mb
        before = _rss_mb()
        try:
            backend = _host_backend(art, model, opts.threads)
            rec.options = dict(getattr(backend, "session_options", {}))
            if float_logits is not None:
                _accuracy(rec, run_batched(backend, inputs, 64), float_logits, labels)
            backend.run(inputs[:1])
        except EffdeployError as err:
            rec.status = str(err)
            records.append(rec)
            continue
        except Exception as err:  # a runtime that cannot run this artifact: one line, keep going
            rec.status = f"{art.host_backend} failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            records.append(rec)
            continue
        after = _rss_mb()
        if before is not None and after is not None:
            rec.notes.append(f"resident memory grew {after - before:.1f} MB at load and first inference")
        records.append(rec)
        live.append((rec, backend))
    if live:
        log(f"timing {len(live)} artifacts round-robin: {opts.warmup} warm-up + {opts.runs} runs x {opts.repeats}")
        samples = time_round_robin([b.run for _, b in live], inputs[:1], opts.runs, opts.warmup, opts.repeats)
        for (rec, _), per_repeat in zip(live, samples, strict=True):
            rec.latency_ms = latency_stats([t for rep in per_repeat for t in rep], warmup=opts.warmup)
            medians = [float(np.median(rep)) for rep in per_repeat]
            rec.latency_ms["repeat_medians"] = medians
            spread = median_spread(min(medians), max(medians))
            rec.latency_ms["repeat_spread"] = spread
            if spread > NOISY_RATIO:
                rec.notes.append(f"noisy: repeat medians differ by {100 * spread:.0f}%")
    return records


def latency_ratios(records: list[Record]) -> list[dict]:
    """Each quantized artifact's median latency over float's, on the same backend and device."""
    out = []
    for rec in records:
        if not rec.ok or rec.latency_ms is None or rec.precision == "fp32":
            continue
        ref = next(
            (
                r
                for r in records
                if r.ok
                and r.latency_ms
                and r.precision == "fp32"
                and r.backend == rec.backend
                and r.device == rec.device
                and r.format == rec.format
                and r.options.get("xnnpack", None) == rec.options.get("xnnpack", None)
            ),
            None,
        )
        if ref is not None:
            out.append(
                {
                    "artifact": rec.artifact,
                    "reference": ref.artifact,
                    "backend": rec.backend,
                    "device": rec.device,
                    "ratio": rec.latency_ms["median"] / ref.latency_ms["median"],
                }
            )
    return out


def bench_run(run: RunConfig, artifact_dir: Path, opts: BenchOptions, *, out: Path | None = None, log=print) -> dict:
    """Benchmark every artifact in ``artifact_dir`` on the requested backends; write
    ``bench.json`` (this run), append ``bench.md`` and ``bench_history.jsonl``, plot ``bench.png``."""
    from effdeploy.bench import report as bench_report
    from effdeploy.data.sources import load_images
    from effdeploy.fileio import atomic_write_text, json_safe
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.runtime.base import run_batched

    out = Path(out or artifact_dir)
    checkpoint = Path(run.checkpoint) if run.checkpoint else None
    if checkpoint is not None and not checkpoint.is_file():
        raise EffdeployError(f"{checkpoint}: checkpoint not found")
    artifacts = find_artifacts(artifact_dir, checkpoint)
    machine = machine_record()
    host = describe(machine)
    log(f"bench {run.name}: {len(artifacts)} artifacts on {host}")

    model = load_checkpoint(checkpoint).eval() if checkpoint is not None else None
    pre = model.config.preprocess if model is not None else run.model.preprocess
    source = run.quant.eval_data or run.data.test
    labels = float_logits = None
    if source is None and opts.images:
        raise EffdeployError(
            f"{run.name}: no eval images (data.test or quant.eval_data); use --images 0 for latency only"
        )
    data = load_images(source, pre, n=max(opts.images, 1)) if source is not None else None
    if data is not None:
        inputs = data.inputs(pre)
        if len(data.class_names) == (model.config.num_classes if model is not None else run.model.num_classes):
            labels = np.asarray(data.labels)
    else:
        inputs = np.random.default_rng(0).standard_normal((1, 3, pre.resolution, pre.resolution)).astype(np.float32)
    if opts.images and model is not None:
        from effdeploy.runtime import load_backend

        float_logits = run_batched(load_backend("torch", model, threads=opts.threads), inputs, 64)
    else:
        inputs = inputs[:1]

    # host records say "host": the machine record (in the header and the JSON) describes it
    records = bench_host(artifacts, model, inputs, labels, float_logits, opts, "host", log=log)
    tflite = [a.path for a in artifacts if a.format == "tflite"]
    if "android" in opts.backends:
        from effdeploy.bench.android import bench_android

        records += bench_android(
            tflite,
            list(opts.serials) or None,
            adb=str(opts.adb) if opts.adb else None,
            binary=str(opts.benchmark_model) if opts.benchmark_model else None,
            threads=opts.threads,
            runs=opts.runs,
            warmup=opts.warmup,
            images=inputs if float_logits is not None else None,
            float_logits=float_logits,
            labels=labels,
            log=log,
            litert_binary=str(opts.benchmark_litert_model) if opts.benchmark_litert_model else None,
            dispatch_library=opts.dispatch_library,
        )
    if "edgetpu" in opts.backends:
        from effdeploy.bench.edgetpu import bench_edgetpu

        int8 = [a.path for a in artifacts if a.format == "tflite" and a.precision != "fp32"]
        records += bench_edgetpu(
            int8,
            compiler=opts.edgetpu_compiler,
            work_dir=out / "edgetpu",
            threads=opts.threads,
            runs=opts.runs,
            warmup=opts.warmup,
            images=inputs if float_logits is not None else None,
            float_logits=float_logits,
            labels=labels,
            log=log,
        )

    ratios = latency_ratios(records)
    noisy = [r.artifact + " on " + r.backend for r in records if any(n.startswith("noisy") for n in r.notes)]
    result = {
        "name": run.name,
        "artifact_dir": str(artifact_dir),
        "command": _command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "options": {
            "threads": opts.threads,
            "runs": opts.runs,
            "warmup": opts.warmup,
            "repeats": opts.repeats,
            "images": len(inputs) if float_logits is not None else 0,
            "eval_data": str(source) if source is not None else None,
            "batch": 1,
            "backends": list(opts.backends),
        },
        "too_noisy": noisy,
        "records": [r.to_dict() for r in records],
        "ratios": ratios,
    }
    result = json_safe(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "bench.json", json.dumps(result, indent=2))
    with open(out / "bench_history.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    bench_report.append_markdown(result, out / "bench.md")
    bench_report.plot(result, out / "bench.png")
    bench_report.print_bench(result)
    return result

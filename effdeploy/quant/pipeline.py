"""`effdeploy quantize`: a sequence of named stages.

- **load**: the checkpoint (reordered first when the config asks for another SE placement), the
  calibration images, the held-out images and the float network's logits on them;
- **calibrate** (``quant.method``): for each method, the baseline (min-max, round-to-nearest) and
  ours, a simulation calibrated on the same images and put through its registered passes;
- **measure** (``quant.measure``): the simulation on the held-out images;
- **emit** and **verify** (``quant.verify``): ours written as an ONNX QDQ model and a full-integer
  TFLite model, each run on the same images and checked against the simulation;
- **peers** (``quant.peers``): the tools users would otherwise pick, same model and images;
- **report**: ``report.json``, per-image logits (``outputs.npz``) and the SNR-per-block plot.

Precisions are independent of each other, and of the peers, and the baseline of ours: with
``jobs`` > 1 each method of each precision, and each peer tool of each run (all precisions in one
task, so that its float graph is exported and calibrated once), runs in a pool of processes
shared by all runs, longest task first (``run_tasks``). Every stage computes with one
intra-op thread, in each process: a float sum's rounding depends on how threads split it, and the
learning passes amplify that, so pinning is what makes the artifacts and reports the same
whatever the machine's core count.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effdeploy.config import RunConfig, parse_precision
from effdeploy.errors import EffdeployError
from effdeploy.metrics import topk_accuracy
from effdeploy.quant.measure import block_output_points, layer_snr, measure_sim, weight_bytes
from effdeploy.quant.method import Method, calibrated_sim, methods_for, report_layout, run_method
from effdeploy.quant.verify import runtime_artifacts
from effdeploy.runtime import load_backend
from effdeploy.runtime.base import run_batched

__all__ = [
    "Method",
    "PrecisionResult",
    "QuantInputs",
    "block_output_points",
    "calibrated_sim",
    "layer_snr",
    "load_inputs",
    "methods_for",
    "quantize_peers",
    "quantize_precision",
    "quantize_run",
    "quantize_runs",
    "report_layout",
    "run_method",
    "weight_bytes",
]

#: intra-op threads of every stage: the same results on any machine (see the module docstring)
THREADS = 1
#: What a quantize run writes: an earlier run's files of these names leave when a new set arrives.
QUANT_SET = re.compile(r"report\.json|snr_per_block\.png|outputs\.npz|(model|peer_.+)_w\d+a\d+\.(onnx|tflite)")
OUTPUTS = "outputs.npz"


@contextlib.contextmanager
def pinned_threads(n: int = THREADS) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- load -----------------------------------------------------------------------------------


@dataclass
class QuantInputs:
    """What every precision of a run reads: the output of the load stage (picklable, so that a
    worker process gets it whole)."""

    run: RunConfig
    model: torch.nn.Module
    reorder: dict | None
    cal_x: np.ndarray
    held_x: np.ndarray
    labels: np.ndarray
    float_logits: np.ndarray
    snr_idx: np.ndarray
    eval_source: Path
    same_as_calibration: bool

    @property
    def float_top1(self) -> float:
        return topk_accuracy(self.float_logits, self.labels, 1)

    def cal_batches(self) -> list[torch.Tensor]:
        return _batches(self.cal_x, 64)

    def snr_batches(self) -> list[torch.Tensor]:
        return _batches(self.held_x[self.snr_idx], 64)


def _batches(x: np.ndarray, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(x[i : i + size]) for i in range(0, len(x), size)]


def _ensure_placement(model, run: RunConfig, log):
    target = run.quant.se_placement
    if target is None or target == model.config.se_placement:
        return model, None
    from effdeploy.data.splits import load_split
    from effdeploy.transforms.reorder import reorder_model

    log(
        f"checkpoint has se_placement={model.config.se_placement!r}, config asks for {target!r}: "
        f"reordering (transplant + {run.reorder.steps} distillation steps) before calibrating"
    )
    train_set, val_set = load_split(run.model_copy(update={"model": model.config}))
    model, report = reorder_model(model, target, train_set, val_set, run.reorder, log=log)
    return model.eval(), {k: v for k, v in report.items() if k != "distill_history"}


def load_inputs(run: RunConfig, *, log=print) -> QuantInputs:
    """The load stage."""
    from effdeploy.data.sources import load_images
    from effdeploy.model.checkpoints import load_checkpoint

    q = run.quant
    if run.checkpoint is None or not Path(run.checkpoint).is_file():
        raise EffdeployError(f"{run.checkpoint}: checkpoint not found (train it with 'make train')")
    model = load_checkpoint(run.checkpoint).eval()
    model, reorder_report = _ensure_placement(model, run, log)
    pre = model.config.preprocess
    cal = load_images(q.calibration, pre, n=q.calibration_images)
    eval_source = q.eval_data or run.data.test
    if eval_source is None:
        raise EffdeployError("quant.eval_data (or data.test) is needed: held-out images to measure on")
    held = load_images(eval_source, pre, n=q.eval_images)
    held_x = held.inputs(pre)
    inputs = QuantInputs(
        run=run,
        model=model,
        reorder=reorder_report,
        cal_x=cal.inputs(pre),
        held_x=held_x,
        labels=np.asarray(held.labels, np.int64),
        float_logits=run_batched(load_backend("torch", model), held_x, 500),
        snr_idx=np.linspace(0, len(held) - 1, min(q.snr_images, len(held))).round().astype(int),
        eval_source=Path(eval_source),
        # where no other images exist (Lite0 here), the measurement set is the calibration set: say so
        same_as_calibration=Path(eval_source).resolve() == Path(q.calibration).resolve(),
    )
    kind = "images (the calibration images themselves)" if inputs.same_as_calibration else "held-out images"
    log(
        f"{run.name}: se_placement={model.config.se_placement}, float top-1 {100 * inputs.float_top1:.2f}% on "
        f"{len(held)} {kind} ({eval_source}); calibration: {len(cal)} images from {q.calibration}"
    )
    return inputs


# ---- one precision: calibrate, measure, emit, verify; the peers of every precision --------------------------------


@dataclass
class PrecisionResult:
    """One precision's report rows (baseline and ours), its peers' rows and its per-image logits."""

    precision: str
    rows: list[dict] = field(default_factory=list)
    peers: list[dict] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)


class _Stage:
    """Times a named stage and logs it when it ends: which stage ran, and for how long."""

    def __init__(self, log, label: str) -> None:
        self.log, self.label = log, label

    def __enter__(self):
        self.t0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.cpu0
            self.log(f"    {self.label} ({wall:.0f} s, CPU {cpu:.0f} s)")


def quantize_precision(
    inputs: QuantInputs, precision: str, out_dir: Path, *, log=print, methods: tuple[str, ...] | None = None
) -> PrecisionResult:
    """Every stage of one precision but the peers (``quantize_peers``), for each method (or those
    named in ``methods``); runtime artifacts are written into ``out_dir``."""
    run, q = inputs.run, inputs.run.quant
    result = PrecisionResult(precision)
    cal_batches, snr_batches = inputs.cal_batches(), inputs.snr_batches()
    for method in methods_for(run, precision):
        if methods is not None and method.name not in methods:
            continue
        t0 = time.perf_counter()
        passes = " + ".join(("observers", *method.passes))
        with _Stage(log, f"{precision} {method.name}: calibrate ({passes})"):
            sim, reports = run_method(inputs.model, q, method, precision, cal_batches)
        searched, ada, pass_reports = report_layout(reports)
        with _Stage(log, f"{precision} {method.name}: measure"):
            logits, measured = measure_sim(sim, inputs.held_x, inputs.labels, inputs.float_logits, snr_batches)
        result.outputs[f"{precision}.{method.name}"] = logits
        artifacts = {}
        if method.name == "ours":
            with _Stage(log, f"{precision} {method.name}: emit + verify ({', '.join(q.runtimes)})"):
                artifacts = runtime_artifacts(
                    sim,
                    q.runtimes,
                    out_dir,
                    precision,
                    inputs.cal_x,
                    inputs.held_x,
                    inputs.labels,
                    logits,
                    inputs.float_logits,
                    snr_batches,
                    outputs=result.outputs,
                )
        row = {
            "precision": precision,
            "method": method.to_dict(),
            **measured,
            "adaround": ada,
            "range_search": searched,
            "pass_reports": pass_reports,  # passes beyond the built-in ones, by name
            "artifacts": artifacts,
            "ranges": sim.ranges(),
        }
        result.rows.append(row)
        for art in artifacts.values():
            if "skipped" in art:
                log(f"    {art['runtime']}: skipped ({art['skipped']})")
                continue
            log(
                f"    {art['file']} in {art['runtime']}: agreement with simulation "
                f"{100 * art['agreement_with_simulation']:.2f}%, SNR {art['output_snr_db']:.2f} dB "
                f"(simulation {row['output_snr_db']:.2f})"
            )
        log(
            f"  {precision} {method.name:6s}: top-1 {100 * row['top1']:.2f}% "
            f"({100 * row['top1_delta']:+.2f}), agreement {100 * row['agreement']:.2f}%, "
            f"SNR {row['output_snr_db']:.2f} dB ({time.perf_counter() - t0:.0f} s)"
        )
    return result


def quantize_peers(
    inputs: QuantInputs, out_dir: Path, *, log=print, tools: tuple[str, ...] | None = None
) -> dict[str, PrecisionResult]:
    """The peers stage of every precision of a run (of the peer tools named in ``tools``, default
    all): each tool's BN-folded float graph (ONNX for onnxruntime, TFLite for ai-edge-quantizer) is
    exported, and the tool calibrates, once for all precisions.
    Returns, per precision, a result holding only its peers' rows and per-image logits."""
    import tempfile

    from effdeploy.quant.peers import PeerWork, run_peers

    results = {}
    with tempfile.TemporaryDirectory(prefix="effdeploy-peers-") as tmp:
        work = PeerWork(Path(tmp))
        for precision in inputs.run.quant.precisions:
            wb, ab = parse_precision(precision)
            result = results[precision] = PrecisionResult(precision)
            with _Stage(log, f"{precision} peers" + (f" ({', '.join(tools)})" if tools else "")):
                result.peers = run_peers(
                    inputs.model,
                    inputs.cal_x,
                    inputs.held_x,
                    inputs.labels,
                    inputs.float_logits,
                    wb,
                    ab,
                    out_dir,
                    log=log,
                    outputs=result.outputs,
                    work=work,
                    tools=tools,
                )
    return results


# ---- report ---------------------------------------------------------------------------------


def build_report(inputs: QuantInputs, results: list[PrecisionResult]) -> dict:
    """The report's one schema: the run, the float network, the data, then a row per precision and
    method (``results``) and per precision and peer (``peers``), in the config's precision order."""
    run, q, model = inputs.run, inputs.run.quant, inputs.model
    float_params = sum(p.numel() for p in model.parameters())
    return {
        "name": run.name,
        "checkpoint": str(run.checkpoint),
        "se_placement": model.config.se_placement,
        "reorder": inputs.reorder,
        "float": {
            "top1": inputs.float_top1,
            "top5": topk_accuracy(inputs.float_logits, inputs.labels, 5),
            "bytes": 4 * float_params,
        },
        "held_out": {
            "data": str(inputs.eval_source),
            "images": len(inputs.labels),
            "snr_images": len(inputs.snr_idx),
            "same_as_calibration": inputs.same_as_calibration,
        },
        "calibration": {"file": str(q.calibration), "images": len(inputs.cal_x)},
        "config": json.loads(q.model_dump_json()),
        "snr_definition": (
            "10*log10(sum(ref^2) / sum((q - ref)^2)) in dB, ref = float (BN-folded) network; at a point "
            "with a limit (a sigmoid's input, ranges['limit']) ref is clamped to it: past it the "
            "sigmoid cannot tell values apart"
        ),
        "runtime": "simulation (PyTorch fake-quant); ONNX QDQ in onnxruntime, full-integer TFLite in LiteRT (CPU)",
        "results": [row for r in results for row in r.rows],
        "peers": [row for r in results for row in r.peers],
    }


def write_report(inputs: QuantInputs, results: list[PrecisionResult], out_dir: Path) -> dict:
    """The report stage: report.json, outputs.npz (per-image logits of float and every variant, so
    that paired statistics later need no rerun) and the SNR-per-block plot."""
    from effdeploy.fileio import atomic_write_text, json_safe

    report = build_report(inputs, results)
    outputs = {"labels": inputs.labels, "float": inputs.float_logits}
    for r in results:
        outputs.update(r.outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(json_safe(report), indent=2, default=str))
    save_outputs(outputs, out_dir / OUTPUTS)
    plot_block_snr(report, out_dir / "snr_per_block.png")
    return report


def save_outputs(outputs: dict[str, np.ndarray], path: Path) -> None:
    """Per-image logits as one compressed npz: ``labels``, ``float``, ``{precision}.{method}`` for
    the simulation, ``{precision}.ours.{artifact}`` for the runtimes, ``{precision}.peer.{name}``.
    The archive's entries carry a fixed date, so the same logits give the same bytes."""
    import io
    import zipfile

    from effdeploy.fileio import atomic_write_bytes

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, value in sorted(outputs.items()):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    atomic_write_bytes(path, buf.getvalue())


def plot_block_snr(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effdeploy.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = None
    for row in report["results"]:
        blocks = row["block_snr_db"]
        names = [n.split(".")[1] for n in blocks]
        ax.plot(
            range(len(blocks)), list(blocks.values()), marker="o", label=f"{row['precision']} {row['method']['name']}"
        )
    if names:
        ax.set_xticks(range(len(names)), names, rotation=60)
    ax.set_ylabel("SNR of block output (dB)")
    ax.set_title(f"{report['name']} (se_placement={report['se_placement']}): quantized vs float, held-out images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


# ---- the whole job --------------------------------------------------------------------------


def quantize_run(run: RunConfig, out_dir: str | Path, *, log=print, jobs: int = 1) -> dict:
    """Quantize and measure ``run`` into ``out_dir``; returns the report (see ``quantize_runs``)."""
    return quantize_runs([(run, Path(out_dir))], log=log, jobs=jobs)[0]


def quantize_runs(runs: list[tuple[RunConfig, Path]], *, log=print, jobs: int = 1) -> list[dict]:
    """Quantize and measure each ``(run, out_dir)``, the precisions of all runs in one pool of
    ``jobs`` processes. Each run's files (report, plot, outputs, runtime and peer artifacts) are
    staged and moved into its ``out_dir`` together when all its precisions are done, so an
    interrupted run leaves the previous complete set (fileio.staged_dir). Bad ``out_dir``s fail
    before any work."""
    from effdeploy.fileio import check_writable_dir, relocate, relocate_json_file, staged_dir

    for _, out_dir in runs:
        check_writable_dir(out_dir, "--out")
    owns = lambda name: QUANT_SET.fullmatch(name) is not None  # noqa: E731
    with contextlib.ExitStack() as stack, pinned_threads():
        stages = [stack.enter_context(staged_dir(out, owns=owns, last="report.json")) for _, out in runs]
        tasks = [(i, t) for i, (run, _) in enumerate(runs) for t in run_tasks(run)]
        costs = {t: task_cost(runs[t[0]][0], t[1]) for t in tasks}
        tag = (lambda i: f"[{runs[i][0].name}] ") if len(runs) > 1 else (lambda i: "")
        # the workers start (and import the libraries) while this process loads the inputs
        pooled = stack.enter_context(_pool(jobs, len(tasks)))
        inputs = [load_inputs(run, log=log) for run, _ in runs]
        done = _run_tasks(inputs, tasks, costs, stages, pooled, tag, log)
        merged = {(i, p): PrecisionResult(p) for i, (run, _) in enumerate(runs) for p in run.quant.precisions}
        for i, task in tasks:  # in run_tasks' order: the baseline, ours, then the peers, tool by tool
            parts = done[(i, task)]
            for part in parts.values() if isinstance(parts, dict) else [parts]:
                into = merged[(i, part.precision)]
                into.rows += part.rows
                into.peers += part.peers
                into.outputs.update(part.outputs)
        reports = []
        for i, (_, out_dir) in enumerate(runs):
            ordered = [merged[(i, p)] for p in runs[i][0].quant.precisions]
            report = write_report(inputs[i], ordered, stages[i])
            relocate_json_file(stages[i] / "report.json", stages[i], Path(out_dir))  # paths as they will be found
            reports.append(relocate(report, stages[i], Path(out_dir)))
    return reports


#: the task name prefix of a run's peers stage (all its precisions), one task per peer tool
PEERS = "peers"


def run_tasks(run: RunConfig) -> list[str]:
    """A run's independent tasks, in report order: per precision the baseline
    (``"w8a8:minmax"``) and ours (``"w8a8:ours"``), then per peer tool all precisions' peers
    (``"peers:onnxruntime"``). Small tasks let a pool of processes finish together."""
    names = [m.name for m in methods_for(run, run.quant.precisions[0])] if run.quant.precisions else []
    tasks = [f"{p}:{m}" for p in run.quant.precisions for m in names]
    if run.quant.peers:
        from effdeploy.quant.peers import TOOLS

        tasks += [f"{PEERS}:{tool}" for tool in TOOLS]
    return tasks


def task_cost(run: RunConfig, task: str) -> float:
    """A rough CPU-seconds estimate of one task on a B0-class CIFAR model, used only to start the
    longest tasks first so that the pool's processes finish together (it changes no result)."""
    from effdeploy.quant.registry import enabled_passes

    head, part = task.split(":")
    q = run.quant
    if head == PEERS:
        return (30.0 + 40.0 * len(q.precisions)) if part == "onnxruntime" else (40.0 + 10.0 * len(q.precisions))
    if part == "minmax":
        return 12.0
    q = q.for_precision(head)
    passes = enabled_passes(q, parse_precision(head)[0])
    per_pass = {
        "range_search": 300.0,
        "learn_ranges": 0.3 * q.learn_ranges_steps,
        "adaround": 0.22 * q.adaround_iters,
        "block_reconstruction": 1.0 * q.block_reconstruction_iters,
        "bias_correction": 6.0,
    }
    return 40.0 + sum(per_pass.get(name, 30.0) for name in passes)


def _run_task(inputs: QuantInputs, task: str, out_dir: Path, log):
    head, part = task.split(":")
    if head == PEERS:
        return quantize_peers(inputs, out_dir, log=log, tools=(part,))
    return quantize_precision(inputs, head, out_dir, log=log, methods=(part,))


@contextlib.contextmanager
def _pool(jobs: int, n_tasks: int) -> Iterator:
    """A pool of ``min(jobs, n_tasks)`` worker processes, already starting, and that number
    (None for one job); on exit, a failure stops the tasks that have not started."""
    if jobs <= 1 or n_tasks <= 1:
        yield None
        return
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = min(jobs, n_tasks)
    # spawn: a forked copy of a process that has used torch's thread pool can hang in OpenMP
    ctx = mp.get_context("spawn")
    verbose = os.environ.get("EFFDEPLOY_VERBOSE", "") == "1"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(verbose,))
    try:
        for _ in range(workers):
            pool.submit(_warm_up)
        yield pool, workers
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _warm_up() -> None:
    """Import the libraries every worker's tasks load (the exporters, quantizers and runtimes),
    while the parent process loads the inputs and the worker would wait for its first task."""
    import importlib

    for name in (
        "effdeploy.quant.passes",
        "effdeploy.quant.verify",
        "effdeploy.quant.emit_tflite",
        "onnx",
        "onnxruntime",
        "ai_edge_litert.interpreter",
        "ai_edge_quantizer.quantizer",
        "litert_torch",
    ):
        with contextlib.suppress(ImportError):  # a missing optional library is the task's to report
            importlib.import_module(name)


def _run_tasks(inputs, tasks, costs, stages, pooled, tag: Callable[[int], str], log) -> dict:
    order = sorted(tasks, key=lambda t: -costs[t])  # longest first (stable: config order on ties)
    if pooled is None:
        return {(i, t): _run_task(inputs[i], t, stages[i], _tagged(log, tag(i))) for i, t in order}
    pool, workers = pooled
    log(f"quantizing: {len(tasks)} tasks (methods and peer tools) in {workers} processes, {THREADS} thread each")
    futures = {(i, t): pool.submit(_worker, inputs[i], t, stages[i], tag(i)) for i, t in order}
    return {key: fut.result() for key, fut in futures.items()}


def _tagged(log, prefix: str):
    return log if not prefix else (lambda msg: log(f"{prefix}{msg}"))


def _init_worker(verbose: bool) -> None:
    from effdeploy.quiet import quiet_third_party

    quiet_third_party(verbose)  # a worker is a fresh process: quiet it as the CLI quiets itself
    torch.set_num_threads(THREADS)


def _worker(inputs: QuantInputs, task: str, out_dir: Path, prefix: str):
    from effdeploy.progress import set_label

    set_label(f"{prefix.strip('[] ')} {task}".strip())

    def log(msg: str) -> None:
        print(f"{prefix}{msg}", flush=True)

    return _run_task(inputs, task, out_dir, log)

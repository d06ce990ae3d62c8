"""`effdeploy quantize`: checkpoint (+ reorder) -> calibrate -> PTQ passes -> measure on held-out
images -> report.json + SNR-per-block PNG.

For every precision two methods are measured side by side on the same calibration set:
``minmax`` (min-max ranges, round-to-nearest: the field's baseline) and ``ours`` (the configured
observers, AdaRound when weights have fewer than 8 bits, bias correction). Both run in the
simulation, the reference every runtime artifact is checked against. Ours is then emitted as an
ONNX QDQ model (onnxruntime) and a full-integer TFLite model (LiteRT), each run on the same
held-out images; the peers (``peers.py``) quantize the same float model with their own tools.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from effdeploy.config import RunConfig, parse_precision
from effdeploy.errors import EffdeployError
from effdeploy.metrics import SnrAccumulator, snr_db, top1_agreement, topk_accuracy, within_contract
from effdeploy.quant.sim import QuantSim
from effdeploy.runtime import load_backend
from effdeploy.runtime.base import run_batched


@dataclass(frozen=True)
class Method:
    """A way to quantize: its observers, the registered passes it runs (``quant.registry``), and
    the pass options that distinguish two runs of the same passes."""

    name: str
    observer: str
    weight_observer: str
    passes: tuple[str, ...] = ()
    range_search_objective: str = "relative"
    adaround_balance: bool = False
    saturate_sigmoid_inputs: bool = False

    def __getattr__(self, name: str):
        # ``method.adaround`` etc.: whether a registered pass of that name runs
        from effdeploy.quant.registry import all_passes

        if name in {p.name for p in all_passes()}:
            return name in self.passes
        raise AttributeError(name)

    def to_dict(self) -> dict:
        """The report's ``method``: its fields, and one true/false key per registered pass."""
        from effdeploy.quant.registry import all_passes

        d = asdict(self)
        d.update({p.name: p.name in self.passes for p in all_passes()})
        d["passes"] = list(self.passes)
        return d


def methods_for(run: RunConfig, precision: str) -> list[Method]:
    """The baseline and our method at ``precision`` (the quant section's ``by_precision`` applied)."""
    from effdeploy.quant.registry import enabled_passes

    q = run.quant.for_precision(precision)
    weight_bits, _ = parse_precision(precision)
    return [
        Method("minmax", "minmax", "minmax"),
        Method(
            "ours",
            q.observer,
            q.weight_observer,
            passes=enabled_passes(q, weight_bits),
            range_search_objective=q.range_search_objective,
            adaround_balance=q.adaround_balance,
            saturate_sigmoid_inputs=q.saturate_sigmoid_inputs,
        ),
    ]


def run_method(model, q, method: Method, precision: str, cal_batches: list[torch.Tensor]):
    """The simulation of ``method`` at ``precision``, calibrated on ``cal_batches`` and through its
    passes in registry order. Returns the simulation and each pass's report by name."""
    from effdeploy.quant.registry import run_passes

    q = q.for_precision(precision)
    wb, ab = parse_precision(precision)
    sim = QuantSim(
        model,
        weight_bits=wb,
        act_bits=ab,
        weight_overrides=[(o.pattern, o.weight_bits) for o in q.overrides],
        act_overrides=[(o.pattern, o.act_bits) for o in q.overrides],
        saturate_sigmoid_inputs=method.saturate_sigmoid_inputs,
    )
    sim.calibrate(cal_batches, observer=method.observer, weight_observer=method.weight_observer)
    return sim, run_passes(sim, cal_batches, q, method.passes)


def calibrated_sim(model, q, method: Method, precision: str, cal_batches: list[torch.Tensor]):
    """``run_method`` with the reports in the report's layout: the simulation, the range-search
    report (with the range-learning report as its ``"learned"``) and the AdaRound report, each
    None where its pass did not run."""
    sim, reports = run_method(model, q, method, precision, cal_batches)
    searched, ada, _ = report_layout(reports)
    return sim, searched, ada


def report_layout(reports: dict) -> tuple[dict | None, dict | None, dict]:
    """Pass reports as a report row holds them: the range-search report (the range-learning one as
    its ``"learned"``), the AdaRound report, and the reports of every other pass but bias
    correction (which reports nothing worth keeping), by name."""
    rest = {
        k: v for k, v in reports.items() if k not in ("range_search", "learn_ranges", "adaround", "bias_correction")
    }
    searched = reports.get("range_search")
    if "learn_ranges" in reports:
        searched = {**(searched or {}), "learned": reports["learn_ranges"]}
    return searched, reports.get("adaround"), rest


def block_output_points(sim: QuantSim) -> list[str]:
    """The tensor each MBConv block hands to the next: the residual add, or the projection."""
    out = []
    for spec in sim.model.arch.blocks:
        name = f"blocks.{spec.name}"
        out.append(name if spec.has_residual else f"{name}.project.conv")
    return out


def _batches(x: np.ndarray, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(x[i : i + size]) for i in range(0, len(x), size)]


def _ensure_placement(model, run: RunConfig, log):
    target = run.quant.se_placement
    if target is None or target == model.config.se_placement:
        return model, None
    from effdeploy.train.reorder import reorder_model
    from effdeploy.train.trainer import load_split

    log(
        f"checkpoint has se_placement={model.config.se_placement!r}, config asks for {target!r}: "
        f"reordering (transplant + {run.reorder.steps} distillation steps) before calibrating"
    )
    train_set, val_set = load_split(run.model_copy(update={"model": model.config}))
    model, report = reorder_model(model, target, train_set, val_set, run.reorder, log=log)
    return model.eval(), {k: v for k, v in report.items() if k != "distill_history"}


def quantize_run(run: RunConfig, out_dir: str | Path, *, log=print) -> dict:
    """Quantize and measure ``run``; its files (report, plot, outputs, runtime and peer artifacts)
    are staged and moved into ``out_dir`` together when the run completes, so an interrupted run
    leaves the previous complete set (fileio.staged_dir). A bad ``out_dir`` fails before any work."""
    from effdeploy.fileio import check_writable_dir, relocate, relocate_json_file, staged_dir

    check_writable_dir(out_dir, "--out")
    with staged_dir(out_dir, owns=lambda name: QUANT_SET.fullmatch(name) is not None, last="report.json") as stage:
        report = _quantize_into(run, stage, log=log)
        relocate_json_file(stage / "report.json", stage, Path(out_dir))  # paths as they will be found
    return relocate(report, stage, Path(out_dir))


#: What a quantize run writes: an earlier run's files of these names leave when a new set arrives.
QUANT_SET = re.compile(r"report\.json|snr_per_block\.png|outputs\.npz|(model|peer_.+)_w\d+a\d+\.(onnx|tflite)")


def _quantize_into(run: RunConfig, out_dir: Path, *, log=print) -> dict:
    from effdeploy.data.sources import load_images
    from effdeploy.fileio import atomic_write_text
    from effdeploy.model.checkpoints import load_checkpoint

    q = run.quant
    out_dir = Path(out_dir)
    if run.checkpoint is None or not Path(run.checkpoint).is_file():
        raise EffdeployError(f"{run.checkpoint}: checkpoint not found (train it with 'make train')")
    model = load_checkpoint(run.checkpoint).eval()
    model, reorder_report = _ensure_placement(model, run, log)
    pre = model.config.preprocess

    cal = load_images(q.calibration, pre, n=q.calibration_images)
    cal_x = cal.inputs(pre)
    cal_batches = _batches(cal_x, 64)
    eval_source = q.eval_data or run.data.test
    if eval_source is None:
        raise EffdeployError("quant.eval_data (or data.test) is needed: held-out images to measure on")
    held = load_images(eval_source, pre, n=q.eval_images)
    held_x = held.inputs(pre)
    float_logits = run_batched(load_backend("torch", model), held_x, 500)
    float_top1 = topk_accuracy(float_logits, held.labels, 1)
    snr_idx = np.linspace(0, len(held) - 1, min(q.snr_images, len(held))).round().astype(int)
    snr_batches = _batches(held_x[snr_idx], 64)
    float_params = sum(p.numel() for p in model.parameters())
    # where no other images exist (Lite0 here), the measurement set is the calibration set: say so
    same = Path(eval_source).resolve() == Path(q.calibration).resolve()
    kind = "images (the calibration images themselves)" if same else "held-out images"
    log(
        f"{run.name}: se_placement={model.config.se_placement}, float top-1 {100 * float_top1:.2f}% on "
        f"{len(held)} {kind} ({eval_source}); calibration: {len(cal)} images from {q.calibration}"
    )

    results = []
    peers: list[dict] = []
    # per-image logits of float and of every variant: paired statistics later need no rerun
    outputs: dict[str, np.ndarray] = {"labels": np.asarray(held.labels, np.int64), "float": float_logits}
    for precision in q.precisions:
        wb, ab = parse_precision(precision)
        for method in methods_for(run, precision):
            t0 = time.perf_counter()
            sim, reports = run_method(model, q, method, precision, cal_batches)
            searched, ada, pass_reports = report_layout(reports)
            logits = run_batched(load_backend("torch", sim), held_x, 500)
            outputs[f"{precision}.{method.name}"] = logits
            layers = layer_snr(sim, snr_batches)
            artifacts = {}
            if method.name == "ours":
                artifacts = runtime_artifacts(
                    sim,
                    q.runtimes,
                    out_dir,
                    precision,
                    cal_x,
                    held_x,
                    held.labels,
                    logits,
                    float_logits,
                    snr_batches,
                    outputs=outputs,
                )
            ranked = sorted(((v, k) for k, v in layers.items()), key=lambda t: t[0])
            top1 = topk_accuracy(logits, held.labels, 1)
            row = {
                "precision": precision,
                "method": method.to_dict(),
                "top1": top1,
                "top5": topk_accuracy(logits, held.labels, 5),
                "top1_delta": top1 - float_top1,
                "agreement": top1_agreement(float_logits, logits),
                "output_snr_db": snr_db(float_logits, logits),
                "worst_layers": [{"name": k, "snr_db": v} for v, k in ranked[:3]],
                "layer_snr_db": layers,
                "block_snr_db": {n: layers[n] for n in block_output_points(sim)},
                "weight_bytes": weight_bytes(sim),
                "adaround": ada,
                "range_search": searched,
                "pass_reports": pass_reports,  # passes beyond the built-in ones, by name
                "artifacts": artifacts,
                "ranges": sim.ranges(),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results.append(row)
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
                f"SNR {row['output_snr_db']:.2f} dB ({row['seconds']:.0f} s)"
            )
        if q.peers:
            from effdeploy.quant.peers import run_peers

            peers.extend(
                run_peers(model, cal_x, held_x, held.labels, float_logits, wb, ab, out_dir, log=log, outputs=outputs)
            )

    report = {
        "name": run.name,
        "checkpoint": str(run.checkpoint),
        "se_placement": model.config.se_placement,
        "reorder": reorder_report,
        "float": {"top1": float_top1, "top5": topk_accuracy(float_logits, held.labels, 5), "bytes": 4 * float_params},
        "held_out": {
            "data": str(eval_source),
            "images": len(held),
            "snr_images": len(snr_idx),
            "same_as_calibration": same,
        },
        "calibration": {"file": str(q.calibration), "images": len(cal)},
        "config": json.loads(q.model_dump_json()),
        "snr_definition": (
            "10*log10(sum(ref^2) / sum((q - ref)^2)) in dB, ref = float (BN-folded) network; at a point "
            "with a limit (a sigmoid's input, ranges['limit']) ref is clamped to it: past it the "
            "sigmoid cannot tell values apart"
        ),
        "runtime": "simulation (PyTorch fake-quant); ONNX QDQ in onnxruntime, full-integer TFLite in LiteRT (CPU)",
        "results": results,
        "peers": peers,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    from effdeploy.report import json_safe

    atomic_write_text(out_dir / "report.json", json.dumps(json_safe(report), indent=2, default=str))
    save_outputs(outputs, out_dir / OUTPUTS)
    plot_block_snr(report, out_dir / "snr_per_block.png")
    return report


OUTPUTS = "outputs.npz"


def save_outputs(outputs: dict[str, np.ndarray], path: Path) -> None:
    """Per-image logits as one compressed npz: ``labels``, ``float``, ``{precision}.{method}`` for
    the simulation, ``{precision}.ours.{artifact}`` for the runtimes, ``{precision}.peer.{name}``."""
    import io

    from effdeploy.fileio import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.ascontiguousarray(v) for k, v in sorted(outputs.items())})
    atomic_write_bytes(path, buf.getvalue())


def runtime_artifacts(
    sim: QuantSim,
    runtimes,
    out_dir: Path,
    precision: str,
    calibration: np.ndarray,
    held_x: np.ndarray,
    labels: np.ndarray,
    sim_logits: np.ndarray,
    float_logits: np.ndarray,
    snr_batches: list[torch.Tensor],
    outputs: dict[str, np.ndarray] | None = None,
) -> dict:
    """Emit each runtime artifact of this configuration, run it on the held-out images and
    compare with the simulation (the contract: top-1 agreement >= 99%, output SNR within 1 dB)."""

    out: dict[str, dict] = {}
    logits: dict[str, np.ndarray] = {}
    if "onnxruntime" in runtimes:
        from effdeploy.quant.emit_onnx import emit_qdq_onnx, onnxruntime_layer_snr

        path = out_dir / f"model_{precision}.onnx"
        emit_qdq_onnx(sim, path)
        backend = load_backend("onnxruntime", path)
        info = {"file": path.name, "bytes": path.stat().st_size, "runtime": "onnxruntime"}
        info["session_options"] = backend.session_options
        logits["onnx_qdq"] = run_batched(backend, held_x, 256)
        out["onnx_qdq"] = _compare(info, logits["onnx_qdq"], labels, sim_logits, float_logits)
        out["onnx_qdq"]["layer_snr_db"] = onnxruntime_layer_snr(path, sim, snr_batches)
    if "litert" in runtimes:
        from effdeploy.quant.emit_tflite import emit_tflite, litert_layer_snr

        path = out_dir / f"model_{precision}.tflite"
        try:
            info = emit_tflite(sim, path, calibration)
        except EffdeployError as err:
            out["tflite_int8"] = {"runtime": "litert", "skipped": str(err)}
            info = None
        if info is not None:
            tensor_map = info.pop("tensor_map")
            info.update(runtime="litert", session_options={"delegate": "XNNPACK (LiteRT default, CPU)"})
            logits["tflite_int8"] = run_batched(load_backend("litert", path), held_x, 256)
            out["tflite_int8"] = _compare(info, logits["tflite_int8"], labels, sim_logits, float_logits)
            out["tflite_int8"]["layer_snr_db"] = litert_layer_snr(path, tensor_map, sim, snr_batches)
    if outputs is not None:
        outputs.update({f"{precision}.ours.{k}": v for k, v in logits.items()})
    if len(logits) == 2:
        # how well two integer runtimes of the same configuration agree with each other: the
        # yardstick for their agreement with the simulation (a one-step rounding difference
        # anywhere in 16 blocks moves a few borderline images, whoever does the rounding)
        a, b = logits.values()
        out["tflite_int8"]["agreement_with_onnxruntime"] = top1_agreement(a, b)
        out["tflite_int8"]["snr_vs_onnxruntime_db"] = snr_db(a, b)
    return out


def _compare(info: dict, out: np.ndarray, labels: np.ndarray, sim_logits: np.ndarray, float_logits: np.ndarray) -> dict:
    row = {
        **info,
        "top1": topk_accuracy(out, labels, 1),
        "agreement_with_simulation": top1_agreement(sim_logits, out),
        "snr_vs_simulation_db": snr_db(sim_logits, out),
        "output_snr_db": snr_db(float_logits, out),
        "snr_gap_db": snr_db(float_logits, sim_logits) - snr_db(float_logits, out),
        "agreement_with_float": top1_agreement(float_logits, out),
    }
    return {**row, "within_contract": within_contract(row)}


@torch.no_grad()
def layer_snr(sim: QuantSim, batches: list[torch.Tensor]) -> dict[str, float]:
    """SNR in dB of every quantization point, quantized network vs float network, same inputs."""
    acc = SnrAccumulator()
    for x in batches:
        _, fq = sim.run_capture(x, quantized=False)
        _, qq = sim.run_capture(x, quantized=True)
        for name, ref in fq.items():
            acc.add(name, sim.points[name].reference(ref).numpy(), qq[name].numpy())
    return acc.result()


def weight_bytes(sim: QuantSim) -> int:
    """Integer weights at their bit width, int32 biases, one float32 scale per output channel."""
    total = 0.0
    for w in sim.weights.values():
        total += w.float_weight.numel() * w.bits / 8
        out_ch = w.float_weight.shape[0]
        total += 4 * out_ch * 2  # bias + scale
    return int(total)


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
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)

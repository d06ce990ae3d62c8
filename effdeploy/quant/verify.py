"""The emit and verify stages: write each runtime artifact of a simulation (the emitters only
write files), run it on the held-out images through the runtime layer, and check it against the
simulation under the runtime contract (top-1 agreement >= 99%, output SNR within 1 dB); the
layer SNRs compare the runtime's intermediate tensors with the float network."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from effdeploy.errors import EffdeployError
from effdeploy.metrics import SnrAccumulator, snr_db, top1_agreement, topk_accuracy, within_contract
from effdeploy.quant.sim import QuantSim
from effdeploy.runtime import load_backend
from effdeploy.runtime.base import run_batched


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
        from effdeploy.quant.emit_onnx import emit_qdq_onnx

        path = out_dir / f"model_{precision}.onnx"
        emit_qdq_onnx(sim, path)
        backend = load_backend("onnxruntime", path, threads=1)  # pinned: the same numbers on any machine
        info = {"file": path.name, "bytes": path.stat().st_size, "runtime": "onnxruntime"}
        info["session_options"] = backend.session_options
        logits["onnx_qdq"] = run_batched(backend, held_x, 256)
        out["onnx_qdq"] = _compare(info, logits["onnx_qdq"], labels, sim_logits, float_logits)
        out["onnx_qdq"]["layer_snr_db"] = onnxruntime_layer_snr(path, sim, snr_batches)
    if "litert" in runtimes:
        from effdeploy.quant.emit_tflite import emit_tflite

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


def onnxruntime_points(path: str | Path, sim: QuantSim) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A function x -> {point: onnxruntime's dequantized tensor} for the QDQ model at ``path``,
    each point's DequantizeLinear output exposed as a graph output (so from onnxruntime's
    unfused QDQ path, see ``runtime.intermediates``)."""
    from effdeploy.quant.emit_onnx import dequantized_name
    from effdeploy.runtime.intermediates import onnxruntime_tensors

    point_of = {dequantized_name(p): p for p in sim.points}
    run = onnxruntime_tensors(path, list(point_of), x64quantprecision=True)

    def points(x: np.ndarray) -> dict[str, np.ndarray]:
        return {point_of[tensor]: value for tensor, value in run(x).items()}

    return points


def onnxruntime_layer_snr(path: str | Path, sim: QuantSim, batches: list[torch.Tensor]) -> dict[str, float]:
    """Per point SNR (dB) of onnxruntime's dequantized tensors against the float network (from
    the unfused QDQ path, see ``onnxruntime_points``; the report's output SNR comes from the
    model as shipped)."""
    run = onnxruntime_points(path, sim)
    acc = SnrAccumulator()
    for x in batches:
        _, ref = sim.run_capture(x, quantized=False)
        for point, value in run(x.numpy()).items():
            acc.add(point, sim.points[point].reference(ref[point]).numpy(), value)
    return acc.result()


def litert_layer_snr(
    path: str | Path, tensor_map: dict[str, str], sim: QuantSim, batches: list[torch.Tensor]
) -> dict[str, float]:
    """Per point SNR (dB) of the LiteRT int8 tensors (``tensor_map``: TFLite tensor -> point, as
    ``emit_tflite`` returns it) against the float network, same images."""
    from effdeploy.quant.emit_tflite import nhwc
    from effdeploy.runtime.intermediates import litert_tensors

    acc = SnrAccumulator()
    for x in batches:
        _, ref = sim.run_capture(x, quantized=False)
        _, values = litert_tensors(path, np.transpose(x.numpy(), (0, 2, 3, 1)))
        seen = set()
        for name, point in tensor_map.items():
            if name not in values or point in seen:
                continue  # one tensor per point (a RESHAPE can repeat its input's numbers)
            seen.add(point)
            acc.add(point, nhwc(sim.points[point].reference(ref[point])), values[name])
    return acc.result()

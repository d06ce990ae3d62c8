"""The tools our users would otherwise reach for, run on the same model and calibration images:

- onnxruntime ``quantize_static``: QDQ, per-channel weights, calibration MinMax and Percentile,
  run in onnxruntime with ``session.x64quantprecision=1`` (the exact path) and, for MinMax, also
  with the default session (whose int8 kernels saturate on x86 CPUs without VNNI: shown so the
  trap is visible). Its Entropy calibration is not run: with ``quantize_static``'s defaults
  (``num_bins`` = ``num_quantized_bins`` = 128, which its options cannot change) the KL search
  has one candidate threshold, the whole histogram, so it gives MinMax's ranges exactly
  (``onnxruntime/quantization/calibrate.py``, ``get_entropy_threshold``; measured: 239 of 239
  activation ranges equal on the CIFAR SE-after model);
- ai-edge-quantizer's static recipe with its own calibration (a moving average of per-batch
  min/max), run in LiteRT.

Each peer starts from the same BN-folded float graph the simulation quantizes (folding is what
every int8 runtime does anyway) and is measured like ours: top-1, agreement with float, output
SNR, size, and, where intermediate tensors can be read, the per-point SNR (LiteRT).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from effdeploy.errors import EffdeployError
from effdeploy.metrics import snr_db, top1_agreement, topk_accuracy

#: the peer tools, each one task of ``effdeploy quantize`` (``Peer.tool``)
TOOLS = ("onnxruntime", "ai-edge-quantizer")


@dataclass(frozen=True)
class Peer:
    name: str
    tool: str  # onnxruntime | ai-edge-quantizer
    calibration: str
    session: str = "x64quantprecision"  # onnxruntime session options for the run


def peers_for(weight_bits: int, act_bits: int) -> list[Peer]:
    """The peers that can express this precision (onnxruntime: int8/int4 weights, int8
    activations; ai-edge-quantizer: int8/int4 weights, int8 activations)."""
    if act_bits != 8 or weight_bits not in (4, 8):
        return []
    out = [
        Peer("ort-minmax", "onnxruntime", "MinMax"),
        Peer("ort-minmax-default-session", "onnxruntime", "MinMax", session="default"),
        Peer("ort-percentile", "onnxruntime", "Percentile"),
        Peer("aeq-static", "ai-edge-quantizer", "moving-average min/max"),
    ]
    return out


def equal_batch(n: int, most: int = 32) -> int:
    """The largest batch of at most ``most`` images that splits ``n`` evenly. onnxruntime's
    histogram calibrators (Percentile, Entropy) stack the per-batch outputs with ``np.asarray``,
    which fails on a shorter last batch (100 images in 32s: 32, 32, 32, 4)."""
    return max(d for d in range(1, min(most, n) + 1) if n % d == 0)


class _Reader:
    """onnxruntime's CalibrationDataReader over an NCHW array, in equal batches."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 32) -> None:
        batch = equal_batch(len(x), batch)
        self._it = iter([{input_name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the protocol
        pass


def _folded_float(model: torch.nn.Module) -> torch.nn.Module:
    from effdeploy.quant.fold import fold_batchnorm

    return fold_batchnorm(model).eval()


class PeerWork:
    """What the peers of one model share across its precisions: a folder for the BN-folded float
    graphs and onnxruntime's calibration ranges (its own JSON cache), and ai-edge-quantizer's
    calibration result. Activation ranges do not depend on the weights' bits, so each tool
    calibrates once per model and method, as a user quantizing at two precisions would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.aeq_ranges = None


def ort_quantize(
    model: torch.nn.Module, calibration: np.ndarray, weight_bits: int, method: str, dest: Path, work: PeerWork
) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from effdeploy.export.onnx import torch_to_onnx

    float_path = work.folder / "float.onnx"
    if not float_path.exists():
        torch_to_onnx(model, float_path, opset=21, resolution=model.config.resolution, name=dest)
    try:
        quantize_static(
            str(float_path),
            str(dest),
            _Reader(calibration, "images"),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],  # MinMax | Percentile
            calibration_cache_path=work.folder / f"ort_ranges_{method}.json",
        )
    except Exception as err:
        raise EffdeployError(f"{dest}: onnxruntime quantize_static failed ({str(err).splitlines()[0][:200]})") from None
    return dest


def aeq_quantize(model: torch.nn.Module, calibration: np.ndarray, weight_bits: int, dest: Path, work: PeerWork) -> Path:
    from ai_edge_quantizer import quantizer as aeq

    from effdeploy.export.tflite import export_tflite
    from effdeploy.fileio import atomic_write_bytes
    from effdeploy.quant.emit_tflite import _silenced

    float_path = work.folder / "float.tflite"
    if not float_path.exists():
        export_tflite(model, float_path)
    qt = aeq.Quantizer(str(float_path))
    qt.add_static_config(".*", "*", 8, weight_bits)
    x = np.transpose(calibration, (0, 2, 3, 1))
    with _silenced():
        if work.aeq_ranges is None:
            work.aeq_ranges = qt.calibrate(
                {"serving_default": [{"args_0": x[i : i + 1].copy()} for i in range(len(x))]}, num_threads=1
            )
        result = qt.quantize(work.aeq_ranges, enable_progress_report=False, enable_progress_bar=False)
    atomic_write_bytes(dest, bytes(result.quantized_model))
    return dest


def run_peers(
    model: torch.nn.Module,
    calibration: np.ndarray,
    held_x: np.ndarray,
    labels: np.ndarray,
    float_logits: np.ndarray,
    weight_bits: int,
    act_bits: int,
    out_dir: Path,
    *,
    log=print,
    outputs: dict[str, np.ndarray] | None = None,
    work: PeerWork | None = None,
    tools: tuple[str, ...] | None = None,
) -> list[dict]:
    """Quantize ``model`` with every peer for this precision and measure each on ``held_x``
    (each peer's per-image logits go to ``outputs`` as ``{precision}.peer.{name}``). ``work`` holds
    what the peers share across precisions (``PeerWork``); pass the same one for every precision
    of one model to export and calibrate once (default: a fresh one for this call). ``tools``
    keeps only the peers of those tools (default: all)."""
    from effdeploy.runtime import load_backend
    from effdeploy.runtime.base import run_batched

    peers = [p for p in peers_for(weight_bits, act_bits) if tools is None or p.tool in tools]
    if not peers:
        return []
    folded = _folded_float(model)
    precision = f"w{weight_bits}a{act_bits}"
    rows = []
    with contextlib.ExitStack() as stack:
        if work is None:
            work = PeerWork(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="effdeploy-peers-"))))
        made: dict[tuple, Path] = {}
        for peer in peers:
            key = (peer.tool, peer.calibration)
            ext = "onnx" if peer.tool == "onnxruntime" else "tflite"
            dest = out_dir / f"peer_{peer.name.replace('-default-session', '')}_{precision}.{ext}"
            try:
                if key not in made:
                    if peer.tool == "onnxruntime":
                        made[key] = ort_quantize(folded, calibration, weight_bits, peer.calibration, dest, work)
                    else:
                        made[key] = aeq_quantize(folded, calibration, weight_bits, dest, work)
                path = made[key]
                if peer.tool == "onnxruntime":
                    backend = load_backend("onnxruntime", path, threads=1, x64quantprecision=peer.session != "default")
                    options = backend.session_options
                else:
                    backend = load_backend("litert", path)
                    options = {"runtime": "LiteRT CPU (XNNPACK)"}
                out = run_batched(backend, held_x, 256)
            except EffdeployError as err:
                log(f"    peer {peer.name}: failed ({err})")
                rows.append({"peer": peer.name, "tool": peer.tool, "precision": precision, "error": str(err)})
                continue
            if outputs is not None:
                outputs[f"{precision}.peer.{peer.name}"] = out
            top1 = topk_accuracy(out, labels, 1)
            row = {
                "peer": peer.name,
                "tool": peer.tool,
                "calibration": peer.calibration,
                "precision": precision,
                "file": path.name,
                "bytes": path.stat().st_size,
                "session_options": options,
                "top1": top1,
                "top1_delta": top1 - topk_accuracy(float_logits, labels, 1),
                "agreement": top1_agreement(float_logits, out),
                "output_snr_db": snr_db(float_logits, out),
            }
            rows.append(row)
            log(
                f"    peer {peer.name:28s}: top-1 {100 * top1:.2f}% ({100 * row['top1_delta']:+.2f}), "
                f"agreement {100 * row['agreement']:.2f}%, SNR {row['output_snr_db']:.2f} dB"
            )
    return rows

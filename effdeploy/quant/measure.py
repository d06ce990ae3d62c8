"""The measure stage: what a simulation does to the network, on held-out images. Per-image
logits, top-1 and agreement with float, output SNR, the SNR at every quantization point and
at every block's output, and the integer model's size."""

from __future__ import annotations

import numpy as np
import torch

from effdeploy.metrics import SnrAccumulator, snr_db, top1_agreement, topk_accuracy
from effdeploy.quant.sim import QuantSim
from effdeploy.runtime import load_backend
from effdeploy.runtime.base import run_batched


def measure_sim(
    sim: QuantSim, held_x: np.ndarray, labels: np.ndarray, float_logits: np.ndarray, snr_batches: list[torch.Tensor]
) -> tuple[np.ndarray, dict]:
    """The simulation's per-image logits on ``held_x``, and its measurements as a report row holds them."""
    logits = run_batched(load_backend("torch", sim), held_x, 500)
    layers = layer_snr(sim, snr_batches)
    ranked = sorted(((v, k) for k, v in layers.items()), key=lambda t: t[0])
    top1 = topk_accuracy(logits, labels, 1)
    return logits, {
        "top1": top1,
        "top5": topk_accuracy(logits, labels, 5),
        "top1_delta": top1 - topk_accuracy(float_logits, labels, 1),
        "agreement": top1_agreement(float_logits, logits),
        "output_snr_db": snr_db(float_logits, logits),
        "worst_layers": [{"name": k, "snr_db": v} for v, k in ranked[:3]],
        "layer_snr_db": layers,
        "block_snr_db": {n: layers[n] for n in block_output_points(sim)},
        "weight_bytes": weight_bytes(sim),
    }


def block_output_points(sim: QuantSim) -> list[str]:
    """The tensor each MBConv block hands to the next: the residual add, or the projection."""
    out = []
    for spec in sim.model.arch.blocks:
        name = f"blocks.{spec.name}"
        out.append(name if spec.has_residual else f"{name}.project.conv")
    return out


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

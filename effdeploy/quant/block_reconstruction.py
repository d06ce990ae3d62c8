"""Block reconstruction: the rounding of every weight and the ranges of every activation in an
MBConv block, learned together so that the block's quantized output reproduces the float one.

Per-layer AdaRound (passes.adaround) fits each layer's output alone; at 4-bit activations the
error that matters is what the block hands on after several quantized tensors interact, and a
layer-wise fit cannot trade one layer's rounding against another's or against a range. Three
published methods, combined as their authors combine them:

- BRECQ (Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block
  Reconstruction", ICLR 2021): the unit of reconstruction is the block; every weight layer in it
  gets AdaRound's soft rounding (rectified sigmoid, annealed regulariser), optimised jointly on
  the block output's squared error, optionally weighted per element by the squared gradient of
  the network's loss (the diagonal Fisher approximation of the output's importance).
- LSQ / LSQ+ (Esser et al., ICLR 2020; Bhalgat et al., CVPRW 2020): each activation point's
  range, hence its step size and offset, is learned with straight-through rounding
  (fakequant.fake_quant_act_learnable), within the point's limit (a sigmoid's saturation).
- QDrop (Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training
  Quantization", ICLR 2022): while reconstructing, every activation element, the block's input
  included, keeps its float value with probability p and is quantized otherwise, so the learned
  rounding is flat around the float point rather than fitted to one quantized path; at
  evaluation everything is quantized.

Blocks are done in network order; each one's input comes from the network quantized so far
(earlier blocks already reconstructed), its target is the float network's block output. A block
keeps what it learned only where its fully quantized output (hard rounding, no QDrop) is closer
to the float output on the calibration images than before, so the pass never makes a block worse
on them. Weights end exactly on their integer grid (``WeightLayer.qweight``) and ranges are set
with ``ActPoint.set_range``, which is what the emitters read.
"""

from __future__ import annotations

import math
import time

import torch
from torch.func import functional_call

from effdeploy.progress import progress
from effdeploy.quant.fakequant import fake_quant_act_learnable, fake_quant_act_ste, weight_qmax
from effdeploy.quant.passes import _adjustable, _layer_io, _rectified_sigmoid
from effdeploy.quant.registry import register_pass
from effdeploy.quant.sim import QuantSim, WeightLayer


def block_names(sim: QuantSim) -> list[str]:
    """The MBConv blocks' module paths, in network order."""
    return [f"blocks.{spec.name}" for spec in sim.model.arch.blocks]


def _in_block(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


@torch.no_grad()
def _block_mse(sim: QuantSim, block: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of the block's fully quantized output (the simulation as it stands)."""
    with sim.running(quantized=True):
        out = torch.cat([block(inputs[i : i + 256]) for i in range(0, inputs.shape[0], 256)])
    return float(((out - targets) ** 2).mean())


def fisher_weights(sim: QuantSim, batches: list[torch.Tensor], blocks: list[str]) -> dict[str, torch.Tensor]:
    """Per element, the gradient of the float network's loss w.r.t. each block output, squared and
    scaled to mean 1 per block (BRECQ's diagonal Fisher weights). The loss is each image's cross
    entropy against the float network's own prediction: calibration images carry no labels."""
    modules = dict(sim.model.named_modules())
    outs: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    grads: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    live: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output):
            output.retain_grad()
            live[name] = output

        return hook

    handles = [modules[b].register_forward_hook(keep(b), prepend=True) for b in blocks]
    params = list(sim.model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with sim.running(quantized=False), torch.enable_grad():
            for x in batches:
                live.clear()
                logits = sim.model(x.clone().requires_grad_(True))
                torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach(), reduction="sum").backward()
                for b in blocks:
                    grads[b].append(live[b].grad.detach() ** 2)
                    outs[b].append(live[b].detach())
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)
    out = {}
    for b in blocks:
        g = torch.cat(grads[b])
        out[b] = g / g.mean().clamp_min(1e-30)
    return out


class _SoftRounding:
    """AdaRound's relaxed rounding of one layer: floor(w / s) + h(V), h the rectified sigmoid,
    V started where the soft weight equals the float weight."""

    def __init__(self, w: WeightLayer) -> None:
        self.layer = w
        self.s = w.scales.reshape((-1,) + (1,) * (w.float_weight.ndim - 1))
        self.qmax = weight_qmax(w.bits)
        scaled = w.float_weight / self.s
        self.floor = torch.floor(scaled)
        self.nearest = torch.clamp(torch.round(scaled), -self.qmax, self.qmax)
        rest = scaled - self.floor
        # inverse of the rectified sigmoid (zeta = 1.1, gamma = -0.1) at the fractional part
        self.v = (-torch.log(1.2 / (rest + 0.1) - 1)).clone().requires_grad_(True)

    def weight(self, hard: bool = False) -> torch.Tensor:
        h = (self.v >= 0).float() if hard else _rectified_sigmoid(self.v)
        return torch.clamp(self.floor + h, -self.qmax, self.qmax) * self.s

    def undecided(self) -> torch.Tensor:
        """How many weights the relaxation has not yet driven to an end (0 < h < 1)."""
        h = _rectified_sigmoid(self.v)
        return ((h > 0) & (h < 1)).sum()

    def regulariser(self, b: float) -> torch.Tensor:
        return (1 - (2 * _rectified_sigmoid(self.v) - 1).abs().pow(b)).sum()


def _reconstruct_block(
    sim: QuantSim,
    block: str,
    inputs: torch.Tensor,
    float_inputs: torch.Tensor | None,
    targets: torch.Tensor,
    fisher: torch.Tensor | None,
    *,
    iters: int,
    qdrop_prob: float,
    batch_size: int,
    positions: int,
    lr: float,
    range_lr: float,
    reg_weight: float,
    warmup: float,
    beta: tuple[float, float],
    learn_ranges: bool,
    gen: torch.Generator,
    tick,
) -> dict:
    modules = dict(sim.model.named_modules())
    module = modules[block]
    layers = [w for n, w in sim.weights.items() if _in_block(n, block)]
    points = [n for n in sim.points if _in_block(n, block)]
    adjustable = set(_adjustable(sim))
    learned = [n for n in points if n in adjustable] if learn_ranges else []
    # the state before: restored where the reconstruction does not help
    saved_q = {w.name: w.qweight for w in layers}
    saved_r = {n: sim.points[n].qparams for n in learned}
    before = _block_mse(sim, module, inputs, targets)

    soft = [_SoftRounding(w) for w in layers]
    param_names = {w.name: w.name[len(block) + 1 :] + ".weight" for w in layers}
    start = {n: sim.points[n].qparams for n in learned}
    limits = {n: sim.points[n].limit or (-math.inf, math.inf) for n in learned}
    # each range as log-multipliers of the calibrated one: it keeps its sign, a one-sided range
    # stays one-sided (as passes.learn_ranges)
    logs = {n: torch.zeros(2, requires_grad=True) for n in learned}

    def bounds(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = start[n].lo * logs[n][0].exp(), start[n].hi * logs[n][1].exp()
        return lo.clamp(min=limits[n][0]), hi.clamp(max=limits[n][1])

    def quantizer(n: str):
        p = sim.points[n]

        def hook(mod, args, out):
            if n in logs:
                q = fake_quant_act_learnable(out, *bounds(n), start[n])
            else:
                qp = p.fixed or p.qparams
                q = out if qp is None else fake_quant_act_ste(out, qp)
            if qdrop_prob > 0:
                keep_float = torch.rand(out.shape, generator=gen) < qdrop_prob
                q = torch.where(keep_float, out, q)
            return q

        return hook

    per_sample = math.prod(targets.shape[2:])
    bs = max(1, min(batch_size, math.ceil(positions / per_sample), inputs.shape[0]))
    opt = torch.optim.Adam([r.v for r in soft], lr=lr)
    range_opt = torch.optim.Adam(list(logs.values()), lr=range_lr) if logs else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(range_opt, T_max=iters) if range_opt else None
    warm = int(warmup * iters)
    path_of = {point: path for path, point in sim._hook_paths.items()}
    params = list(sim.model.parameters())
    flags = [p.requires_grad for p in params]
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        # the simulation's own quantizers stand aside (float_activations); these hooks, registered
        # after them, quantize the block's points with learnable ranges and QDrop instead
        handles = [modules[path_of[n]].register_forward_hook(quantizer(n)) for n in points]
        with sim.running(quantized=True), sim.float_activations(), torch.enable_grad():
            for it in range(iters):
                tick()
                idx = torch.randint(0, inputs.shape[0], (bs,), generator=gen)
                x = inputs[idx]
                if qdrop_prob > 0 and float_inputs is not None:
                    x = torch.where(torch.rand(x.shape, generator=gen) < qdrop_prob, float_inputs[idx], x)
                out = functional_call(module, {param_names[r.layer.name]: r.weight() for r in soft}, (x,))
                sq = (out - targets[idx]) ** 2
                if fisher is not None:
                    sq = sq * fisher[idx]
                loss = sq.sum(1).mean()  # over channels; mean over images and pixels, as BRECQ
                if it >= warm:
                    t = (it - warm) / max(1, iters - warm)
                    b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * t))
                    loss = loss + reg_weight * sum(r.regulariser(b) for r in soft)
                opt.zero_grad(set_to_none=True)
                if range_opt is not None:
                    range_opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if range_opt is not None:
                    range_opt.step()
                    sched.step()
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags, strict=True):
            p.requires_grad_(f)

    with torch.no_grad():
        undecided = sum(float(r.undecided()) for r in soft)
        flipped = sum(float((r.weight(hard=True) / r.s).round().ne(r.nearest).sum()) for r in soft)
        count = sum(r.v.numel() for r in soft)
        for r in soft:
            r.layer.qweight = r.weight(hard=True).detach()
        for n in learned:
            # the learned range in double precision, as the runtimes' qparams get it
            lo, hi = (float(t) for t in logs[n].double().exp())
            sim.points[n].set_range(start[n].lo * lo, start[n].hi * hi)
    after = _block_mse(sim, module, inputs, targets)
    kept = after <= before
    if not kept:
        for w in layers:
            w.qweight = saved_q[w.name]
        for n in learned:
            sim.points[n].qparams = saved_r[n]
        sim.set_weights(quantized=sim.mode == "quant")
    moved = {}
    for n in learned:
        a, b = start[n], sim.points[n].qparams
        if a != b:
            moved[n] = {"scale": [a.scale, b.scale], "from": [a.lo, a.hi], "to": [b.lo, b.hi]}
    return {
        "iters": iters,
        "mse_before": before,
        "mse_after": after if kept else before,
        "mse_reconstructed": after,
        "kept": kept,
        "layers": [w.name for w in layers],
        "points": len(points),
        "flipped": flipped / max(1, count),
        "undecided": undecided / max(1, count),
        "batch": bs,
        "ranges_moved": moved,
    }


def block_reconstruction(
    sim: QuantSim,
    batches: list[torch.Tensor],
    *,
    blocks: list[str] | None = None,
    iters: int = 2000,
    qdrop_prob: float = 0.5,
    batch_size: int = 32,
    positions: int = 8192,
    max_samples: int = 1024,
    lr: float = 1e-2,
    range_lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    fisher: bool = False,
    learn_ranges: bool = True,
    seed: int = 0,
) -> dict[str, dict]:
    """Reconstruct every MBConv block (or the named ``blocks``) in network order: AdaRound rounding
    of its weights, LSQ ranges of its activation points (``learn_ranges``) and QDrop
    (``qdrop_prob``, the chance an activation element stays float while learning), ``iters``
    Adam steps of ``batch_size`` images each (fewer where a block output has more than
    ``positions`` pixels per image, as passes.adaround_layer). ``fisher`` weighs the squared
    error by the squared loss gradient at the block output. Returns, per block, the output MSE
    on the calibration images before and after, whether the result was kept, the share of
    weights rounded away from nearest and the ranges (step sizes) that moved."""
    names = block_names(sim) if blocks is None else list(blocks)
    modules = dict(sim.model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    grads = fisher_weights(sim, batches, names) if fisher else {}
    bar = progress(range(len(names) * iters), desc="block reconstruction", unit="step")
    steps = iter(bar)

    def tick() -> None:
        next(steps, None)

    report: dict[str, dict] = {}
    t0 = time.monotonic()
    for i, name in enumerate(names):
        # the blocks' steps cost about the same: an estimate a plain log line can carry too
        eta = f"{(time.monotonic() - t0) / i * (len(names) - i):.0f} s" if i else "?"
        bar.set_postfix(block=name.rsplit(".", 1)[-1], eta=eta)
        module = modules[name]
        inputs = _layer_io(sim, module, batches, quantized=True, inputs=True)
        float_inputs = _layer_io(sim, module, batches, quantized=False, inputs=True) if qdrop_prob > 0 else None
        targets = _layer_io(sim, module, batches, quantized=False)
        fisher_w = grads.get(name)
        if inputs.shape[0] > max_samples:
            idx = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
            inputs, targets = inputs[idx], targets[idx]
            float_inputs = None if float_inputs is None else float_inputs[idx]
            fisher_w = None if fisher_w is None else fisher_w[idx]
        report[name] = _reconstruct_block(
            sim,
            name,
            inputs,
            float_inputs,
            targets,
            fisher_w,
            iters=iters,
            qdrop_prob=qdrop_prob,
            batch_size=batch_size,
            positions=positions,
            lr=lr,
            range_lr=range_lr,
            reg_weight=reg_weight,
            warmup=warmup,
            beta=beta,
            learn_ranges=learn_ranges,
            gen=gen,
            tick=tick,
        )
    for _ in steps:  # the bar ends (and closes) with the last step
        pass
    sim.set_weights(quantized=sim.mode == "quant")  # bias grids follow the new input scales
    return report


@register_pass(
    "block_reconstruction", order=35, label="block reconstruction", enabled=lambda q, wb: q.block_reconstruction
)
def _block_reconstruction_pass(sim: QuantSim, batches: list[torch.Tensor], q) -> dict:
    return block_reconstruction(sim, batches, iters=q.block_reconstruction_iters, qdrop_prob=q.qdrop_prob)

"""Post-training passes on a calibrated QuantSim.

bias_correction -- empirical bias correction (Nagel et al., "Data-Free Quantization", sec. 4.2,
    empirical variant): quantizing a layer's weights shifts the mean of its output per channel;
    measured on calibration data, layer by layer in network order (so each correction sees the
    already-corrected layers before it), the shift is folded back into the bias.
adaround -- AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
    Quantization", ICML 2020): instead of rounding each weight to nearest, learn per weight
    whether to round up or down so that the layer's output on calibration data is reproduced;
    a rectified sigmoid relaxes the choice and an annealed regulariser drives it to 0 or 1.
    Each layer is fitted on inputs from the quantized network before it (so errors upstream
    are compensated) against the float network's output.
range_search -- output-aware activation ranges: where a tensor's calibration range is set by a
    few extreme values (its 99.9th percentile lies under half its range), narrower ranges are
    tried; where the range clips values the calibration images did carry (a percentile cuts off
    the rare large values of a sparse tensor), wider ones, up to the observed min-max. One tensor
    at a time, in network order, the range that best reproduces the float network's logits on
    calibration images is kept. A per-tensor observer cannot know whether the extremes matter
    downstream (an SE gate saturates; a projection feeding the head does not; a gate that opens
    for a few images carries their whole signal); the network's output can.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from effdeploy.progress import progress
from effdeploy.quant.fakequant import weight_qmax
from effdeploy.quant.observers import quantile
from effdeploy.quant.registry import register_pass
from effdeploy.quant.sim import QuantSim, WeightLayer


class _StopForward(Exception):
    """Raised by a capture that has what it needs: the rest of the network need not run."""


class _Capture:
    """Forward hooks, run before the quantizer hooks, that record a module's input and output
    (and, with ``stop``, end the forward pass there)."""

    def __init__(
        self, module: torch.nn.Module, keep_input: bool = False, keep_output: bool = True, stop: bool = False
    ) -> None:
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.keep_input, self.keep_output, self.stop = keep_input, keep_output, stop
        self.handle = module.register_forward_hook(self._hook, prepend=True)

    def _hook(self, module, args, output):
        if self.keep_input:
            self.inputs.append(args[0].detach())
        if self.keep_output:
            self.outputs.append(output.detach())
        if self.stop:
            raise _StopForward

    def remove(self) -> None:
        self.handle.remove()


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).mean(1)


def _layer_io(sim: QuantSim, module: torch.nn.Module, batches, *, quantized: bool, inputs: bool = False):
    """A layer's inputs (or outputs) over ``batches``, in the quantized or the float network."""
    cap = _Capture(module, keep_input=inputs, keep_output=not inputs, stop=True)
    try:
        _run(sim, batches, quantized=quantized)
    finally:
        cap.remove()
    return torch.cat(cap.inputs if inputs else cap.outputs)


class _Prefix:
    """The network as a chain of segments (the stem, each MBConv block, the head, then pooling
    and the classifier) and the input of one segment over every calibration batch, kept between
    calls. A pass that visits layers in network order, and changes only layers it has visited,
    gets each layer's tensors by running that layer's segment alone: the segments before it are
    final, so their output is computed once instead of once per layer. The values are those of
    a whole forward pass (the same modules and hooks on the same tensors); only the work shrinks
    (per-layer whole-network captures were a sixth of AdaRound's time and all of bias correction's)."""

    def __init__(self, sim: QuantSim, batches: list[torch.Tensor], *, quantized: bool) -> None:
        m = sim.model
        self.sim, self.quantized = sim, quantized
        self.segments = [m.stem, *m.blocks, m.head, m.forward_head]
        self.owner: dict[torch.nn.Module, int] = {}
        for k, seg in enumerate(self.segments[:-1]):
            for mod in seg.modules():
                self.owner[mod] = k
        for mod in (m.pool, m.dropout, m.classifier):
            for sub in mod.modules():
                self.owner[sub] = len(self.segments) - 1
        self.k, self.xs = 0, list(batches)

    @torch.no_grad()
    def io(self, module: torch.nn.Module, *, inputs: bool = False) -> torch.Tensor:
        """``module``'s inputs (or outputs) over the batches, as ``_layer_io`` gives them."""
        k = self.owner[module]
        if k < self.k:
            raise ValueError("layers must be visited in network order")
        with self.sim.running(self.quantized):
            while self.k < k:  # the segments passed are final: advance the kept input through them
                self.xs = [self.segments[self.k](x) for x in self.xs]
                self.k += 1
            cap = _Capture(module, keep_input=inputs, keep_output=not inputs, stop=True)
            try:
                for x in self.xs:
                    try:
                        self.segments[k](x)
                    except _StopForward:
                        pass
            finally:
                cap.remove()
        return torch.cat(cap.inputs if inputs else cap.outputs)


@torch.no_grad()
def _run(sim: QuantSim, batches, quantized: bool) -> None:
    with sim.running(quantized):
        for x in batches:
            try:
                sim.model(x)
            except _StopForward:
                pass


@torch.no_grad()
def bias_correction(sim: QuantSim, batches: list[torch.Tensor], layers: list[str] | None = None) -> dict[str, float]:
    """Fold each layer's mean output shift back into its bias; returns the shift norm per layer."""
    names = [n for n in sim.weights if layers is None or n in layers]
    # float means of every layer's output, in one pass of the float network
    caps = {n: _Capture(sim.weights[n].module) for n in names}
    _run(sim, batches, quantized=False)
    float_mean = {n: _channel_mean(torch.cat(c.outputs)) for n, c in caps.items()}
    for c in caps.values():
        c.remove()
    shifts = {}
    quantized = _Prefix(sim, batches, quantized=True)
    for n in progress(names, desc="bias correction", unit="layer"):
        w = sim.weights[n]
        shift = float_mean[n] - _channel_mean(quantized.io(w.module))
        if w.module.bias is None:
            w.module.bias = torch.nn.Parameter(torch.zeros_like(shift))
            w.float_bias = torch.zeros_like(shift)
        # the next layer's quantized pass applies it (set_weights adds bias_delta)
        w.bias_delta = shift if w.bias_delta is None else w.bias_delta + shift
        shifts[n] = float(shift.norm())
    sim.set_weights(quantized=sim.mode == "quant")
    return shifts


def _layer_fn(w: WeightLayer):
    m = w.module
    if isinstance(m, torch.nn.Linear):
        return lambda x, weight: F.linear(x, weight, m.bias)
    return lambda x, weight: F.conv2d(x, weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def _rectified_sigmoid(v: torch.Tensor, zeta: float = 1.1, gamma: float = -0.1) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def adaround_layer(
    w: WeightLayer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    iters: int = 1000,
    batch_size: int = 32,
    positions: int = 8192,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    warmup: float = 0.2,
    beta: tuple[float, float] = (20.0, 2.0),
    seed: int = 0,
    balance: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Learn the rounding of one layer's weights; returns the fake-quantized weight and stats.

    A step uses ``batch_size`` samples, fewer where each one already has more than ``positions``
    output pixels: at 224 px an early layer has 12,544 per image, and one image is as many
    reconstruction targets as 32 CIFAR images (the step then costs the same at any resolution)."""
    fn = _layer_fn(w)
    per_sample = math.prod(targets.shape[2:])  # output pixels per sample (1 for a linear layer)
    batch_size = max(1, min(batch_size, math.ceil(positions / per_sample)))
    s = w.scales.reshape((-1,) + (1,) * (w.float_weight.ndim - 1))
    qmax = weight_qmax(w.bits)
    scaled = w.float_weight / s
    floor = torch.floor(scaled)
    rest = scaled - floor
    # start where h(V) equals the fractional part, i.e. the soft weight equals the float weight
    # (inverse of the rectified sigmoid with zeta = 1.1, gamma = -0.1)
    v = (-torch.log(1.2 / (rest + 0.1) - 1)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.shape[0]

    def qweight(hard: bool, h: torch.Tensor | None = None) -> torch.Tensor:
        if h is None:
            h = (v >= 0).float() if hard else _rectified_sigmoid(v)
        return torch.clamp(floor + h, -qmax, qmax) * s

    # balance: each sample's error relative to its own target energy (mean weight 1), so that a
    # few samples with huge activations do not decide the rounding for all the others
    if balance:
        energy = targets.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        wts = (1.0 / energy) / (1.0 / energy).mean()
    else:
        wts = torch.ones(targets.shape[0])

    def err_of(out: torch.Tensor, tgt: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
        return ((out - tgt) ** 2).flatten(1).sum(1).mul(wt).mean()

    with torch.no_grad():
        nearest = torch.clamp(torch.round(scaled), -qmax, qmax) * s
        err_nearest = float(err_of(fn(inputs, nearest), targets, wts)) / targets[0].numel()
    warm = int(warmup * iters)
    for it in range(iters):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        h = _rectified_sigmoid(v)  # once a step: the soft rounding feeds the weight and the regulariser
        out = fn(inputs[idx], qweight(hard=False, h=h))
        loss = err_of(out, targets[idx], wts[idx])
        if it >= warm:
            t = (it - warm) / max(1, iters - warm)
            b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * t))
            loss = loss + reg_weight * (1 - (2 * h - 1).abs().pow(b)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        result = qweight(hard=True)
        err = float(err_of(fn(inputs, result), targets, wts)) / targets[0].numel()
        flipped = float(((result / s).round() != (nearest / s).round()).float().mean())
    return result.detach(), {"mse_nearest": err_nearest, "mse_adaround": err, "flipped": flipped, "batch": batch_size}


def adaround(
    sim: QuantSim,
    batches: list[torch.Tensor],
    *,
    layers: list[str] | None = None,
    iters: int = 1000,
    batch_size: int = 32,
    positions: int = 8192,
    max_samples: int = 2048,
    seed: int = 0,
    balance: bool = False,
) -> dict[str, dict]:
    """AdaRound every selected layer in network order; keeps the learned rounding only where it
    reconstructs the layer's output better than round-to-nearest. ``balance`` weighs each image's
    error by 1 / its target energy (see ``adaround_layer``): where a few calibration images carry
    activations hundreds of times larger than the rest (SE before, trained from scratch), the
    plain squared error is theirs alone."""
    names = [n for n in sim.weights if layers is None or n in layers]
    report = {}
    float_net, quant_net = _Prefix(sim, batches, quantized=False), _Prefix(sim, batches, quantized=True)
    for n in progress(names, desc="adaround", unit="layer"):
        w = sim.weights[n]
        # target: the float network's output of this layer; input: the quantized network's input
        targets = float_net.io(w.module)
        inputs = quant_net.io(w.module, inputs=True)
        inputs, targets = _samples(inputs, targets, max_samples, seed)
        # the layer's own (float) bias stays in both sides of the reconstruction
        qweight, stats = adaround_layer(
            w, inputs, targets, iters=iters, batch_size=batch_size, positions=positions, seed=seed, balance=balance
        )
        if stats["mse_adaround"] <= stats["mse_nearest"]:
            w.qweight = qweight
            stats["kept"] = True
        else:
            stats["kept"] = False
        report[n] = stats
    sim.set_weights(quantized=sim.mode == "quant")
    return report


def _samples(inputs: torch.Tensor, targets: torch.Tensor, max_samples: int, seed: int):
    """Images are the samples; a linear layer's rows likewise. Cap their number for memory."""
    if inputs.shape[0] <= max_samples:
        return inputs, targets
    idx = torch.randperm(inputs.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return inputs[idx], targets[idx]


def _adjustable(sim: QuantSim) -> list[str]:
    """The activation points whose range a pass may move: calibrated, not fixed (sigmoid outputs),
    and neither the input (the pixel grid) nor the logits (their extremes are the predictions)."""
    return [
        n
        for n, p in sim.points.items()
        if p.fixed is None and p.kind not in ("input", "logits") and p.qparams is not None
    ]


def output_error(target: torch.Tensor, objective: str):
    """The per-image error of quantized logits against the float ``target`` logits (a function of
    the quantized logits, differentiable): ``"relative"``, |q - f|^2 / |f|^2 (the output SNR's
    error, each image counting the same however large its logits), or ``"kl"``,
    KL(softmax(f) || softmax(q)) (the prediction: an error that does not move the probabilities
    costs nothing)."""
    if objective not in ("relative", "kl"):
        raise ValueError(f"range objective must be 'relative' or 'kl', got {objective!r}")
    norm = (target**2).sum(1).clamp_min(1e-12)
    logp = torch.log_softmax(target, 1)

    def error(out: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        if objective == "kl":
            return (logp[idx].exp() * (logp[idx] - torch.log_softmax(out, 1))).sum(1)
        return ((out - target[idx]) ** 2).sum(1) / norm[idx]

    return error


RANGE_FACTORS = (0.7, 0.5, 0.35, 0.25, 0.15, 0.1)
# widening candidates: geometric steps from a point's clipped range to its observed min-max
WIDEN_STEPS = (0.25, 0.5, 0.75, 1.0)


def _widened(start, stats, steps: tuple[float, ...]) -> list[tuple[float, float]]:
    """Ranges between ``start`` and the observed extremes, geometrically spaced (a clipped range
    can be hundreds of times narrower than the values a few images carry)."""

    def toward(edge: float, extreme: float, t: float) -> float:
        if abs(extreme) <= abs(edge) or edge == 0.0:
            return edge
        return edge * (extreme / edge) ** t

    lo_x, hi_x = min(stats.lo, 0.0), max(stats.hi, 0.0)
    return [(toward(start.lo, lo_x, t), toward(start.hi, hi_x, t)) for t in steps]


@torch.no_grad()
def range_search(
    sim: QuantSim,
    batches: list[torch.Tensor],
    *,
    factors: tuple[float, ...] = RANGE_FACTORS,
    widen: tuple[float, ...] = WIDEN_STEPS,
    rounds: int = 2,
    tail_ratio: float = 0.5,
    clip_ratio: float = 1.5,
    max_images: int = 256,
    objective: str = "relative",
) -> dict[str, dict]:
    """Move the ranges of activation points where that reproduces the float logits better:
    narrower for heavy-tailed points (99.9th percentile under ``tail_ratio`` of the range), wider,
    toward the observed min-max, for clipped ones (observed extremes beyond ``clip_ratio`` times
    the range: a percentile cuts off the rare large values of a sparse tensor, such as an SE gate
    that is almost always shut, and those values can be the signal). Returns the number of
    candidate points, the final objective and, for each point it changed,
    ``{"from": [lo, hi], "to": [lo, hi]}``.

    The objective is a mean over images, so that the few images with extreme activations count as
    much as any other, not more: ``"relative"``, |q - f|^2 / |f|^2 on the logits (the output
    SNR's error), or ``"kl"``, KL(softmax(f) || softmax(q)) (the prediction: an error that does
    not move the probabilities costs nothing). ``rounds`` sweeps let a
    point move further once the points after it have adapted.
    """
    x = torch.cat(batches)[:max_images]
    with sim.running(quantized=False):
        target = sim(x)
    per_image = output_error(target, objective)

    def loss() -> float:
        with sim.running(quantized=True):
            return float(per_image(sim(x)).mean())

    def heavy(p) -> bool:
        span = max(abs(p.qparams.lo), abs(p.qparams.hi))
        return max(abs(quantile(p.stats, 0.001)), abs(quantile(p.stats, 0.999))) < tail_ratio * span

    def clipped(p) -> bool:
        # values past a sigmoid's saturation (the point's limit) are not clipped information
        lo, hi = p.within_limit(p.stats.lo, p.stats.hi)
        return max(abs(lo), abs(hi)) > clip_ratio * max(abs(p.qparams.lo), abs(p.qparams.hi))

    def candidates(p) -> list[tuple[float, float]]:
        start = p.qparams
        out = [(start.lo * f, start.hi * f) for f in factors] if heavy(p) else []
        return out + (_widened(start, p.stats, widen) if clipped(p) else [])

    movable = [name for name in _adjustable(sim) if heavy(sim.points[name]) or clipped(sim.points[name])]
    changed: dict[str, dict] = {}
    best = loss()
    for _ in range(rounds):
        for name in progress(movable, desc="range search", unit="tensor"):
            p = sim.points[name]
            start = p.qparams
            keep = start
            for lo, hi in candidates(p):
                p.set_range(lo, hi)
                if p.qparams == keep:
                    continue  # a candidate past the point's limit can land on the range it has
                trial = loss()
                if trial < best:
                    best, keep = trial, p.qparams
            p.qparams = keep
            if keep is not start:
                changed.setdefault(name, {"from": [start.lo, start.hi]})["to"] = [keep.lo, keep.hi]
    sim.set_weights(quantized=sim.mode == "quant")  # bias grids follow the new input scales
    return {"candidates": len(movable), "objective": best, "changed": changed}


def learn_ranges(
    sim: QuantSim,
    batches: list[torch.Tensor],
    *,
    steps: int = 500,
    lr: float = 0.01,
    batch_size: int = 64,
    max_images: int = 512,
    objective: str = "relative",
    check_every: int = 50,
    seed: int = 0,
) -> dict:
    """Learn every activation range at once by gradient descent on the output error (LSQ+ style:
    straight-through rounding, the clamp's gradient moves the range), with the weights as they are.

    Where a model's quantization loss is spread thinly over all its activation points (no single
    one holds it, so moving one range at a time finds little), the ranges have to move together.
    Each point's lo and hi are learned as log-multipliers of the calibrated ones (a range keeps
    its sign and a one-sided one stays one-sided; sigmoid outputs and the input keep their fixed
    ranges). The objective, ``output_error``, is measured on the calibration images every
    ``check_every`` steps and the best set of ranges is kept, so the pass never ends worse than
    it started on those images. Returns the learned points, the objective before and after, and
    ``{"from": [lo, hi], "to": [lo, hi]}`` for each point that moved."""
    x = torch.cat(batches)[:max_images]
    with sim.running(quantized=False):
        target = sim(x)
    error = output_error(target, objective)
    names = _adjustable(sim)
    start = {n: sim.points[n].qparams for n in names}
    logs = {n: torch.zeros(2, requires_grad=True) for n in names}

    limits = {n: sim.points[n].limit or (-math.inf, math.inf) for n in names}

    def bounds(n: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The range being learned, as tensors with gradients (float32), within the point's limit."""
        lo, hi = start[n].lo * logs[n][0].exp(), start[n].hi * logs[n][1].exp()
        return lo.clamp(min=limits[n][0]), hi.clamp(max=limits[n][1])

    def ranges() -> dict[str, tuple[float, float]]:
        """The same ranges in double precision, as the runtimes' qparams get them."""
        with torch.no_grad():
            return {n: (start[n].lo * float(logs[n][0].exp()), start[n].hi * float(logs[n][1].exp())) for n in names}

    def evaluate() -> float:
        for n, (lo, hi) in ranges().items():
            sim.points[n].set_range(lo, hi)
        with sim.running(quantized=True):
            return float(error(sim(x)).mean())

    best = before = evaluate()
    best_ranges = ranges()
    opt = torch.optim.Adam(list(logs.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    params = list(sim.model.parameters())
    grads = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    # one quantized-mode entry for the whole loop: weights and bias grids change only when
    # evaluate() sets new ranges, and its own (nested) entry and exit rebuild them then
    try:
        with sim.running(quantized=True):
            for step in progress(range(1, steps + 1), desc="learn ranges", unit="step"):
                idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
                sim.learnable = {n: bounds(n) for n in names}
                with torch.enable_grad():
                    loss = error(sim.model(x[idx]), idx).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                sim.learnable = None
                opt.step()
                if step % check_every == 0 or step == steps:
                    trial = evaluate()
                    if trial < best:
                        best, best_ranges = trial, ranges()
    finally:
        sim.learnable = None
        for p, g in zip(params, grads, strict=True):
            p.requires_grad_(g)
    changed = {}
    for n, (lo, hi) in best_ranges.items():
        sim.points[n].set_range(lo, hi)
        qp = sim.points[n].qparams
        if qp != start[n]:
            changed[n] = {"from": [start[n].lo, start[n].hi], "to": [qp.lo, qp.hi]}
    sim.set_weights(quantized=sim.mode == "quant")  # bias grids follow the new input scales
    return {"points": len(names), "objective_before": before, "objective": best, "changed": changed}


# ---- the registry entries: when each pass runs, in which order, and what it reads of the config


@register_pass("range_search", order=10, label="range search", enabled=lambda q, wb: q.range_search)
def _range_search_pass(sim: QuantSim, batches: list[torch.Tensor], q) -> dict:
    return range_search(sim, batches, objective=q.range_search_objective)


@register_pass("learn_ranges", order=20, label="learned ranges", enabled=lambda q, wb: q.learn_ranges)
def _learn_ranges_pass(sim: QuantSim, batches: list[torch.Tensor], q) -> dict:
    return learn_ranges(sim, batches, steps=q.learn_ranges_steps, objective=q.range_search_objective)


@register_pass("adaround", order=30, enabled=lambda q, wb: q.adaround == "on" or (q.adaround == "auto" and wb < 8))
def _adaround_pass(sim: QuantSim, batches: list[torch.Tensor], q) -> dict:
    return adaround(sim, batches, iters=q.adaround_iters, balance=q.adaround_balance)


@register_pass("bias_correction", order=40, enabled=lambda q, wb: q.bias_correction)
def _bias_correction_pass(sim: QuantSim, batches: list[torch.Tensor], q) -> dict:
    return bias_correction(sim, batches)

"""Predicting the SNR at every quantization point of a network from its float graph, calibration
statistics and a quantization grid, without running the quantized network.

What goes in:

- **the float network and calibration images** (``calibration_stats``, free of bit widths): the
  signal power ``E[x^2]`` at every quantization point and linearised noise gains. A gain is
  measured by adding small white noise at one quantizer's tensor in the float network and reading
  the power it causes at every point downstream: ``E||J d||^2 / E||d||^2``, a Jacobian-vector
  product estimated by a forward difference. The SE gate, the SiLU product and the residual add
  are inside the gains: the gate multiplies the noise its input carries, noise reaching the gate
  through the pool moves the gate, the skip passes noise with gain one.
- **the grid** (``Grid``): each activation point's range and bits (and the limit of a sigmoid's
  input), each weight layer's per-channel scales and bits, whether bias correction runs.

How the grid turns into noise (``predict``):

- a quantizer rounds: ``inside * step^2/12``, white, times its gains (measured instead where the
  tensor is narrower than a couple of steps, as a closed gate's product is);
- a quantizer clips: measured on the calibration images with every clamp of the grid in place
  (``clipping``), so that a value clipped upstream is not clipped again downstream;
- rounded weights: their error ``conv(x, dW)`` on the float input, every layer's at once, carried
  to every point as a Jacobian-vector product along it (``weight_errors``). The error of fixed
  weights is no white noise: it is shaped like the signal (a depthwise kernel passes it as it
  passes the signal), and two layers' errors can cancel or add downstream, which the joint
  product keeps. With bias correction each layer's error loses its per-channel mean over the
  images (folded into the bias). The weight error acting on the input's own noise adds ``||dW||^2`` times
  that noise, with the layer's white-noise gains.

Sources of different kinds are independent, so powers add. Read block by block, each block turns the noise it
receives into ``N_out = a N_in + b`` (``Prediction.recurrence``); repeating those pairs is how the
model goes deeper (``deeper``), and ``regrid`` changes bit widths, with no new measurement of
the network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.nn import functional as F

from effdeploy.model.arch import round_repeats
from effdeploy.quant import noise_model as nm
from effdeploy.quant.fakequant import (
    act_qparams,
    fixed_unit_qparams,
    mse_weight_clip,
    sigmoid_saturation,
    weight_qmax,
    weight_scales,
)

#: a perturbation's rms relative to the tensor it is added to: small enough for a linear response,
#: large enough that float32 rounding of the difference stays far below it
PERTURBATION = 1e-3


# ---------------------------------------------------------------- the network's pieces


@dataclass
class Segment:
    """A piece of the network with one input tensor and one output tensor: the stem, an MBConv
    block, the head."""

    name: str  # "stem", "blocks.block2a", "head"
    input: str | None  # the point it reads (None: the image)
    output: str  # the point it hands on
    stage: int | None = None  # an MBConv block's stage
    residual: bool = False
    points: list[str] = field(default_factory=list)


def _segments(sim) -> list[Segment]:
    from effdeploy.quant.measure import block_output_points

    segs = [Segment("stem", None, "stem.act" if "stem.act" in sim.points else "stem.conv")]
    for spec, out in zip(sim.model.arch.blocks, block_output_points(sim), strict=True):
        segs.append(Segment(f"blocks.{spec.name}", segs[-1].output, out, spec.stage, spec.has_residual))
    segs.append(Segment("head", segs[-1].output, "classifier"))
    return segs


def segment_of(path: str, segs: list[Segment]) -> int:
    """Index of the segment a module path (or ``input``, the image) belongs to."""
    if path == "input" or path.startswith("stem"):
        return 0
    if path.startswith("blocks."):
        name = ".".join(path.split(".")[:2])
        return next(i for i, s in enumerate(segs) if s.name == name)
    return len(segs) - 1


class _Probe:
    """A copy of the folded float graph (without the simulation's quantizer hooks) that captures
    every point, can clamp every point to a grid's range, and adds a perturbation at one module's
    output."""

    def __init__(self, sim, segs: list[Segment]) -> None:
        sim.detach_hooks()
        try:
            self.model = copy.deepcopy(sim.model).eval()
        finally:
            sim.attach_hooks()
        self.modules = dict(self.model.named_modules())
        self.segs = segs
        self.site_of = {point: path for path, point in sim._hook_paths.items()}
        self.captured: dict[str, torch.Tensor] = {}
        self.site_out: dict[str, torch.Tensor] = {}
        self.order: list[str] = []  # module paths of the sites, in the order they run
        self.perturb: dict[str, tuple[float, Callable]] = {}  # site -> (eps, maker of the direction)
        self.clamps: dict[str, tuple[float, float]] | None = None
        self.inside: dict[str, tuple[int, int]] = {}  # point -> (values within its clamp, values)
        for point, path in self.site_of.items():
            if point != "input":
                self.modules[path].register_forward_hook(self._capture(point))
        for path in {*self.site_of.values(), *sim.weights} - {"input"}:
            self.modules[path].register_forward_hook(self._inject(path), prepend=True)

    def _capture(self, point: str):
        def hook(module, args, output):
            if self.clamps is not None:
                output = self._clamp(point, output)
            self.captured[point] = output
            return output

        return hook

    def _clamp(self, point: str, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.clamps[point]
        n_in, n = self.inside.get(point, (0, 0))
        self.inside[point] = (n_in + int(((x >= lo) & (x <= hi)).sum()), n + x.numel())
        return x.clamp(lo, hi)

    def _inject(self, path: str):
        def hook(module, args, output):
            if path not in self.order:
                self.order.append(path)
            self.site_out[path] = output
            if path not in self.perturb:
                return None
            eps, make = self.perturb[path]
            return output + eps * make(module, args[0], output)

        return hook

    def run_from(self, start: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run segments ``start``.. on ``x`` (the input of segment ``start``); every point captured."""
        self.captured, self.site_out = {}, {}
        for seg in self.segs[start:]:
            if seg.name == "stem":
                if self.clamps is not None:
                    x = self._clamp("input", x)
                self.captured["input"] = x
                x = self.model.stem(x)
            elif seg.name == "head":
                x = self.model.forward_head(self.model.head(x))
            else:
                x = self.modules[seg.name](x)
        return self.captured

    def response(self, perturb: dict[str, tuple[float, Callable]], start: int, x: torch.Tensor, base: dict):
        """The summed squared change at every point when ``eps * make(...)`` is added at each site
        of ``perturb`` (all at once; ``eps`` the same for all), divided by ``eps^2``."""
        eps = next(iter(perturb.values()))[0]
        self.perturb = perturb
        try:
            out = self.run_from(start, x)
        finally:
            self.perturb = {}
        return {p: float((t - base[p]).double().pow(2).sum()) / (eps * eps) for p, t in out.items()}


def _rms(x: torch.Tensor) -> float:
    return max(float(x.double().pow(2).mean().sqrt()), 1e-30)


@torch.no_grad()
def white_noise_gain(fn: Callable, x: torch.Tensor, *, gen: torch.Generator | None = None, base=None):
    """The linearised gain of ``fn`` for white noise on ``x``: the power per output element that
    white noise of unit power per input element causes, ``E||J d||^2 / numel(out)``, estimated by
    a forward difference ``fn(x + eps d) - fn(x)`` with one Gaussian draw ``d`` (averaging over
    the elements is the expectation). ``fn`` returns a tensor (a float comes back) or a dict of
    tensors (a dict of floats); ``base`` is ``fn(x)`` when known."""
    eps = PERTURBATION * _rms(x)
    base = fn(x) if base is None else base
    out = fn(x + eps * torch.randn(x.shape, generator=gen, dtype=x.dtype))
    if isinstance(out, torch.Tensor):
        return float((out - base).double().pow(2).mean()) / eps**2
    return {k: float((t - base[k]).double().pow(2).mean()) / eps**2 for k, t in out.items()}


# ---------------------------------------------------------------- calibration statistics


@dataclass
class WeightInput:
    """A weight layer's float weight and the point it reads."""

    input_point: str | None
    weight: np.ndarray  # (out, in/groups, kh, kw) or (out, in)


@dataclass
class CalibrationStats:
    """What the model knows of the float network: no bit width in it."""

    images: int
    gain_images: int
    points: list[str]
    signal: dict[str, float]  # point -> E[x^2]
    site_of: dict[str, str]  # point -> module path of its quantizer
    order: list[str]  # sites (quantizer and weight-layer module paths) in execution order
    weights: dict[str, WeightInput]
    segments: list[Segment]
    gains: dict[str, np.ndarray]  # quantizer site -> per-element power at each point per unit white power
    network: _Probe = field(repr=False)  # the float graph, for what depends on a grid
    batches: list[torch.Tensor] = field(repr=False)

    @property
    def gain_batches(self) -> list[torch.Tensor]:
        """The first ``gain_images`` calibration images, where every linearised response is measured."""
        out, left = [], self.gain_images
        for b in self.batches:
            if left <= 0:
                break
            out.append(b[:left])
            left -= len(out[-1])
        return out

    def gain(self, site: str, point: str) -> float:
        return float(self.gains[site][self.points.index(point)])


@torch.no_grad()
def calibration_stats(sim, batches: list[torch.Tensor], *, gain_images: int | None = None, seed: int = 0):
    """The float network's statistics on calibration ``batches`` (signals) and its white-noise gains
    on the first ``gain_images`` of them (all when None)."""
    segs = _segments(sim)
    probe = _Probe(sim, segs)
    site_of = probe.site_of
    points = list(sim.points)
    for point in points:
        segs[segment_of(site_of[point], segs)].points.append(point)

    signal = dict.fromkeys(points, 0.0)
    count = dict.fromkeys(points, 0)
    for xb in batches:
        for p, t in probe.run_from(0, xb).items():
            signal[p] += float(t.double().pow(2).sum())
            count[p] += t.numel()
    weights = {name: WeightInput(w.input_point, w.float_weight.double().numpy()) for name, w in sim.weights.items()}
    stats = CalibrationStats(
        images=sum(int(b.shape[0]) for b in batches),
        gain_images=sum(int(b.shape[0]) for b in batches) if gain_images is None else gain_images,
        points=points,
        signal={p: signal[p] / count[p] for p in points},
        site_of=site_of,
        order=["input", *probe.order],
        weights=weights,
        segments=segs,
        gains={},
        network=probe,
        batches=list(batches),
    )

    # white-noise gains: each quantizer's tensor perturbed alone, from its segment to the end
    gen = torch.Generator().manual_seed(seed)
    quantizer_sites = [s for s in stats.order if s in site_of.values()]
    power = {s: np.zeros(len(points)) for s in quantizer_sites}
    numel = np.zeros(len(points))
    col = {p: i for i, p in enumerate(points)}

    def white(module, x, output):
        return torch.randn(output.shape, generator=gen)

    for xb in stats.gain_batches:
        base = dict(probe.run_from(0, xb))
        site_out = dict(probe.site_out)
        for p, t in base.items():
            numel[col[p]] += t.numel()
        for site in quantizer_sites:
            start = segment_of(site, segs)
            x = xb if segs[start].input is None else base[segs[start].input]
            if site == "input":
                gain = white_noise_gain(lambda z: dict(probe.run_from(0, z)), x, gen=gen, base=base)
                resp = {p: g * base[p].numel() for p, g in gain.items()}
            else:
                resp = probe.response({site: (PERTURBATION * _rms(site_out[site]), white)}, start, x, base)
            for p, v in resp.items():
                power[site][col[p]] += v
    stats.gains = {s: v / np.maximum(numel, 1) for s, v in power.items()}
    return stats


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class ActGrid:
    lo: float
    hi: float
    bits: int
    limit: tuple[float, float] | None = None
    fixed: bool = False  # a sigmoid's fixed [0, 1) grid

    @property
    def step(self) -> float:
        return (self.hi - self.lo) / (2**self.bits - 1)


@dataclass(frozen=True)
class WeightGrid:
    bits: int
    scales: np.ndarray  # per output channel


@dataclass(frozen=True)
class Grid:
    """A quantization grid: what the model takes from a simulation, and what ``regrid`` changes."""

    acts: dict[str, ActGrid]
    weights: dict[str, WeightGrid]
    bias_correction: bool = False
    weight_observer: str = "minmax"
    saturate_sigmoid_inputs: bool = False


def grid_from_sim(sim, *, bias_correction: bool = False, weight_observer: str = "minmax") -> Grid:
    """The grid of a calibrated simulation: ranges, limits, weight scales and bits."""
    acts = {}
    for name, p in sim.points.items():
        qp = p.fixed or p.qparams
        acts[name] = ActGrid(qp.lo, qp.hi, p.bits, p.limit, fixed=p.fixed is not None)
    weights = {n: WeightGrid(w.bits, w.scales.double().numpy()) for n, w in sim.weights.items()}
    saturate = any(p.limit is not None for p in sim.points.values())
    return Grid(acts, weights, bias_correction, weight_observer, saturate)


def regrid(grid: Grid, stats: CalibrationStats, weight_bits: int, act_bits: int) -> Grid:
    """The same ranges at other bit widths: activation ranges kept (cut to a sigmoid's saturation at
    the new width where the grid saturates sigmoid inputs), sigmoid outputs on their fixed grid,
    weight scales chosen again by the grid's weight observer ("auto": min-max at 8 bits, MSE below)."""
    acts = {}
    bound = sigmoid_saturation(act_bits)
    for name, a in grid.acts.items():
        if a.fixed:
            qp = fixed_unit_qparams(act_bits)
            acts[name] = ActGrid(qp.lo, qp.hi, act_bits, None, fixed=True)
            continue
        limit = a.limit
        if limit is not None and grid.saturate_sigmoid_inputs:
            limit = (-bound, bound if math.isfinite(limit[1]) else math.inf)
        lo, hi = (max(a.lo, limit[0]), min(a.hi, limit[1])) if limit is not None else (a.lo, a.hi)
        qp = act_qparams(lo, hi, act_bits)
        acts[name] = ActGrid(qp.lo, qp.hi, act_bits, limit)
    weights = {}
    use_mse = grid.weight_observer == "mse" or (grid.weight_observer == "auto" and weight_bits < 8)
    for name, w in stats.weights.items():
        t = torch.from_numpy(w.weight)
        clip = mse_weight_clip(t, weight_bits) if use_mse else None
        weights[name] = WeightGrid(weight_bits, weight_scales(t, weight_bits, clip).numpy())
    return replace(grid, acts=acts, weights=weights)


# ---------------------------------------------------------------- what a grid does on calibration data


#: a tensor whose rms is below this many steps of its grid does not spread over the grid: its
#: rounding error is measured instead of taken as step^2/12
FEW_STEPS = 2.0


@dataclass
class Clipping:
    """A grid's clipping on the calibration images, measured in the float network with every
    quantizer's clamp in place (no rounding): each clamp acts on what the clamps before it left,
    as in the quantized network, where a value clipped once is not clipped again downstream.
    Also the rounding error of those clamped values on the grid, for tensors too narrow for
    step^2/12 (a closed gate's product, a branch switched off: values within a step of zero round
    to zero, an error no larger than the values themselves)."""

    inside: dict[str, float]  # point -> fraction of values within its range
    error: dict[str, float]  # point -> mean square of the clamped network minus the reference
    signal: dict[str, float]  # point -> E[reference^2] (the reference clamped to the point's limit)
    rounding: dict[str, float]  # point -> mean square rounding error of the clamped values
    power: dict[str, float]  # point -> mean square of the clamped values

    def rounding_noise(self, point: str, g: ActGrid) -> float:
        """``inside * step^2/12``, or the measured rounding error where the tensor's rms is below
        ``FEW_STEPS`` steps."""
        if math.sqrt(self.power[point]) < FEW_STEPS * g.step:
            return self.rounding[point]
        return act_noise(g, self.inside[point])


@torch.no_grad()
def clipping(stats: CalibrationStats, grid: Grid) -> Clipping:
    """Measure ``grid``'s clipping on the calibration images (one float and one clamped pass)."""
    net = stats.network
    err = dict.fromkeys(stats.points, 0.0)
    sig = dict.fromkeys(stats.points, 0.0)
    count = dict.fromkeys(stats.points, 0)
    rounding = dict.fromkeys(stats.points, 0.0)
    power = dict.fromkeys(stats.points, 0.0)
    net.inside = {}
    for xb in stats.batches:
        ref = dict(net.run_from(0, xb))
        net.clamps = {p: (g.lo, g.hi) for p, g in grid.acts.items()}
        try:
            clamped = net.run_from(0, xb)
        finally:
            net.clamps = None
        for p, t in clamped.items():
            r = ref[p].double()
            if grid.acts[p].limit is not None:
                r = r.clamp(*grid.acts[p].limit)
            err[p] += float((t.double() - r).pow(2).sum())
            sig[p] += float(r.pow(2).sum())
            g, v = grid.acts[p], t.double()
            rounding[p] += float((torch.round((v - g.lo) / g.step) * g.step + g.lo - v).pow(2).sum())
            power[p] += float(v.pow(2).sum())
            count[p] += t.numel()
    inside = {p: n_in / n for p, (n_in, n) in net.inside.items()}

    def mean(d: dict[str, float]) -> dict[str, float]:
        return {p: v / count[p] for p, v in d.items()}

    return Clipping(inside, mean(err), mean(sig), mean(rounding), mean(power))


def weight_error(w: np.ndarray, g: WeightGrid) -> np.ndarray:
    """The rounded weights minus the float ones (symmetric, per output channel, narrow range)."""
    s = g.scales.reshape((-1,) + (1,) * (w.ndim - 1))
    qmax = weight_qmax(g.bits)
    return np.clip(np.round(w / s), -qmax, qmax) * s - w


@dataclass
class WeightErrors:
    """The first-order effect of a grid's rounded weights on the float network's calibration
    images: the power at every point of the Jacobian-vector product along all the weight errors
    at once (``dW x`` at every layer, less its channel mean with bias correction), and along each
    segment's own. Deterministic errors are no independent noise: two layers' errors can cancel
    or add downstream, which the joint product keeps."""

    total: np.ndarray  # per point
    own: list[np.ndarray]  # per segment, per point


@torch.no_grad()
def weight_errors(stats: CalibrationStats, grid: Grid) -> WeightErrors:
    """Measure the grid's weight errors' first-order effect on the gain images (``WeightErrors``)."""
    net, segs = stats.network, stats.segments
    col = {p: i for i, p in enumerate(stats.points)}
    total = np.zeros(len(col))
    own = [np.zeros(len(col)) for _ in segs]
    numel = np.zeros(len(col))
    errors = {n: weight_error(wi.weight, grid.weights[n]) for n, wi in stats.weights.items()}
    # the largest relative weight error moves its layer's output by about PERTURBATION
    eps = PERTURBATION / max(
        max(np.linalg.norm(e) / np.linalg.norm(stats.weights[n].weight) for n, e in errors.items()), 1e-12
    )

    def along(name: str):
        dw = torch.from_numpy(errors[name]).float()

        def make(module, x, output):
            if isinstance(module, torch.nn.Linear):
                d = F.linear(x, dw)
            else:
                d = F.conv2d(x, dw, None, module.stride, module.padding, module.dilation, module.groups)
            if grid.bias_correction:  # the channel's mean error (over the images) goes into its bias
                d = d - d.mean([i for i in range(d.ndim) if i != 1], keepdim=True)
            return d

        return make

    directions = {name: (eps, along(name)) for name in stats.weights}
    for xb in stats.gain_batches:
        base = dict(net.run_from(0, xb))
        for p, t in base.items():
            numel[col[p]] += t.numel()
        for p, v in net.response(directions, 0, xb, base).items():
            total[col[p]] += v
        for k, seg in enumerate(segs):
            mine = {n: d for n, d in directions.items() if segment_of(n, segs) == k}
            x = xb if seg.input is None else base[seg.input]
            for p, v in net.response(mine, k, x, base).items():
                own[k][col[p]] += v
    return WeightErrors(total / np.maximum(numel, 1), [o / np.maximum(numel, 1) for o in own])


# ---------------------------------------------------------------- injected noise


def act_noise(g: ActGrid, inside: float = 1.0) -> float:
    """A quantizer's rounding error power: ``step^2/12`` on the fraction of values inside its range."""
    return nm.quantizer_noise(g.step, inside=inside)


def weight_times_noise(wi: WeightInput, g: WeightGrid, input_noise: float) -> float:
    """Power per output element of ``dW n``: the weight error acting on the input's noise."""
    dw = weight_error(wi.weight, g).reshape(wi.weight.shape[0], -1)
    return float(input_noise * (dw * dw).sum(1).mean())


# ---------------------------------------------------------------- composition

#: how ``Prediction.parts`` splits the noise at a point
PARTS = ("rounding", "weights", "clipping")


@dataclass
class Prediction:
    """Signal and predicted noise power at every point, the noise split by cause, and each
    segment's recurrence ``N_out = a N_in + b`` (the gain on the noise it receives, the noise it
    adds; exact for the network as it is) for the grid's mix of sources."""

    points: dict[str, nm.Tensor]
    parts: dict[str, dict[str, float]]  # point -> part -> noise power
    recurrence: list[tuple[str, float, float]]

    def snr_db(self, point: str) -> float:
        return self.points[point].snr_db


def predict(
    stats: CalibrationStats,
    grid: Grid,
    clip: Clipping | None = None,
    weights: WeightErrors | None = None,
) -> Prediction:
    """Noise at every point: each quantizer's rounding (``step^2/12``) times its gains, the weight
    errors' first-order effect, the weight errors acting on the input noise (white, with the
    layer's output gains), and the clipping measured with the grid's clamps; ``clip`` and
    ``weights`` are measured here when not given. Sites are visited in execution order, so the
    noise at a weight layer's input is complete when it is read."""
    clip = clip or clipping(stats, grid)
    weights = weights or weight_errors(stats, grid)
    col = {p: i for i, p in enumerate(stats.points)}
    point_at = {path: p for p, path in stats.site_of.items()}
    clip_vec = np.array([clip.error[p] for p in stats.points])
    rounding = np.zeros(len(col))
    cross = np.zeros(len(col))
    own = np.array(weights.own)  # (segment, point): noise from each segment's own sources
    for site in stats.order:
        seg = segment_of(site, stats.segments)
        if site in stats.gains:
            p = point_at[site]
            contribution = clip.rounding_noise(p, grid.acts[p]) * stats.gains[site]
            rounding += contribution
            own[seg] += contribution
        wi = stats.weights.get(site)
        if wi is not None and wi.input_point in col and site in stats.gains:
            j = col[wi.input_point]
            n_in = float(rounding[j] + weights.total[j] + cross[j] + clip_vec[j])
            contribution = weight_times_noise(wi, grid.weights[site], n_in) * stats.gains[site]
            cross += contribution
            own[seg] += contribution
    lin = rounding + weights.total + cross
    total = lin + clip_vec
    points = {p: nm.Tensor(clip.signal[p], float(total[i])) for p, i in col.items()}
    parts = {
        p: {
            "rounding": float(rounding[i]),
            "weights": float(weights.total[i] + cross[i]),
            "clipping": float(clip_vec[i]),
        }
        for p, i in col.items()
    }
    recurrence = []
    for k, seg in enumerate(stats.segments):
        out = col[seg.output]
        if seg.input is None:
            recurrence.append((seg.name, 0.0, float(total[out])))
            continue
        j = col[seg.input]
        # the gain on the noise received is the linear sources' (what the network's gains carry);
        # b is the rest: own sources, and the clipping added (or cut, b smaller) in the segment
        a = (float(lin[out]) - float(own[k, out])) / float(lin[j]) if lin[j] > 0 else 0.0
        recurrence.append((seg.name, a, float(total[out]) - a * float(total[j])))
    return Prediction(points, parts, recurrence)


# ---------------------------------------------------------------- deeper networks


@dataclass(frozen=True)
class BlockSnr:
    name: str
    signal: float
    noise: float
    copy: bool = False  # a block the B0 network does not have

    @property
    def snr_db(self) -> float:
        return nm.Tensor(self.signal, self.noise).snr_db


def repeated_blocks(stats: CalibrationStats) -> dict[int, Segment]:
    """Per stage, the block a deeper network repeats: the stage's last residual block, or, for a
    stage without one (a single block that changes the width), the last residual block of the
    nearest stage that has one (the earlier on a tie)."""
    blocks = [s for s in stats.segments if s.stage is not None]
    stages = sorted({s.stage for s in blocks})
    last = {st: [s for s in blocks if s.stage == st and s.residual][-1:] for st in stages}
    have = [st for st in stages if last[st]]
    return {st: last[min(have, key=lambda h: (abs(h - st), h))][0] for st in stages} if have else {}


def nsr_step(pred: Prediction, seg: Segment) -> tuple[float, float]:
    """A block's recurrence for the noise-to-signal ratio, ``NSR_out = g NSR_in + n``: ``g = a / r``
    (``r`` its signal gain ``S_out / S_in``), ``n = b / S_out``."""
    a, b = next((a, b) for name, a, b in pred.recurrence if name == seg.name)
    s_in, s_out = pred.points[seg.input].signal, pred.points[seg.output].signal
    return a * s_in / s_out, b / s_out


def deeper(stats: CalibrationStats, pred: Prediction, depth: float) -> tuple[list[BlockSnr], BlockSnr]:
    """Every block's output and the logits of the network with each stage's block count scaled by
    ``depth`` (rounded up, as the family does), from the B0 network's recurrence.

    Written for the noise-to-signal ratio (``nsr_step``), so that a repeated block carries its own
    operating point (its quantizers' ranges scale with its signal, as a calibration of the deeper
    network would set them). A stage's extra blocks repeat ``repeated_blocks``' block for it; a
    repeat adds no less than nothing (``n >= 0``: a block that cut clipping it received has none of
    it to cut again). ``depth=1`` gives ``pred`` back."""
    segs = stats.segments
    sig = {p: t.signal for p, t in pred.points.items()}
    blocks = [s for s in segs if s.stage is not None]
    template = repeated_blocks(stats)
    nsr = pred.points[segs[0].output].noise / sig[segs[0].output]
    out: list[BlockSnr] = []
    for stage in sorted(template):
        members = [s for s in blocks if s.stage == stage]
        for seg in members:
            g, n = nsr_step(pred, seg)
            nsr = g * nsr + n
            out.append(BlockSnr(seg.name, sig[seg.output], nsr * sig[seg.output]))
        g, n = nsr_step(pred, template[stage])
        for i in range(round_repeats(len(members), depth) - len(members)):
            nsr = g * nsr + max(n, 0.0)
            t = template[stage]
            out.append(BlockSnr(f"{t.name}+{i + 1}", sig[t.output], nsr * sig[t.output], copy=True))
    head = segs[-1]
    a, b = next((a, b) for name, a, b in pred.recurrence if name == head.name)
    logits = BlockSnr("classifier", sig["classifier"], a * nsr * sig[head.input] + b)
    return out, logits

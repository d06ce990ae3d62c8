"""Mixed precision chosen by measurement: per-layer weight bit widths that fit a size budget.

After AIMET's automatic mixed precision. (1) Sensitivity: the simulation is calibrated once at
the base precision; each weight layer alone is then lowered to every candidate width (8, 6, 4)
and the network's logits on the calibration images are measured against float: output SNR and
the calibration loss, the mean KL(softmax(float) || softmax(quantized)) (no labels needed, and
zero when the predictions are untouched). (2) Search: starting with every layer at the widest
candidate, the greedy step lowers the layer whose measured loss increase per byte saved is the
smallest, until every layer is at the narrowest; each step's combination is measured as a whole,
which gives the curve of (size, output SNR, top-1 where labelled images are given). (3) Choice:
the point of the curve with the best measured output SNR among those within the budget.

Lowering one layer's weights changes no activation range (ranges are observed in the float
graph), so the sensitivity and the curve re-quantize that layer alone: its scales (with the
configured weight observer) and its int32 bias grid, exactly what a simulation built with that
layer's override and calibrated afresh holds (on the tiny test net: 13-20 ms a measurement
against 150-190 ms for a fresh simulation). Nothing upstream of the layer's block changes either,
so the network runs again from that block on (``Chain``). The activations keep the base
precision: the budget counts weight bytes, which no activation width changes. The measurement
uses the configured observers and round-to-nearest; the passes (AdaRound, bias correction, ...)
are left to ``effdeploy quantize``, which runs them on the chosen widths.

The choice is written as ``quant: {overrides: [...]}``: the config's own overrides, then one
exact, anchored pattern per searched layer with its weight bits. Configs have no overlay
mechanism, so this list is complete and replaces the ``quant.overrides`` of the run config (or
``write_overlay(..., base=config)`` writes that whole config with the list in place). A layer
whose weight bits the config's own overrides set keeps them and is not searched.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from effdeploy.errors import EffdeployError
from effdeploy.quant.sim import QuantSim, resolve_bits

DEFAULT_CANDIDATES = (8, 6, 4)
# decimal units as storage is sold, binary ones where the user asks for them
SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET_RE = re.compile(r"^\s*(size|bits)\s*=\s*(.*?)\s*$", re.IGNORECASE)
_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A limit on the quantized weights: ``size`` in bytes (integer weights at their widths,
    int32 biases, float32 scales: ``pipeline.weight_bytes``) or ``bits``, the mean weight bit
    width over all weight parameters."""

    kind: str  # size | bits
    value: float  # bytes, or mean bits
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``size=0.6MB``, ``size=600KB``, ``size=614400`` (bytes), ``size=600KiB``, ``bits=5.5``."""
        m = _BUDGET_RE.match(str(text))
        if not m:
            raise EffdeployError(f"--budget: {text!r} is not size=<bytes>[B|KB|MB|KiB|MiB] or bits=<mean weight bits>")
        kind, raw = m.group(1).lower(), m.group(2)
        if kind == "bits":
            try:
                value = float(raw)
            except ValueError:
                raise EffdeployError(f"--budget: bits={raw!r} is not a number") from None
            if not (math.isfinite(value) and 0 < value <= 32):
                raise EffdeployError(f"--budget: bits={raw} must be a mean weight width in (0, 32]")
            return cls("bits", value, f"bits={raw}")
        s = _SIZE_RE.match(raw)
        unit = s.group(2).lower() if s else None
        if s is None or unit not in SIZE_UNITS:
            raise EffdeployError(f"--budget: size={raw!r} is not a size such as 600KB, 0.6MB or 614400 (bytes)")
        value = float(s.group(1)) * SIZE_UNITS[unit]
        if not (math.isfinite(value) and value > 0):
            raise EffdeployError(f"--budget: size={raw} must be more than zero bytes")
        return cls("size", value, f"size={raw}")

    def measure(self, point: Point) -> float:
        return point.size_bytes if self.kind == "size" else point.mean_bits

    def allows(self, point: Point) -> bool:
        return self.measure(point) <= self.value

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class LayerScore:
    """The network's output with one layer's weights at ``bits`` (everything else at the base)."""

    bits: int
    snr_db: float
    loss: float


@dataclass(frozen=True)
class Point:
    """One combination of weight widths, measured as a whole."""

    step: int
    changed: str | None  # the layer the greedy step lowered (None: the start)
    bits: dict[str, int]  # every weight layer's width
    size_bytes: int
    mean_bits: float
    snr_db: float
    loss: float
    top1: float | None = None
    pareto: bool = False  # no other point is at most as large and at least as good (SNR)


@dataclass
class MixedPrecisionResult:
    budget: Budget
    precision: str  # the base: its activation widths, and the weights' widest candidate
    candidates: tuple[int, ...]
    sensitivity: dict[str, list[LayerScore]]  # searched layer -> one score per candidate
    curve: list[Point]
    chosen: Point
    overrides: list[dict]  # the complete quant.overrides the choice needs
    pinned: dict[str, int] = field(default_factory=dict)  # layers the config's overrides fix
    float_bytes: int = 0  # float32 weights and biases
    calibration_images: int = 0
    eval_images: int = 0  # labelled images behind the curve's top-1 (0: none)
    seconds: float = 0.0

    def overlay(self) -> dict:
        """The choice as a config overlay: replaces ``quant.overrides`` (see the module doc)."""
        return {"quant": {"overrides": [dict(o) for o in self.overrides]}}

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The curve as printable rows: column names, and one row of strings per point
        (Pareto points only, plus the chosen one); ``*`` marks the choice."""
        cols = ["step", "lowered", "size", "mean bits", "output SNR", "cal. loss", "top-1", ""]
        rows = []
        for p in self.curve:
            if not (p.pareto or p is self.chosen):
                continue
            lowered = "-" if p.changed is None else f"{p.changed} -> {p.bits[p.changed]}"
            rows.append(
                [
                    str(p.step),
                    lowered,
                    f"{p.size_bytes / 1e3:,.1f} KB",
                    f"{p.mean_bits:.2f}",
                    f"{p.snr_db:.2f} dB",
                    f"{p.loss:.2e}",
                    "-" if p.top1 is None else f"{100 * p.top1:.2f}%",
                    "*" if p is self.chosen else "",
                ]
            )
        return cols, rows

    def to_dict(self) -> dict:
        return {
            "budget": {"kind": self.budget.kind, "value": self.budget.value, "text": self.budget.text},
            "precision": self.precision,
            "candidates": list(self.candidates),
            "chosen": dataclasses.asdict(self.chosen),
            "overrides": self.overrides,
            "pinned": self.pinned,
            "float_bytes": self.float_bytes,
            "calibration_images": self.calibration_images,
            "eval_images": self.eval_images,
            "seconds": self.seconds,
            "sensitivity": {k: [dataclasses.asdict(s) for s in v] for k, v in self.sensitivity.items()},
            "curve": [dataclasses.asdict(p) for p in self.curve],
        }


# ---------------------------------------------------------------------------------- measurement
@contextmanager
def _only(sim: QuantSim, name: str) -> Iterator[None]:
    """The simulation seeing one weight layer, so its own per-layer code re-quantizes just it."""
    every = sim.weights
    sim.weights = {name: every[name]}
    try:
        yield
    finally:
        sim.weights = every


class LayerWidths:
    """Sets weight layers of a calibrated simulation to other widths in place, remembering each
    (layer, width)'s scales (the MSE clip search below 8 bits is the costly part)."""

    def __init__(self, sim: QuantSim, weight_observer: str) -> None:
        self.sim = sim
        self.weight_observer = weight_observer
        self._scales: dict[tuple[str, int], torch.Tensor] = {}

    def set(self, name: str, bits: int) -> None:
        w = self.sim.weights[name]
        w.bits = bits
        with _only(self.sim, name):
            if (name, bits) in self._scales:
                w.scales, w.qweight, w.bias_delta = self._scales[name, bits], None, None
            else:
                self.sim.set_weight_scales(self.weight_observer)
                self._scales[name, bits] = w.scales
            self.sim.set_weights(quantized=self.sim.mode == "quant")


def _logits(sim: QuantSim, batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([sim(x) for x in batches])


CACHE_BYTES = 2**30


class Chain:
    """The simulated network as a chain of links (stem, each block, head, pool + classifier)
    with each link's quantized input kept for every batch: lowering a layer changes nothing
    upstream of its link, so only that link onward runs again (about half the network on
    average). Inputs are kept, the smallest first, while they fit in ``max_bytes``; a change
    runs from the nearest kept link at or before its own. The inputs belong to the simulation's
    widths when the chain was built or last run with ``keep``."""

    def __init__(self, sim: QuantSim, batches: list[torch.Tensor], max_bytes: int = CACHE_BYTES) -> None:
        m = sim.model
        try:
            blocks = list(m.blocks.named_children())
            links = [(("stem",), m.stem), *(((f"blocks.{n}",), b) for n, b in blocks)]
            links += [(("head",), m.head), (("pool", "dropout", "classifier"), m.forward_head)]
        except AttributeError:  # another architecture: one link, every change runs it all
            links = [(("",), m)]
        self.prefixes = [p for p, _ in links]
        self.fns = [f for _, f in links]
        self.kept: dict[int, list[torch.Tensor]] = {0: list(batches)}
        with torch.no_grad():
            x, need = batches[0], {}
            for i in range(1, len(self.fns)):
                x = self.fns[i - 1](x)
                need[i] = x.nbytes * sum(len(b) for b in batches) // len(batches[0])
        total = 0
        for i in sorted(need, key=need.get):
            if total + need[i] <= max_bytes:
                self.kept[i], total = [], total + need[i]
        self.logits(keep=True)

    def link_of(self, layer: str) -> int:
        for i, prefixes in enumerate(self.prefixes):
            if any(p and (layer == p or layer.startswith(p + ".")) for p in prefixes):
                return i
        return 0

    @torch.no_grad()
    def logits(self, changed: str | None = None, *, keep: bool = False) -> torch.Tensor:
        """The logits with the simulation as it is, ``changed`` being the only layer changed
        since the inputs were kept (None: run it all); ``keep`` stores the new inputs."""
        k = 0 if changed is None else self.link_of(changed)
        start = max(i for i in self.kept if i <= k)
        outs = []
        for b, x in enumerate(self.kept[start]):
            for i in range(start, len(self.fns)):
                if keep and i > start and i in self.kept:
                    if b == len(self.kept[i]):
                        self.kept[i].append(x)
                    else:
                        self.kept[i][b] = x
                x = self.fns[i](x)
            outs.append(x)
        return torch.cat(outs)


def float_logits(sim: QuantSim, batches: list[torch.Tensor]) -> torch.Tensor:
    """The BN-folded float network's logits: the reference every measurement compares with."""
    with sim.running(quantized=False):
        return _logits(sim, batches)


def _score(out: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Output SNR (dB) and the mean KL(softmax(float) || softmax(quantized)) of logits ``out``."""
    from effdeploy.metrics import snr_db
    from effdeploy.quant.passes import output_error

    loss = float(output_error(reference.double(), "kl")(out.double()).mean())
    return snr_db(reference.numpy(), out.numpy()), loss


def weight_size(numel: dict[str, int], out_channels: dict[str, int], bits: dict[str, int]) -> int:
    """Bytes of the quantized weights: integer weights at their widths, an int32 bias and a
    float32 scale per output channel (``pipeline.weight_bytes``'s count, from shapes and widths)."""
    return int(sum(numel[n] * bits[n] / 8 + 8 * out_channels[n] for n in bits))


def mean_bits(numel: dict[str, int], bits: dict[str, int]) -> float:
    return sum(numel[n] * bits[n] for n in bits) / sum(numel[n] for n in bits)


@torch.no_grad()
def sensitivity(
    widths: LayerWidths,
    chain: Chain,
    layers: list[str],
    candidates: tuple[int, ...],
    reference: torch.Tensor,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, list[LayerScore]]:
    """Each layer alone at each candidate width (the rest as the simulation holds them, and as
    ``chain`` kept them): output SNR and calibration loss on the chain's batches. The widest
    candidate must be the layers' present width."""
    sim = widths.sim
    base = _score(chain.logits(), reference)
    out: dict[str, list[LayerScore]] = {}
    t0 = time.perf_counter()
    for i, name in enumerate(layers):
        start = sim.weights[name].bits
        scores = []
        for bits in candidates:
            if bits == start:
                scores.append(LayerScore(bits, *base))
                continue
            widths.set(name, bits)
            scores.append(LayerScore(bits, *_score(chain.logits(name), reference)))
        widths.set(name, start)
        out[name] = scores
        if (i + 1) % 20 == 0 or i + 1 == len(layers):
            log(f"  sensitivity: {i + 1}/{len(layers)} layers ({time.perf_counter() - t0:.0f} s)")
    return out


@torch.no_grad()
def pareto_curve(
    widths: LayerWidths,
    chain: Chain,
    scores: dict[str, list[LayerScore]],
    reference: torch.Tensor,
    *,
    eval_chain: Chain | None = None,
    eval_labels: np.ndarray | None = None,
    log: Callable[[str], None] = print,
) -> list[Point]:
    """Greedy lowering, AIMET-style: from every searched layer at its widest candidate, each step
    takes the (layer, narrower candidate) with the smallest measured loss increase per byte saved,
    applies it and measures the whole network (SNR and loss on ``chain``'s batches; top-1 on
    ``eval_chain``'s images where given). Ends with every searched layer at its narrowest candidate."""
    from effdeploy.metrics import topk_accuracy

    sim = widths.sim
    numel = {n: w.float_weight.numel() for n, w in sim.weights.items()}
    out_ch = {n: w.float_weight.shape[0] for n, w in sim.weights.items()}
    loss_at = {n: {s.bits: s.loss for s in ss} for n, ss in scores.items()}
    # the output's relative noise power: orders the layers whose loss does not move
    noise_at = {n: {s.bits: 10 ** (-s.snr_db / 10) for s in ss} for n, ss in scores.items()}

    def point(step: int, changed: str | None) -> Point:
        bits = {n: w.bits for n, w in sim.weights.items()}
        snr, loss = _score(chain.logits(changed, keep=True), reference)
        top1 = None
        if eval_chain is not None and eval_labels is not None:
            top1 = topk_accuracy(eval_chain.logits(changed, keep=True).numpy(), eval_labels, 1)
        return Point(step, changed, bits, weight_size(numel, out_ch, bits), mean_bits(numel, bits), snr, loss, top1)

    curve = [point(0, None)]
    t0 = time.perf_counter()
    while True:
        best = None
        for name in scores:
            now = sim.weights[name].bits
            for bits in loss_at[name]:
                if bits >= now:
                    continue
                saved = numel[name] * (now - bits) / 8
                rate = (loss_at[name][bits] - loss_at[name][now]) / saved
                noise = (noise_at[name][bits] - noise_at[name][now]) / saved
                key = (rate, noise, -saved, name)  # ties: less noise, the larger saving, the name
                if best is None or key < best[0]:
                    best = (key, name, bits)
        if best is None:
            break
        _, name, bits = best
        widths.set(name, bits)
        curve.append(point(len(curve), name))
    log(f"  curve: {len(curve)} points ({time.perf_counter() - t0:.0f} s)")
    return _mark_pareto(curve)


def _mark_pareto(curve: list[Point]) -> list[Point]:
    def dominated(p: Point) -> bool:
        return any(
            q.size_bytes <= p.size_bytes
            and q.snr_db >= p.snr_db
            and (q.size_bytes < p.size_bytes or q.snr_db > p.snr_db)
            for q in curve
        )

    return [dataclasses.replace(p, pareto=not dominated(p)) for p in curve]


def choose(curve: list[Point], budget: Budget) -> Point:
    """The best measured output SNR within the budget (ties: the smaller model, then the earlier
    step). One strict order over a fixed curve: a tighter budget only removes points, so it
    never chooses a larger model."""
    within = [p for p in curve if budget.allows(p)]
    if not within:
        smallest = min(curve, key=budget.measure)
        raise EffdeployError(f"--budget: {budget} cannot be met: {_describe_size(smallest)} is the smallest")
    return max(within, key=lambda p: (p.snr_db, -p.size_bytes, -p.step))


def _describe_size(p: Point) -> str:
    return f"{p.size_bytes:,} bytes ({p.mean_bits:.2f} mean weight bits)"


def check_reachable(sim: QuantSim, layers: list[str], lowest: int, budget: Budget) -> None:
    """Refuse before any measurement a budget that even every searched layer at ``lowest`` bits
    (the rest as the simulation holds them) exceeds."""
    numel = {n: w.float_weight.numel() for n, w in sim.weights.items()}
    out_ch = {n: w.float_weight.shape[0] for n, w in sim.weights.items()}
    bits = {n: (lowest if n in layers else w.bits) for n, w in sim.weights.items()}
    floor = Point(-1, None, bits, weight_size(numel, out_ch, bits), mean_bits(numel, bits), 0.0, 0.0)
    if not budget.allows(floor):
        raise EffdeployError(
            f"--budget: {budget} cannot be met: every searched layer at {lowest} bits still takes "
            f"{_describe_size(floor)}"
        )


def layer_pattern(name: str) -> str:
    """A regex that matches exactly this layer (``resolve_bits`` searches, so it is anchored)."""
    return f"^{re.escape(name)}$"


def chosen_overrides(existing: list[dict], chosen: Point, searched: list[str]) -> list[dict]:
    """The complete ``quant.overrides``: the config's own (first, so that ours win), then one
    exact pattern per searched layer, every one listed whatever its width."""
    return [*existing, *({"pattern": layer_pattern(n), "weight_bits": chosen.bits[n]} for n in searched)]


def wider_than(point: Point, base_bits: int) -> list[dict]:
    """``quant.overrides`` that put a point's widths on a simulation whose base weight width is
    ``base_bits``: one anchored alternation per width wider than the base (the narrower layers
    need none), widest first. Short enough to read in a validation table; ``resolve_bits`` keeps
    the last match, and no layer matches two of these."""
    widths = sorted({b for b in point.bits.values() if b > base_bits}, reverse=True)
    out = []
    for w in widths:
        names = sorted(n for n, b in point.bits.items() if b == w)
        out.append({"pattern": "^(" + "|".join(re.escape(n) for n in names) + ")$", "weight_bits": w})
    return out


def search_sim(
    sim: QuantSim,
    budget: Budget,
    batches: list[torch.Tensor],
    *,
    weight_observer: str,
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES,
    pinned: set[str] = frozenset(),
    eval_batches: list[torch.Tensor] | None = None,
    eval_labels: np.ndarray | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[LayerScore]], list[Point], Point]:
    """Sensitivity, curve and choice on a calibrated simulation (whose unpinned layers hold the
    widest candidate): the measuring part of ``search``, free of files."""
    candidates = check_candidates(candidates)
    layers = [n for n in sim.weights if n not in pinned]
    if not layers:
        raise EffdeployError("quant.overrides: every weight layer's bits are fixed there; nothing to search")
    check_reachable(sim, layers, candidates[-1], budget)
    widths = LayerWidths(sim, weight_observer)
    for n in layers:
        if sim.weights[n].bits != candidates[0]:
            widths.set(n, candidates[0])
    reference = float_logits(sim, batches)
    chain = Chain(sim, batches)
    scores = sensitivity(widths, chain, layers, candidates, reference, log=log)
    eval_chain = None if eval_batches is None else Chain(sim, eval_batches)
    curve = pareto_curve(widths, chain, scores, reference, eval_chain=eval_chain, eval_labels=eval_labels, log=log)
    chosen = choose(curve, budget)
    for n in layers:  # the simulation as chosen
        widths.set(n, chosen.bits[n])
    return scores, curve, chosen


def check_candidates(candidates) -> tuple[int, ...]:
    """Distinct widths 2..8, widest first."""
    try:
        values = sorted({int(c) for c in candidates}, reverse=True)
    except (TypeError, ValueError):
        raise EffdeployError(f"--candidates: {candidates!r} is not a list of bit widths") from None
    if not values or any(not 2 <= c <= 8 for c in values):
        raise EffdeployError(f"--candidates: weight widths must be between 2 and 8, got {list(candidates)}")
    return tuple(values)


# ---------------------------------------------------------------------------------- entry point
def search(
    run,
    budget: Budget,
    *,
    precision: str = "w8a8",
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES,
    eval_images: int | None = None,
    log: Callable[[str], None] = print,
) -> MixedPrecisionResult:
    """Choose per-layer weight widths for ``run``'s checkpoint within ``budget``.

    The checkpoint, the SE reorder and the calibration set are those ``effdeploy quantize`` uses;
    ``precision`` gives the activation widths and the widest weight candidate (its ``w`` must be
    the widest of ``candidates``). Top-1 along the curve is measured on ``eval_images`` of the
    held-out images (``quant.eval_data`` or ``data.test``; default ``quant.snr_images`` of them)
    when there are any; the choice itself rests on the calibration images only."""
    from effdeploy.config import parse_precision
    from effdeploy.data.sources import load_images
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.quant.pipeline import _batches, _ensure_placement, methods_for, run_method

    t0 = time.perf_counter()
    candidates = check_candidates(candidates)
    wb, _ = parse_precision(precision)
    if wb != candidates[0]:
        raise EffdeployError(
            f"--precision: {precision} has {wb}-bit weights; the widest candidate is {candidates[0]} (they must agree)"
        )
    if run.checkpoint is None or not Path(run.checkpoint).is_file():
        raise EffdeployError(f"{run.checkpoint}: checkpoint not found (train it with 'make train')")
    q = run.quant.for_precision(precision)
    model = load_checkpoint(run.checkpoint).eval()
    model, _ = _ensure_placement(model, run, log)
    pre = model.config.preprocess
    cal = load_images(q.calibration, pre, n=q.calibration_images)
    cal_batches = _batches(cal.inputs(pre), 64)

    eval_batches = eval_labels = None
    eval_source = q.eval_data or run.data.test
    if eval_source is not None and Path(eval_source).exists():
        held = load_images(eval_source, pre, n=eval_images or q.snr_images)
        eval_batches, eval_labels = _batches(held.inputs(pre), 256), np.asarray(held.labels)

    method = dataclasses.replace(methods_for(run, precision)[1], passes=())
    sim, _ = run_method(model, run.quant, method, precision, cal_batches)
    weight_overrides = [(o.pattern, o.weight_bits) for o in q.overrides]
    pinned = {n: w.bits for n, w in sim.weights.items() if resolve_bits(n, -1, weight_overrides) != -1}
    log(
        f"{run.name}: mixed precision within {budget} (weights at {'/'.join(map(str, candidates))} bits, "
        f"activations as {precision}); {len(sim.weights) - len(pinned)} layers searched"
        + (f", {len(pinned)} fixed by quant.overrides" if pinned else "")
        + f"; calibration: {len(cal)} images"
    )
    scores, curve, chosen = search_sim(
        sim,
        budget,
        cal_batches,
        weight_observer=method.weight_observer,
        candidates=candidates,
        pinned=set(pinned),
        eval_batches=eval_batches,
        eval_labels=eval_labels,
        log=log,
    )
    existing = [o.model_dump(exclude_defaults=True) for o in q.overrides]
    result = MixedPrecisionResult(
        budget=budget,
        precision=precision,
        candidates=candidates,
        sensitivity=scores,
        curve=curve,
        chosen=chosen,
        overrides=chosen_overrides(existing, chosen, list(scores)),
        pinned=pinned,
        float_bytes=4 * sum(p.numel() for p in model.parameters()),
        calibration_images=len(cal),
        eval_images=0 if eval_labels is None else len(eval_labels),
        seconds=round(time.perf_counter() - t0, 1),
    )
    log(
        f"  chosen (step {chosen.step}): {_describe_size(chosen)}, output SNR {chosen.snr_db:.2f} dB"
        + ("" if chosen.top1 is None else f", top-1 {100 * chosen.top1:.2f}%")
        + f" ({result.seconds:.0f} s)"
    )
    return result


def write_overlay(result: MixedPrecisionResult, path: str | Path, *, base: str | Path | None = None) -> Path:
    """Write the choice as YAML. Without ``base``: the overlay ``quant: {overrides: [...]}``, a
    complete list to put in place of a run config's ``quant.overrides``. With ``base`` (a run
    config file): that config with the list in place, which ``effdeploy quantize --config`` loads
    as it is. Either way it is validated as a config before it is written."""
    import yaml

    from effdeploy.config import QuantConfig, RunConfig, deep_merge, load_yaml, parse
    from effdeploy.fileio import atomic_write_text

    path = Path(path)
    data = result.overlay()
    if base is not None:
        data = deep_merge(load_yaml(base), data)  # lists are replaced whole
        parse(RunConfig, data, str(path))
    else:
        parse(QuantConfig, data["quant"], str(path))
    c = result.chosen
    head = (
        f"# Per-layer weight bits chosen within {result.budget} (activations as {result.precision}): "
        f"{c.size_bytes:,} bytes, {c.mean_bits:.2f} mean weight bits, output SNR {c.snr_db:.2f} dB "
        f"on {result.calibration_images} calibration images.\n"
    )
    if base is None:
        head += "# A complete quant.overrides list: it replaces the run config's own.\n"
    atomic_write_text(path, head + yaml.safe_dump(data, sort_keys=False))
    return path

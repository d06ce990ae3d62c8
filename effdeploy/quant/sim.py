"""The quantization simulation: the float model, BN folded, with a fake quantizer on every tensor
an integer runtime materialises, and fake-quantized weights.

No architecture is copied: quantizers are forward hooks on the model's own modules, so the
quantization points carry the model's parameter names (``blocks.block2a.se.gate``), which are the
names of the per-layer SNR report. The points are the tensors a full-integer TFLite / ONNX QDQ
model holds in int8:

- ``input``: the image;
- a conv followed by SiLU: the conv output (``.conv``), SiLU's sigmoid (``.act.sigmoid``, fixed
  [0, 1) range) and SiLU's product (``.act``) -- LOGISTIC and MUL are separate int8 ops;
  a conv followed by ReLU/ReLU6: only ``.act`` (the runtimes fuse the clamp into the conv);
  a conv with no activation (projection): ``.conv``;
- squeeze-excitation: ``se.pool`` (global mean), ``se.reduce``/``se.act`` as above,
  ``se.expand`` (the gate's logits), ``se.gate`` (sigmoid, fixed [0, 1) range) and ``se`` itself
  (the channel-wise multiply);
- a residual block's output (the add), ``pool`` and ``classifier`` (the logits).

With ``saturate_sigmoid_inputs``, a tensor that a sigmoid reads gets no range past the sigmoid's
saturation (``fakequant.sigmoid_saturation``): the SE gate's logits on both ends, a SiLU's input
on its lower end (it is also read by SiLU's product, which keeps every large positive value).
Past that bound the sigmoid's int8 output is the same whatever the input (and SiLU's product
multiplies it by zero), so clamping there loses nothing, and the grid inside gets finer: an
SE-gate logit range of [-917, 26] (a few images shut the gate hard) had a step of 3.6, four steps
across the whole interval where the gate is not saturated.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from effdeploy.model.blocks import ConvNormAct, MBConv, SqueezeExcite
from effdeploy.quant.fakequant import (
    ActQParams,
    act_qparams,
    fake_quant_act,
    fake_quant_act_learnable,
    fake_quant_act_ste,
    fake_quant_bias,
    fake_quant_weight,
    fixed_unit_qparams,
    mse_weight_clip,
    sigmoid_saturation,
    weight_scales,
)
from effdeploy.quant.fold import fold_batchnorm
from effdeploy.quant.observers import TensorStats, get_observer


class SiLUParts(nn.Module):
    """SiLU as the runtimes execute it, x * sigmoid(x), with the sigmoid as its own module so
    its int8 output can be quantized (and named)."""

    def __init__(self) -> None:
        super().__init__()
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(x)


FUSED_ACTS = (nn.ReLU, nn.ReLU6)
BIAS_MAX_STEPS = 2**24


@dataclass
class ActPoint:
    """One quantized activation tensor."""

    name: str
    kind: str  # input | conv | act | sigmoid | pool | mul | add | logits
    bits: int
    fixed: ActQParams | None = None  # sigmoid outputs: fixed [0, 1) range
    stats: TensorStats = field(default_factory=TensorStats)
    qparams: ActQParams | None = None
    # the widest range worth holding (a sigmoid's input: where the sigmoid saturates); None: any
    limit: tuple[float, float] | None = None

    def within_limit(self, lo: float, hi: float) -> tuple[float, float]:
        """[lo, hi] cut to ``limit`` (unchanged where the point has none)."""
        if self.limit is None:
            return lo, hi
        return max(lo, self.limit[0]), min(hi, self.limit[1])

    def set_range(self, lo: float, hi: float) -> None:
        """Quantize over [lo, hi] (within ``limit``): how every observer and pass sets a range."""
        self.qparams = act_qparams(*self.within_limit(lo, hi), self.bits)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The float tensor as far as its readers can tell values apart (clamped to ``limit``):
        what this point's SNR compares the quantized tensor with."""
        return x if self.limit is None else x.clamp(*self.limit)

    def to_dict(self) -> dict:
        qp = self.qparams
        return {
            "name": self.name,
            "kind": self.kind,
            "bits": self.bits,
            "limit": None if self.limit is None else list(self.limit),
            "observed": [self.stats.lo, self.stats.hi],
            "range": None if qp is None else [qp.lo, qp.hi],
            "scale": None if qp is None else qp.scale,
            "zero_point": None if qp is None else qp.zero_point,
        }


@dataclass
class WeightLayer:
    """One conv / linear layer whose weight is quantized per output channel."""

    name: str
    module: nn.Module
    bits: int
    float_weight: torch.Tensor
    scales: torch.Tensor | None = None
    kind: str = "conv"  # conv | depthwise | pointwise | linear
    # a rounding chosen by a pass (AdaRound): fake-quantized values on the same grid as `scales`;
    # None means round-to-nearest
    qweight: torch.Tensor | None = None
    float_bias: torch.Tensor | None = None
    # bias correction's shift, added to the bias in quantized mode only
    bias_delta: torch.Tensor | None = None
    # the activation point this layer reads: its scale times the weight scales is the bias grid
    input_point: str | None = None

    def quantized(self) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight
        return fake_quant_weight(self.float_weight, self.scales, self.bits)


def _act_points_for(prefix: str, act: nn.Module | None, conv_name: str, bits: int) -> list[tuple[str, str, str]]:
    """(module path, point name, kind) for a conv followed by ``act``."""
    if act is None:
        return [(conv_name, conv_name, "conv")]
    if isinstance(act, FUSED_ACTS):
        return [(f"{prefix}.act", f"{prefix}.act", "act")]
    if isinstance(act, SiLUParts):
        return [
            (conv_name, conv_name, "conv"),
            (f"{prefix}.act.sigmoid", f"{prefix}.act.sigmoid", "sigmoid"),
            (f"{prefix}.act", f"{prefix}.act", "act"),
        ]
    return [(conv_name, conv_name, "conv"), (f"{prefix}.act", f"{prefix}.act", "act")]


def resolve_bits(name: str, default: int, overrides: Iterable[tuple[str, int | None]]) -> int:
    """The last override whose regex matches ``name`` wins; None keeps the default."""
    bits = default
    for pattern, value in overrides:
        if value is not None and re.search(pattern, name):
            bits = value
    return bits


class QuantSim:
    """Fake-quant simulation of a trained EfficientNet. Typical use::

    sim = QuantSim(model, weight_bits=4, act_bits=8)
    sim.calibrate(batches, observer="mse")
    logits = sim(x)                 # quantized
    with sim.float_mode(): ...      # the same folded graph in float, for per-layer SNR
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        weight_bits: int = 8,
        act_bits: int = 8,
        weight_overrides: Iterable[tuple[str, int | None]] = (),
        act_overrides: Iterable[tuple[str, int | None]] = (),
        saturate_sigmoid_inputs: bool = False,
    ) -> None:
        self.config = model.config
        # channels-last: PyTorch's CPU depthwise and 1x1 convs are several times faster in it
        # (same values; only the summation order inside a kernel may differ)
        self.model = fold_batchnorm(model).to(memory_format=torch.channels_last)
        for m in list(self.model.modules()):
            for child_name, child in list(m.named_children()):
                if isinstance(child, nn.SiLU):
                    setattr(m, child_name, SiLUParts())
        weight_overrides, act_overrides = list(weight_overrides), list(act_overrides)
        self.points: dict[str, ActPoint] = {}
        self._hook_paths: dict[str, str] = {}  # module path -> point name
        # point -> (the sigmoid point that reads it, whether that sigmoid is its only reader)
        sigmoid_readers: dict[str, tuple[str, bool]] = {}
        self._add_point("input", "input", "input", resolve_bits("input", act_bits, act_overrides))
        for path, m in self.model.named_modules():
            if isinstance(m, ConvNormAct):
                act = getattr(m, "act", None)
                for mod_path, point, kind in _act_points_for(path, act, f"{path}.conv", 0):
                    self._add_point(mod_path, point, kind, resolve_bits(point, act_bits, act_overrides))
                if isinstance(act, SiLUParts):
                    sigmoid_readers[f"{path}.conv"] = (f"{path}.act.sigmoid", False)
            elif isinstance(m, SqueezeExcite):
                pool = f"{path}.pool"
                self._add_point(pool, pool, "pool", resolve_bits(pool, act_bits, act_overrides))
                for mod_path, point, kind in _act_points_for(path, m.act, f"{path}.reduce", 0):
                    self._add_point(mod_path, point, kind, resolve_bits(point, act_bits, act_overrides))
                for point, kind in ((f"{path}.expand", "conv"), (f"{path}.gate", "sigmoid"), (path, "mul")):
                    self._add_point(point, point, kind, resolve_bits(point, act_bits, act_overrides))
                if isinstance(m.act, SiLUParts):
                    sigmoid_readers[f"{path}.reduce"] = (f"{path}.act.sigmoid", False)
                if isinstance(m.gate, nn.Sigmoid):
                    sigmoid_readers[f"{path}.expand"] = (f"{path}.gate", True)
            elif isinstance(m, MBConv) and m.spec.has_residual:
                self._add_point(path, path, "add", resolve_bits(path, act_bits, act_overrides))
        self._add_point("pool", "pool", "pool", resolve_bits("pool", act_bits, act_overrides))
        self._add_point("classifier", "classifier", "logits", resolve_bits("classifier", act_bits, act_overrides))
        if saturate_sigmoid_inputs:
            for point, (sigmoid, only_reader) in sigmoid_readers.items():
                bound = sigmoid_saturation(self.points[sigmoid].bits)
                self.points[point].limit = (-bound, bound if only_reader else float("inf"))

        self.weights: dict[str, WeightLayer] = {}
        for path, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                kind = "linear" if isinstance(m, nn.Linear) else "conv"
                if isinstance(m, nn.Conv2d) and m.groups > 1:
                    kind = "depthwise"
                elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1):
                    kind = "pointwise"
                self.weights[path] = WeightLayer(
                    path,
                    m,
                    resolve_bits(path, weight_bits, weight_overrides),
                    m.weight.detach().clone(),
                    kind=kind,
                    float_bias=None if m.bias is None else m.bias.detach().clone(),
                )

        self.mode = "float"  # float | range | hist | quant
        self.quantize_acts = True
        self._capture: dict[str, torch.Tensor] | None = None
        # ranges being learned (passes.learn_ranges): point -> (lo, hi) tensors; while set, every
        # quantizer rounds straight-through so that gradients reach the ranges upstream
        self.learnable: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._handles = []
        self.attach_hooks()
        self._find_layer_inputs()

    def attach_hooks(self) -> None:
        """Install the quantizer hooks (done at construction)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        self._handles.append(self.model.stem.register_forward_pre_hook(self._input_hook))
        for mod_path, point in self._hook_paths.items():
            if mod_path != "input":
                self._handles.append(modules[mod_path].register_forward_hook(self._make_hook(point)))

    def detach_hooks(self) -> None:
        """Remove the quantizer hooks: the model is then the plain BN-folded graph (for export)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ structure
    @torch.no_grad()
    def _find_layer_inputs(self) -> None:
        """Which activation point each weight layer reads, found by running one image and matching
        storage: a conv inside ConvNormAct is watched at the block's input (before TF 'SAME'
        padding, which keeps the quantization), any other layer at its own input (the classifier's
        flatten is a view of ``pool``)."""
        modules = dict(self.model.named_modules())
        seen: dict[str, int] = {}
        handles = []
        for path in self.weights:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            watched = modules[parent] if isinstance(modules.get(parent), ConvNormAct) else modules[path]

            def pre(module, args, path=path):
                seen[path] = args[0].data_ptr()

            handles.append(watched.register_forward_pre_hook(pre))
        res = self.config.resolution
        prev_mode, self.mode, self._capture = self.mode, "float", {}
        try:
            self.model(torch.zeros(1, 3, res, res))
            ptr_to_point = {t.data_ptr(): name for name, t in self._capture.items()}
        finally:
            self.mode, self._capture = prev_mode, None
            for h in handles:
                h.remove()
        for path, w in self.weights.items():
            w.input_point = ptr_to_point.get(seen.get(path, -1))

    def _add_point(self, mod_path: str, name: str, kind: str, bits: int) -> None:
        fixed = fixed_unit_qparams(bits) if kind == "sigmoid" else None
        self.points[name] = ActPoint(name, kind, bits, fixed=fixed)
        self._hook_paths[mod_path] = name

    def _input_hook(self, module, args):
        return (self._observe("input", args[0]),)

    def _make_hook(self, point: str):
        def hook(module, args, output):
            return self._observe(point, output)

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p = self.points[name]
        if self.mode == "range":
            p.stats.update_range(x)
        elif self.mode == "hist":
            p.stats.update_hist(x)
        elif self.mode == "quant" and self.quantize_acts:
            qp = p.fixed or p.qparams
            if self.learnable is not None and name in self.learnable:
                x = fake_quant_act_learnable(x, *self.learnable[name], qp)
            elif self.learnable is not None and qp is not None:
                x = fake_quant_act_ste(x, qp)
            elif qp is not None:
                x = fake_quant_act(x, qp)
        if self._capture is not None:
            self._capture[name] = x.detach()
        return x

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor], observer: str = "minmax", weight_observer: str = "minmax") -> None:
        """Observe every activation over ``batches`` (float graph, float weights), then set ranges.

        Each point sees the float network's tensors; the weights are quantized afterwards.
        """
        self.set_weights(quantized=False)
        for p in self.points.values():
            p.stats = TensorStats()
        for mode in ("range", "hist"):
            self.mode = mode
            for x in batches:
                self.model(x)
        self.mode = "float"
        self.set_ranges(observer)
        self.set_weight_scales(weight_observer)
        self.mode = "quant"
        self.set_weights(quantized=True)

    def set_ranges(self, observer: str) -> None:
        fn = get_observer(observer)
        exact = get_observer("minmax")
        for p in self.points.values():
            if p.fixed is None:
                # "auto" never clips the input (its range is the pixel range, which min-max keeps
                # on a lossless grid) or the logits (their extremes are the predictions)
                use = exact if observer == "auto" and p.kind in ("input", "logits") else fn
                p.set_range(*use(p.stats, p.bits))
            else:
                p.qparams = p.fixed

    def set_weight_scales(self, weight_observer: str = "minmax") -> None:
        for w in self.weights.values():
            w.qweight = None
            w.bias_delta = None
            # "auto": min-max at 8 bits (the grid is fine enough), MSE-optimal clipping below
            use_mse = weight_observer == "mse" or (weight_observer == "auto" and w.bits < 8)
            clip = mse_weight_clip(w.float_weight, w.bits) if use_mse else None
            w.scales = weight_scales(w.float_weight, w.bits, clip)
            # a channel with (near-)zero weights but a bias (a constant output) would put that
            # bias out of int32 reach on the input x weight grid: floor its scale so the bias
            # needs at most 2^24 steps (its zero weights stay exactly zero)
            in_qp = self._input_qparams(w)
            if in_qp is not None and w.float_bias is not None:
                floor = w.float_bias.abs() / (in_qp.scale * BIAS_MAX_STEPS)
                w.scales = torch.maximum(w.scales, floor.to(w.scales.dtype))

    @torch.no_grad()
    def set_weights(self, quantized: bool) -> None:
        for w in self.weights.values():
            if quantized and w.scales is not None:
                w.module.weight.copy_(w.quantized())
            else:
                w.module.weight.copy_(w.float_weight)
            if w.float_bias is not None:
                delta = w.bias_delta if quantized and w.bias_delta is not None else 0.0
                bias = w.float_bias + delta
                in_qp = self._input_qparams(w) if quantized and w.scales is not None else None
                if in_qp is not None:
                    # int32 on the grid input scale x weight scale, as both runtimes store it
                    bias = fake_quant_bias(bias, in_qp.scale, w.scales)
                w.module.bias.copy_(bias)

    def _input_qparams(self, w: WeightLayer) -> ActQParams | None:
        if w.input_point is None:
            return None
        p = self.points[w.input_point]
        return p.fixed or p.qparams

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @contextlib.contextmanager
    def running(self, quantized: bool):
        """Run the quantized or the float network (weights and biases to match), then restore."""
        prev = self.mode
        self.mode = "quant" if quantized else "float"
        self.set_weights(quantized=quantized)
        try:
            yield
        finally:
            self.mode = prev
            self.set_weights(quantized=prev == "quant")

    @contextlib.contextmanager
    def float_activations(self):
        """Activations unquantized (weights as the mode says), then restored: what a float model
        of the grid-weight graph computes, or the weights' share of the error."""
        prev = self.quantize_acts
        self.quantize_acts = False
        try:
            yield
        finally:
            self.quantize_acts = prev

    @contextlib.contextmanager
    def plain_graph(self):
        """The BN-folded model with grid weights (and corrected biases) and no quantizer hooks:
        what the emitters hand to the exporters. Hooks, mode and weights are restored after."""
        prev = self.mode
        self.detach_hooks()
        self.set_weights(quantized=True)
        # the exporters trace strides too: the plain layout gives the plain graph
        self.model.to(memory_format=torch.contiguous_format)
        try:
            yield self.model.eval()
        finally:
            self.model.to(memory_format=torch.channels_last)
            self.attach_hooks()
            self.mode = prev
            self.set_weights(quantized=prev == "quant")

    @torch.no_grad()
    def run_capture(self, x: torch.Tensor, quantized: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and every quantization point's tensor, quantized or in float (same graph)."""
        self._capture = {}
        try:
            with self.running(quantized):
                out = self.model(x)
            return out, self._capture
        finally:
            self._capture = None

    def ranges(self) -> list[dict]:
        return [p.to_dict() for p in self.points.values()]

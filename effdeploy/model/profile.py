"""Analytic profiler: parameters and multiply-accumulates per layer kind, from the ArchSpec alone.

No forward pass and no torch: the counts follow from the stage table, which is why they can be
checked against the built model's ``numel()`` (tests do) and against the paper's FLOPs column.
MACs count convolutions and the classifier (the convention of the paper and of fvcore/ptflops);
pooling, activations and the SE channel-wise multiply are elementwise and listed separately.
The same count bounds what a config may build (``check_model_size``), before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from effdeploy.errors import EffdeployError
from effdeploy.model.arch import ArchSpec
from effdeploy.model.config import ModelConfig
from effdeploy.parsing import env_number

KINDS = ("stem", "expand", "depthwise", "se", "project", "head", "classifier")


@dataclass
class BlockProfile:
    name: str
    in_channels: int
    expand_channels: int
    out_channels: int
    kernel: int
    stride: int
    in_size: int  # spatial side at the block input
    out_size: int
    params: int
    macs: int
    # cost of depthwise + pointwise projection relative to a standard KxK conv Cexp -> Cout
    ds_ratio: float
    ds_ratio_formula: float  # the seed formula 1/C_out + 1/K^2


@dataclass
class Profile:
    variant: str
    se_placement: str
    resolution: int
    params: int
    macs: int
    elementwise: int  # SE multiplies + residual adds + pooling, not in `macs`
    per_kind: dict[str, dict[str, int]]
    blocks: list[BlockProfile] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _out(size: int, stride: int) -> int:
    # 'same'-style output size: both symmetric k//2 padding (odd k) and TF SAME give ceil(in / s)
    return math.ceil(size / stride)


def _conv(cin: int, cout: int, k: int, out_hw: int, groups: int = 1, bias: bool = False) -> tuple[int, int]:
    params = cout * (cin // groups) * k * k + (cout if bias else 0)
    macs = out_hw * cout * (cin // groups) * k * k
    return params, macs


def profile_arch(arch: ArchSpec, *, variant: str = "custom", se_placement: str = "after") -> Profile:
    per_kind = {k: {"params": 0, "macs": 0} for k in KINDS}
    elementwise = 0

    def add(kind: str, params: int, macs: int) -> tuple[int, int]:
        per_kind[kind]["params"] += params
        per_kind[kind]["macs"] += macs
        return params, macs

    norm = 2  # affine scale + shift per channel (BN or GN)
    size = _out(arch.resolution, 2)
    p, m = _conv(arch.in_channels, arch.stem_channels, 3, size * size)
    add("stem", p + norm * arch.stem_channels, m)

    blocks: list[BlockProfile] = []
    for b in arch.blocks:
        bp = bm = 0
        cin, cexp, cout, k = b.in_channels, b.expand_channels, b.out_channels, b.kernel
        out_size = _out(size, b.stride)
        if b.has_expand:
            p, m = _conv(cin, cexp, 1, size * size)
            p, m = add("expand", p + norm * cexp, m)
            bp, bm = bp + p, bm + m
        p, m = _conv(cexp, cexp, k, out_size * out_size, groups=cexp)
        p, m = add("depthwise", p + norm * cexp, m)
        bp, bm = bp + p, bm + m
        dw_macs = m
        if b.se_channels:
            p1, m1 = _conv(cexp, b.se_channels, 1, 1, bias=True)
            p2, m2 = _conv(b.se_channels, cexp, 1, 1, bias=True)
            p, m = add("se", p1 + p2, m1 + m2)
            bp, bm = bp + p, bm + m
            # the gate multiplies the tensor it is applied to (before or after the depthwise stride)
            gated = size if se_placement == "before" else out_size
            elementwise += gated * gated * cexp + size * size * cexp  # multiply + mean
        p, m = _conv(cexp, cout, 1, out_size * out_size)
        p, m = add("project", p + norm * cout, m)
        bp, bm = bp + p, bm + m
        standard = out_size * out_size * cexp * cout * k * k
        if b.has_residual:
            elementwise += out_size * out_size * cout
        blocks.append(
            BlockProfile(
                name=b.name,
                in_channels=cin,
                expand_channels=cexp,
                out_channels=cout,
                kernel=k,
                stride=b.stride,
                in_size=size,
                out_size=out_size,
                params=bp,
                macs=bm,
                ds_ratio=(dw_macs + m) / standard,
                ds_ratio_formula=1 / cout + 1 / k**2,
            )
        )
        size = out_size

    p, m = _conv(arch.blocks[-1].out_channels, arch.head_channels, 1, size * size)
    add("head", p + norm * arch.head_channels, m)
    elementwise += size * size * arch.head_channels  # global pool
    add("classifier", arch.head_channels * arch.num_classes + arch.num_classes, arch.head_channels * arch.num_classes)

    return Profile(
        variant=variant,
        se_placement=se_placement,
        resolution=arch.resolution,
        params=sum(v["params"] for v in per_kind.values()),
        macs=sum(v["macs"] for v in per_kind.values()),
        elementwise=elementwise,
        per_kind=per_kind,
        blocks=blocks,
    )


def profile_config(config: ModelConfig) -> Profile:
    return profile_arch(config.arch(), variant=config.variant, se_placement=config.se_placement)


MAX_PARAMS_ENV = "EFFDEPLOY_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 500_000_000  # 2 GB of float32 weights; B7 has 66 M


def max_params() -> int:
    value = env_number(MAX_PARAMS_ENV)
    return DEFAULT_MAX_PARAMS if value is None else int(value)


def check_model_size(model: ModelConfig, source: str) -> int:
    """The model's parameter count (analytic, nothing allocated), refused past ``max_params()``:
    a config that would exhaust memory is a one-line error, not an allocation that never returns."""
    params = profile_config(model).params
    limit = max_params()
    if params > limit:
        raise EffdeployError(
            f"{source}: the model has {params / 1e6:,.0f} M parameters, over the limit of {limit / 1e6:,.0f} M "
            f"(set {MAX_PARAMS_ENV} to allow more)"
        )
    return params

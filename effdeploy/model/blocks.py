"""Building blocks: ConvNormAct, SqueezeExcite, MBConv. One class per concept, variants by config.

SE placement is a field read by the one MBConv class:
  after  -- expand -> depthwise -> SE -> project   (the paper, torchvision, timm)
  before -- expand -> SE -> depthwise -> project   (gate computed from and applied to the
            expanded features; identical parameter shapes to `after`)
  none   -- expand -> depthwise -> project         (EfficientNet-Lite)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from effdeploy.model.arch import BlockSpec


def make_activation(name: str) -> nn.Module:
    if name == "silu":
        return nn.SiLU()
    if name == "relu6":
        return nn.ReLU6()
    if name == "hardswish":
        return nn.Hardswish()
    raise ValueError(f"activation: unknown {name!r}")


def make_norm(name: str, channels: int, eps: float, gn_groups: int) -> nn.Module:
    if name == "bn":
        return nn.BatchNorm2d(channels, eps=eps)
    if name == "gn":
        return nn.GroupNorm(math.gcd(gn_groups, channels), channels, eps=eps)
    raise ValueError(f"norm: unknown {name!r}")


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding for one spatial dim: the extra pixel goes at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> optional activation, the unit every EfficientNet layer uses.

    With ``same_padding`` a strided conv pads like TensorFlow's 'SAME' (asymmetric), which
    weights trained in TF need; stride-1 convs with odd kernels are symmetric either way.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        activation: str | None,
        norm: str = "bn",
        norm_eps: float = 1e-3,
        gn_groups: int = 8,
        same_padding: bool = False,
    ) -> None:
        self.tf_same = same_padding and stride > 1
        pad = 0 if self.tf_same else kernel // 2
        layers: dict[str, nn.Module] = {
            "conv": nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups, bias=False),
            "norm": make_norm(norm, out_ch, norm_eps, gn_groups),
        }
        if activation is not None:
            layers["act"] = make_activation(activation)
        super().__init__(*[])
        for name, module in layers.items():
            self.add_module(name, module)
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_same:
            ph = tf_same_padding(int(x.shape[-2]), self.kernel, self.stride)
            pw = tf_same_padding(int(x.shape[-1]), self.kernel, self.stride)
            x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return super().forward(x)


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 reduce -> act -> 1x1 expand -> sigmoid -> multiply.

    Each step is its own submodule (pool, reduce, act, expand, gate) so observers and
    per-layer SNR can name the SE path's tensors.
    """

    def __init__(self, channels: int, squeeze: int, activation: str) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = make_activation(activation)
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.reduce(self.pool(x)))
        return x * self.gate(self.expand(s))


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class MBConv(nn.Module):
    """Mobile inverted bottleneck (MobileNetV2) with squeeze-and-excitation at a configurable place.

    Submodules are registered in the fixed order expand, dwconv, se, project so that the state
    dict lists tensors in the same order as torchvision, timm and efficientnet_pytorch.
    """

    def __init__(
        self,
        spec: BlockSpec,
        *,
        se_placement: str,
        activation: str,
        norm: str = "bn",
        norm_eps: float = 1e-3,
        gn_groups: int = 8,
        same_padding: bool = False,
    ) -> None:
        super().__init__()
        if se_placement not in ("after", "before", "none"):
            raise ValueError(f"se_placement: unknown {se_placement!r}")
        if (se_placement == "none") != (spec.se_channels == 0):
            raise ValueError(f"{spec.name}: se_placement={se_placement!r} but se_channels={spec.se_channels}")
        self.spec = spec
        self.se_placement = se_placement
        cna = dict(norm=norm, norm_eps=norm_eps, gn_groups=gn_groups)
        cexp = spec.expand_channels
        self.expand = (
            ConvNormAct(spec.in_channels, cexp, 1, activation=activation, **cna) if spec.has_expand else nn.Identity()
        )
        self.dwconv = ConvNormAct(
            cexp,
            cexp,
            spec.kernel,
            stride=spec.stride,
            groups=cexp,
            activation=activation,
            same_padding=same_padding,
            **cna,
        )
        self.se = SqueezeExcite(cexp, spec.se_channels, activation) if spec.se_channels else nn.Identity()
        self.project = ConvNormAct(cexp, spec.out_channels, 1, activation=None, **cna)
        self.drop_path = DropPath(spec.drop_path) if spec.has_residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x)
        if self.se_placement == "before":
            h = self.se(h)
        h = self.dwconv(h)
        if self.se_placement == "after":
            h = self.se(h)
        h = self.project(h)
        if self.spec.has_residual:
            h = self.drop_path(h) + x
        return h

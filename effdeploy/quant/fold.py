"""Fold BatchNorm into the preceding convolution: what every int8 runtime executes.

W' = W * gamma / sqrt(var + eps) per output channel, b' = beta - mean * gamma / sqrt(var + eps).
The folded model computes the same function in eval mode (tests check this) and is what the
quantizer sees: its weights and biases are the ones that get quantized.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effdeploy.errors import EffdeployError
from effdeploy.model.blocks import ConvNormAct


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    std = torch.sqrt(bn.running_var + bn.eps)
    gain = bn.weight / std
    conv.weight.mul_(gain.reshape(-1, 1, 1, 1))
    bias = bn.bias - bn.running_mean * gain
    if conv.bias is not None:
        bias = bias + conv.bias * gain
    conv.bias = nn.Parameter(bias.clone())


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (eval mode) with every ConvNormAct's BN folded into its conv."""
    folded = copy.deepcopy(model).eval()
    for name, m in folded.named_modules():
        if isinstance(m, ConvNormAct):
            if isinstance(m.norm, nn.GroupNorm):
                raise EffdeployError(f"{name}: GroupNorm cannot be folded into a conv; quantize a BN model")
            if isinstance(m.norm, nn.BatchNorm2d):
                fold_conv_bn(m.conv, m.norm)
                m.norm = nn.Identity()
    return folded

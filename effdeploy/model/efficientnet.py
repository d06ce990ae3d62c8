"""EfficientNet(nn.Module): stem -> MBConv blocks -> head -> pool -> dropout -> classifier.

Built only from a `ModelConfig` (through its resolved `ArchSpec`), so a config is all that is
needed to rebuild a model. Parameter names are stable and readable and are the names every
report uses: ``stem.conv``, ``blocks.block2b.dwconv.conv``, ``blocks.block2b.se.reduce``,
``head.conv``, ``classifier``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from effdeploy.model.blocks import ConvNormAct, MBConv
from effdeploy.model.config import ModelConfig
from effdeploy.parsing import parse


class EfficientNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        arch = config.arch()
        self.arch = arch
        norm = dict(norm=config.norm, norm_eps=config.norm_eps, gn_groups=config.gn_groups)
        same = config.padding == "same"
        self.stem = ConvNormAct(
            arch.in_channels,
            arch.stem_channels,
            3,
            stride=2,
            activation=config.activation,
            same_padding=same,
            **norm,
        )
        self.blocks = nn.Sequential(
            OrderedDict(
                (
                    spec.name,
                    MBConv(
                        spec,
                        se_placement=config.se_placement,
                        activation=config.activation,
                        same_padding=same,
                        **norm,
                    ),
                )
                for spec in arch.blocks
            )
        )
        self.head = ConvNormAct(
            arch.blocks[-1].out_channels, arch.head_channels, 1, activation=config.activation, **norm
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(arch.head_channels, arch.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Fan-out Kaiming for convs (torchvision, timm), unit norms, uniform classifier.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # fan-in bound: torchvision's 1/sqrt(out_features) is tuned for 1000 classes and
                # gives 10-class heads logits with std ~3 at init (initial loss ~4 instead of ln 10)
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(config: ModelConfig | dict | str = "b0", **overrides) -> EfficientNet:
    """Build a model from a config, a dict of config fields, or a variant name (``"b0"``, ``"lite0"``).

    ``overrides`` are config fields (``se_placement="before"``, ``num_classes=10``). Overriding a
    concrete ModelConfig keeps its resolved widths; pass a dict or a name to re-derive them.
    """
    if isinstance(config, str):
        config = {"variant": config}
    elif isinstance(config, ModelConfig):
        if not overrides:
            return EfficientNet(config)
        config = config.model_dump()
    return EfficientNet(parse(ModelConfig, {**config, **overrides}, "model config"))

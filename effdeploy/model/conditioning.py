"""Well-conditioned random weights for checks that need no training (export fidelity on B1-B7).

With random init, every BatchNorm is the identity and activations shrink ~50x per stage, so a
random B0's logits are ~1e-13: an absolute error bound then passes whatever the exporter does, and
every SiLU and sigmoid runs in its linear region. Conditioning sets each BN from the input it sees
on real images so that activations, gates and logits have a trained network's scale.
"""

from __future__ import annotations

import torch


def condition_batchnorm_(model: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> torch.nn.Module:
    """Randomize every BatchNorm (running stats and affine) so that no BN is the identity, while
    keeping the network well conditioned: each BN's statistics come from the input it actually
    sees on ``images`` (one eval-mode pass, in order), with the variance inflated 16x (x0.75-1.25
    per channel) so its output has std ~0.25, a random per-channel mean offset, and gamma / beta
    drawn around 1 / 0. The classifier is scaled 10x so logits have a trained model's size."""
    g = torch.Generator().manual_seed(seed)

    def set_stats(bn: torch.nn.BatchNorm2d, args: tuple[torch.Tensor, ...]) -> None:
        (x,) = args
        n = bn.num_features
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        bn.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(n, generator=g))
        bn.running_var.copy_(16.0 * var * (0.75 + 0.5 * torch.rand(n, generator=g)))
        bn.weight.copy_(0.75 + 0.5 * torch.rand(n, generator=g))
        bn.bias.copy_(0.1 * torch.randn(n, generator=g))

    hooks = [m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not hooks:
        raise ValueError("model has no BatchNorm to condition")
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        model.classifier.weight.mul_(10.0)
    return model

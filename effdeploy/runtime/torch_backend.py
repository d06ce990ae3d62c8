"""PyTorch eager: the float reference every artifact is compared against."""

from __future__ import annotations

import copy

import numpy as np
import torch

from effdeploy.runtime.base import register


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, threads: int | None = None, channels_last: bool = True) -> None:
        # a module in eval mode, or any callable on float tensors (the quantization simulation)
        # a module runs as a channels-last copy (the caller's stays as it is): PyTorch's CPU
        # depthwise and 1x1 convs are several times faster in that layout. Export fidelity asks
        # for the plain layout: its reference is the model exactly as the exporters traced it.
        if isinstance(model, torch.nn.Module):
            layout = torch.channels_last if channels_last else torch.contiguous_format
            model = copy.deepcopy(model).to(memory_format=layout).eval()
        self.model = model
        if threads:
            torch.set_num_threads(threads)
        self.session_options = {
            "num_threads": torch.get_num_threads(),
            "mode": "eager",
            "dtype": "float32",
            "layout": "channels_last" if channels_last else "contiguous",
        }

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).float().numpy()


register("torch")(TorchBackend)

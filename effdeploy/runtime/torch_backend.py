"""PyTorch eager: the float reference every artifact is compared against."""

from __future__ import annotations

import numpy as np
import torch

from effdeploy.runtime.base import register


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, threads: int | None = None) -> None:
        # a module in eval mode, or any callable on float tensors (the quantization simulation)
        self.model = model.eval() if isinstance(model, torch.nn.Module) else model
        if threads:
            torch.set_num_threads(threads)
        self.session_options = {"num_threads": torch.get_num_threads(), "mode": "eager", "dtype": "float32"}

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))).float().numpy()


register("torch")(TorchBackend)

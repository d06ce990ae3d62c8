"""An EfficientNet-B0 checkpoint for latency benches where no trained B0 weights are at hand.

    python benchmarks/random_b0.py --out runs/imagenet_b0_random/model.safetensors   (make bench-b0)

Random weights (seed 0) with BatchNorm statistics measured on the ImageNet samples, so every
activation has the scale a trained network's would and a quantizer calibrates sane ranges. Its
latency is a trained B0's (the int8 graph does not depend on the weights); its top-1 is chance, and
its SNR says nothing about a trained B0's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from effdeploy.data.sources import load_images
from effdeploy.model.checkpoints import save_checkpoint
from effdeploy.model.efficientnet import build_model

IMAGES = Path("../shared/data/imagenet-samples")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=IMAGES, help="images whose statistics the BatchNorms take")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = build_model("b0")
    x = torch.from_numpy(load_images(args.images, model.config.preprocess).inputs(model.config.preprocess))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the passes below
    model.train()
    with torch.no_grad():
        for batch in x.split(25):
            model(batch)
    save_checkpoint(
        model.eval(), args.out, extra_metadata={"weights": "random (seed 0), BatchNorm statistics from images"}
    )
    print(f"{args.out}: EfficientNet-B0, random weights, BatchNorm statistics from {len(x)} images in {args.images}")


if __name__ == "__main__":
    main()

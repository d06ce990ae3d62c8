"""Where a quantized model's output error comes from: weights or activations, and which layers.

    python benchmarks/error_sources.py --config configs/imagenet_lite0.yaml --precision w8a8

Calibrates the simulation as `effdeploy quantize` does for "ours" at that precision (no AdaRound
or range search), then measures the output SNR with everything quantized, with only the weights,
with only the activations, and one layer's weights at a time (effdeploy.results.error_sources).
Writes benchmarks/results/error_sources_<name>_<precision>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effdeploy.config import load_run_config
from effdeploy.report import write_markdown
from effdeploy.results import error_sources


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/cifar10_b0w05_after.yaml"))
    ap.add_argument("--precision", default="w8a8")
    ap.add_argument("--images", type=int, default=256, help="held-out images for the SNRs")
    ap.add_argument("--layer-images", type=int, default=25, help="held-out images for the per-layer list")
    ap.add_argument("--rows", type=int, default=10, help="layers to list")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    run = load_run_config(args.config)
    result = error_sources.measure(run, args.precision, args.images, args.layer_images)
    command = (
        f"python benchmarks/error_sources.py --config {args.config} --precision {args.precision} --images {args.images}"
    )
    lines = error_sources.table(result, command, args.rows)
    write_markdown(args.out / f"error_sources_{run.name}_{args.precision}.md", lines)


if __name__ == "__main__":
    main()

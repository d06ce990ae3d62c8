"""Where the integer runtimes part from the simulation, tensor by tensor.

    python benchmarks/runtime_divergence.py --config configs/cifar10_b0w05_after.yaml

Calibrates the simulation (W8A8, observer ``auto``, no passes), emits its ONNX QDQ and TFLite
int8 models and compares every quantization point of onnxruntime and LiteRT with the simulation
on a few held-out images (effdeploy.results.runtime_divergence). Writes
benchmarks/results/runtime_divergence_<name>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effdeploy.config import load_run_config
from effdeploy.report import write_markdown
from effdeploy.results import runtime_divergence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/cifar10_b0w05_after.yaml"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--rows", type=int, default=24, help="points to list (network order)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    run = load_run_config(args.config)
    result = runtime_divergence.measure(run, args.images, args.calibration_images, args.rows)
    command = f"python benchmarks/runtime_divergence.py --config {args.config} --images {args.images}"
    write_markdown(args.out / f"runtime_divergence_{run.name}.md", runtime_divergence.table(result, command))


if __name__ == "__main__":
    main()

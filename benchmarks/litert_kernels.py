"""Are LiteRT's integer kernels exact? Each 1x1 CONV_2D and FULLY_CONNECTED of a full-integer
TFLite model, recomputed in exact integer arithmetic from the int8 input LiteRT itself fed it.

    python benchmarks/litert_kernels.py artifacts/cifar10_b0w05_after/model_w8a8.tflite \\
        artifacts/cifar10_b0w05_after/model_w4a8.tflite --config configs/cifar10_b0w05_after.yaml

Every op starts from LiteRT's own input, so a difference is that kernel's, not inherited
(effdeploy.results.litert_kernels). Writes benchmarks/results/litert_kernels_<config name>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from effdeploy.config import load_run_config
from effdeploy.report import write_markdown
from effdeploy.results import litert_kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="full-integer .tflite files")
    ap.add_argument("--config", type=Path, default=Path("configs/cifar10_b0w05_after.yaml"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    run = load_run_config(args.config)
    for m in args.models:
        if not m.is_file():
            raise SystemExit(f"error: {m}: no such TFLite model (run 'make quantize' first)")
    x, source = litert_kernels.held_out_nhwc(run, args.images, args.config)
    command = (
        f"python benchmarks/litert_kernels.py {' '.join(str(m) for m in args.models)} "
        f"--config {args.config} --images {args.images}"
    )
    lines = litert_kernels.table(run.name, args.models, x, source, command)
    write_markdown(args.out / f"litert_kernels_{run.name}.md", lines)


if __name__ == "__main__":
    main()

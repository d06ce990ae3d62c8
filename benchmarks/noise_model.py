"""Predicted against measured SNR after every MBConv block of the quantized reference models.

    python benchmarks/noise_model.py

For each config (default: the four CIFAR-10 reference models), the noise-propagation model
(effdeploy.quant.noise_propagation) predicts the SNR after every block at W8A8 and W4A8 for the
min-max and ours grids of the stored quantize reports, and compares with their measured
block_snr_db; then it extrapolates over the B0..B7 depth coefficients and 8/6/4-bit weights and
activations (effdeploy.results.noise_model). Writes <out>.md, <out>.json and <out>.png; with
--render, only the tables and the plot again, from <out>.json. One thread, about 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from effdeploy.fileio import atomic_write_text, json_safe
from effdeploy.report import write_markdown
from effdeploy.results import noise_model

DEFAULT_CONFIGS = [Path(f"configs/{name}.yaml") for name in noise_model.REFERENCE]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, action="append", help="a reference model's config (repeatable)")
    ap.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"), help="the stored reports")
    ap.add_argument("--calibration-images", type=int, default=256)
    ap.add_argument("--gain-images", type=int, default=None, help="images for the gains (default: all)")
    ap.add_argument("--no-extrapolation", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/noise_model"))
    ap.add_argument("--render", action="store_true", help="only render <out>.json again (tables, plot)")
    args = ap.parse_args()

    if args.render:
        result = noise_model.derive(json.loads(args.out.with_suffix(".json").read_text()))
        command = result["command"]
    else:
        result = noise_model.evaluate(
            args.config or DEFAULT_CONFIGS,
            args.results_dir,
            calibration_images=args.calibration_images,
            gain_images=args.gain_images,
            extrapolate=not args.no_extrapolation,
        )
        command = shlex.join(["python", "benchmarks/noise_model.py", *sys.argv[1:]])
        result["command"] = command
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(json_safe(result), indent=1))
    noise_model.plot(result, args.out.with_suffix(".png"))
    write_markdown(args.out.with_suffix(".md"), noise_model.markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

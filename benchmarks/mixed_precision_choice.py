"""Mixed precision for the smallest model within a point of float, chosen on the validation split.

    python benchmarks/mixed_precision_choice.py --config configs/cifar10_b0w05_before.yaml --bits 4.25 4.5 5

The per-layer weight widths come from the mixed-precision search (effdeploy.quant.mixed_precision,
as ``effdeploy quantize --budget bits=B`` chooses them), run on the calibration images alone. Each
budget's choice is put on the config's W4A8 recipe as overrides for the layers wider than 4 bits
and measured on the validation split by benchmarks/validation_split.py, which appends its row to
benchmarks/results/validation_<name>.md. The candidates, their widths and sizes (beside W8A8 and
W4A8) go to benchmarks/results/mixed_precision_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from effdeploy.config import load_run_config
from effdeploy.fileio import atomic_write_text
from effdeploy.quant.mixed_precision import Budget, choose, search, wider_than


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--bits", type=float, nargs="+", required=True, help="mean weight-bit budgets to measure")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--dry-run", action="store_true", help="search and print the commands only")
    args = ap.parse_args()

    run = load_run_config(args.config)
    # no labelled test images in the search: its curve then rests on the calibration images only
    blind = run.model_copy(
        update={
            "data": run.data.model_copy(update={"test": None}),
            "quant": run.quant.model_copy(update={"eval_data": None}),
        }
    )
    result = search(blind, Budget.parse(f"bits={min(args.bits)}"), precision="w8a8")
    w8a8, w4a8 = result.curve[0], min(result.curve, key=lambda p: p.size_bytes)
    rows = []
    for b in args.bits:
        point = choose(result.curve, Budget.parse(f"bits={b}"))
        overrides = wider_than(point, base_bits=4)
        rows.append(
            {
                "budget_bits": b,
                "step": point.step,
                "mean_bits": point.mean_bits,
                "size_bytes": point.size_bytes,
                "size_vs_w8a8": point.size_bytes / w8a8.size_bytes,
                "calibration_snr_db": point.snr_db,
                "layers_wider_than_4": sum(v > 4 for v in point.bits.values()),
                "overrides": overrides,
            }
        )
        print(
            f"bits={b}: {point.size_bytes:,} bytes ({point.mean_bits:.2f} mean bits, "
            f"{point.size_bytes / w8a8.size_bytes:.2f} of W8A8), {rows[-1]['layers_wider_than_4']} layers above 4 bits"
        )
    summary = {
        "config": str(args.config),
        "w8a8_bytes": w8a8.size_bytes,
        "w4a8_bytes": w4a8.size_bytes,
        "candidates": rows,
        "search": result.to_dict(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / f"mixed_precision_{run.name}.json", json.dumps(summary, indent=2) + "\n")
    for row in rows:
        cmd = [
            sys.executable,
            "benchmarks/validation_split.py",
            "--config",
            str(args.config),
            "--precision",
            "w4a8",
            "--images",
            str(args.images),
            "--set",
            "overrides=" + json.dumps(row["overrides"]),
        ]
        print(" ".join(cmd[1:6]), f"--set overrides=<{row['layers_wider_than_4']} layers>")
        if not args.dry_run:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()

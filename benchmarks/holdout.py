"""Our quantization measured on images it was not calibrated on, by k-fold cross-validation of
the calibration set itself.

    python benchmarks/holdout.py --config configs/imagenet_lite0.yaml --precisions w8a8 w4a8

Where the calibration images are the only real images on the machine, `effdeploy quantize`
measures on them, and a pass that learns from data looks better there than it will elsewhere.
The set is cut into ``--folds`` folds, each quantized from the others and measured on its own
images (effdeploy.results.holdout). Writes benchmarks/results/holdout_<name>_<precisions>.md
and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effdeploy.config import load_run_config
from effdeploy.fileio import atomic_write_text
from effdeploy.report import json_safe, write_markdown
from effdeploy.results import holdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/imagenet_lite0.yaml"))
    ap.add_argument("--precisions", nargs="+", default=None, help="default: the config's")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    run = load_run_config(args.config)
    precisions = list(args.precisions or run.quant.precisions)
    report = holdout.cross_validate(run, precisions, args.folds, args.seed, log=lambda m: print(m, flush=True))
    cmd = f"python benchmarks/holdout.py --config {args.config} --precisions {' '.join(precisions)}"
    if args.folds != 2 or args.seed != 0:
        cmd += f" --folds {args.folds} --seed {args.seed}"
    stem = f"holdout_{run.name}_{'_'.join(precisions)}"
    write_markdown(args.out / f"{stem}.md", holdout.table(report, cmd))
    atomic_write_text(args.out / f"{stem}.json", json.dumps(json_safe(report), indent=2))


if __name__ == "__main__":
    main()

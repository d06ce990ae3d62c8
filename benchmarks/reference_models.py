"""Test-split accuracy and learning curves of the CIFAR-10 reference models.

    python benchmarks/reference_models.py --models-dir models --out benchmarks/results/reference_models

Writes <out>.json (every number), <out>.md (the README table) and <out>.png (validation top-1
per epoch). Test accuracy is measured here, on ../shared/data/cifar10/test, by the committed
checkpoints loaded from file alone (effdeploy.results.reference_models); nothing was tuned on
that split.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from effdeploy.fileio import atomic_write_text
from effdeploy.results import reference_models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reference_models"))
    args = ap.parse_args()

    rows = reference_models.evaluate(args.models_dir)
    result = {
        "command": " ".join(sys.argv),
        "machine": {"processor": platform.processor(), "python": platform.python_version()},
        "models": rows,
    }
    out = args.out
    table = reference_models.markdown(rows)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), table)
    reference_models.plot(rows, out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())

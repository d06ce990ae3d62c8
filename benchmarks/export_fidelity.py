"""Export fidelity across the EfficientNet family: ONNX and TFLite against PyTorch, on real images.

    python benchmarks/export_fidelity.py --models b0 b1 b2 b3 b4 b5 b6 b7 --images 8 \\
        --out benchmarks/results/export_fidelity [--configs configs/*.yaml]

For each family member (random init, seed 0, its native resolution) ``effdeploy export`` runs into
a temporary directory with the ImageNet sample photos as fidelity data; the artifacts are deleted
once measured. ``--configs`` adds the trained reference models (checkpoint and fidelity data from
each config; a config whose checkpoint does not exist yet is listed as skipped). Writes
``<out>.json`` (every number, tool versions, command line, machine) and ``<out>.md`` (tables).
``--weights conditioned`` gives the family realistic activations, ``--float64-floor`` adds float32
PyTorch's own distance from float64; how to read the numbers: effdeploy.results.fidelity.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_write_text
from effdeploy.report import json_safe
from effdeploy.results import fidelity

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "imagenet-samples"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["b0"], help="family members (b0..b7, lite0..lite4)")
    ap.add_argument("--configs", nargs="*", default=[], type=Path, help="run configs of trained models")
    ap.add_argument("--images", type=int, default=8, help="fidelity images per model")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="images for the family members")
    ap.add_argument("--formats", default="onnx,tflite", help="comma list: onnx,tflite")
    ap.add_argument(
        "--weights",
        choices=("init", "conditioned"),
        default="init",
        help="family members: plain random init (seed 0), or with data-conditioned BatchNorm",
    )
    ap.add_argument(
        "--float64-floor", action="store_true", help="also measure float32 PyTorch vs float64 (slow for big models)"
    )
    ap.add_argument("--threads", type=int, default=None, help="runtime threads while measuring (default: all)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary artifacts go")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_fidelity"))
    args = ap.parse_args(argv)
    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except EffdeployError as err:
        print(f"export_fidelity: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = fidelity.fidelity_report(
        args.models,
        args.configs,
        images=args.images,
        data=args.data,
        formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
        weights=args.weights,
        threads=args.threads,
        workdir=args.workdir,
        floor=args.float64_floor,
        command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/export_fidelity.py", *argv]),
        log=lambda msg: print(msg, flush=True),
    )
    json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
    atomic_write_text(json_path, json.dumps(json_safe(report), indent=2) + "\n")
    atomic_write_text(md_path, fidelity.markdown(report))
    print(f"wrote {json_path} and {md_path}", flush=True)
    return 0 if all(r.get("pass") is not False for r in report["models"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

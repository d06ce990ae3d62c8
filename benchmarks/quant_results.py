"""Collect `effdeploy quantize` reports into benchmarks/results: one JSON + PNG per model (as
written by the run) and one Markdown summary table of ours, the baseline and the peers.

    python benchmarks/quant_results.py artifacts/cifar10_b0w05_after artifacts/cifar10_b0w05_before ...

Every number comes from the report.json files named; nothing is typed in by hand. The tables:
effdeploy.results.quant_summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from effdeploy.fileio import atomic_write_text
from effdeploy.results import quant_summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="quantize output directories (with report.json)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--summary", default="quant_summary.md")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    reports = [json.loads((run / "report.json").read_text()) for run in args.runs]
    names = quant_summary.file_names(reports)
    for run, name in zip(args.runs, names, strict=True):
        shutil.copyfile(run / "report.json", args.out / f"quant_{name}.json")
        if (run / "snr_per_block.png").exists():
            shutil.copyfile(run / "snr_per_block.png", args.out / f"quant_{name}.png")
    command = "python benchmarks/quant_results.py " + " ".join(str(r) for r in args.runs)
    atomic_write_text(args.out / args.summary, quant_summary.summary_markdown(command, reports, names))
    print("\n".join(quant_summary.headline_table(reports)))
    print(f"wrote {args.out / args.summary}")


if __name__ == "__main__":
    main()

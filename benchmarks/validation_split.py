"""Choose a quantization knob on the validation split, never on the test images.

    python benchmarks/validation_split.py --config configs/cifar10_b0w05_before.yaml --precision w8a8 \\
        --set learn_ranges=false

Runs "ours" as `effdeploy quantize` would with the config (with any ``--set key=value`` changes:
the candidate being judged) and measures it on ``--images`` images of the validation split,
calibration images removed (effdeploy.results.validation). Each run appends one row to
benchmarks/results/validation_<name>.jsonl and rewrites the Markdown table of all rows, so that
every knob a config sets has its comparison in the repo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effdeploy.config import load_run_config, parse_precision
from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_write_text
from effdeploy.report import write_markdown
from effdeploy.results import validation


def _value(text: str):
    """``--set`` values: JSON where it parses (true, 300, "x"), the bare string otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--precision", default="w8a8")
    ap.add_argument(
        "--set",
        dest="changes",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one key of the config's quant section (repeatable)",
    )
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    run = load_run_config(args.config)
    changes = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        changes[key] = _value(value)
    try:
        run = validation.candidate(run, changes, f"{args.config} with --set")
        parse_precision(args.precision)
    except EffdeployError as err:
        raise SystemExit(f"error: {err}") from None
    row, dropped = validation.evaluate(run, args.precision, changes, args.images, args.seed)
    print(
        f"{run.name} {args.precision} {changes or '(config as is)'}: float {100 * row['float_top1']:.2f}%, "
        f"quantized {100 * row['top1']:.2f}%, agreement {100 * row['agreement']:.2f}%, "
        f"SNR {row['output_snr_db']:.2f} dB ({row['seconds']:.0f} s)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / f"validation_{run.name}.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    rows.append(row)
    atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in rows))
    command = f"python benchmarks/validation_split.py --config {args.config} --precision P [--set KEY=VALUE]"
    write_markdown(args.out / f"validation_{run.name}.md", validation.table(rows, run.name, command, dropped))


if __name__ == "__main__":
    main()

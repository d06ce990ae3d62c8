"""Choose a quantization knob on the validation split, never on the test images.

    python benchmarks/validation_split.py --config configs/cifar10_b0w05_before.yaml --precision w8a8 \\
        --set range_search_objective=relative

Runs "ours" exactly as `effdeploy quantize` would with the config (its quant section, with any
``--set key=value`` changes: the candidate being judged), calibrated on the config's calibration
set, and measures it on ``--images`` images of the validation split that `effdeploy train` held
out of the training folder (``data.val_fraction``, ``data.split_seed``), minus any image that is
also a calibration image. The test folder, on which the targets are reported, is never read.
Each run appends one row to benchmarks/results/validation_<name>.jsonl and rewrites the
Markdown table of all rows, so that every knob a config sets has its comparison in the repo.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


def _value(text: str):
    """``--set`` values: JSON where it parses (true, 300, "x"), the bare string otherwise."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def validation_images(run, n: int, seed: int = 0):
    """Up to ``n`` validation-split images (pixels' model inputs and labels), none of them a
    calibration image, drawn with ``seed``."""
    from effdeploy.data.calibration import load_calibration_set
    from effdeploy.train.trainer import load_split

    _, val = load_split(run)
    cal = load_calibration_set(run.quant.calibration)
    cal_files = set(cal.provenance.get("files", ()))
    keep = np.arange(len(val))
    if val.source is not None and cal_files:
        rel = [f.relative_to(val.source.root).as_posix() for f in val.source.files]
        keep = np.array([i for i, r in enumerate(rel) if r not in cal_files])
    idx = np.random.default_rng(seed).permutation(keep)[:n]
    return val.inputs(run.model.preprocess, idx), val.labels[idx], len(keep) < len(val)


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

    from effdeploy.config import QuantConfig, load_run_config, parse, parse_precision
    from effdeploy.data.calibration import load_calibration_set
    from effdeploy.errors import EffdeployError
    from effdeploy.fileio import atomic_write_text
    from effdeploy.metrics import snr_db, top1_agreement, topk_accuracy
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.quant import pipeline
    from effdeploy.report import method_label, write_markdown

    run = load_run_config(args.config)
    changes = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        changes[key] = _value(value)
    try:
        q = parse(QuantConfig, {**run.quant.model_dump(), **changes}, f"{args.config} with --set")
        parse_precision(args.precision)
    except EffdeployError as err:
        raise SystemExit(f"error: {err}") from None
    run = run.model_copy(update={"quant": q})
    model = load_checkpoint(run.checkpoint).eval()
    pre = model.config.preprocess
    x, labels, dropped = validation_images(run, args.images, args.seed)
    x = torch.from_numpy(x)
    cal = load_calibration_set(q.calibration).as_dataset().inputs(pre)[: q.calibration_images]
    batches = [torch.from_numpy(cal[i : i + 64]) for i in range(0, len(cal), 64)]
    method = next(m for m in pipeline.methods_for(run, args.precision) if m.name == "ours")
    t0 = time.perf_counter()
    sim, _, _ = pipeline.calibrated_sim(model, q, method, args.precision, batches)
    with sim.running(False):
        ref = torch.cat([sim(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
    with sim.running(True):
        out = torch.cat([sim(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()
    row = {
        "precision": args.precision,
        "changes": changes,
        "method": asdict(method),
        "bias_correction": method.bias_correction,
        "images": len(labels),
        "seed": args.seed,
        "float_top1": topk_accuracy(ref, labels, 1),
        "top1": topk_accuracy(out, labels, 1),
        "agreement": top1_agreement(ref, out),
        "output_snr_db": snr_db(ref, out),
        "seconds": round(time.perf_counter() - t0, 1),
    }
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
    lines = [
        f"# Validation-split checks: {run.name}",
        "",
        f"Generated by `python benchmarks/validation_split.py --config {args.config} --precision P [--set KEY=VALUE]`,",
        "one row per run. Images of the validation split `effdeploy train` held out of the training folder"
        + (", calibration images removed" if dropped else "")
        + "; never the test images. SNR in dB against the float network.",
        "",
        "| precision | --set | method | bias correction | images | float top-1 | top-1 | Δ | agreement | output SNR |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        passes = (
            "AdaRound" + (" (balanced)" if r["method"].get("adaround_balance") else "")
            if r["method"]["adaround"]
            else ""
        )
        label = method_label(r["method"]) + (f", {passes}" if passes else "")
        sets = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "(config)"
        lines.append(
            f"| {r['precision']} | {sets} | {label} | {'yes' if r['bias_correction'] else 'no'} | {r['images']} | "
            f"{100 * r['float_top1']:.2f}% | {100 * r['top1']:.2f}% | {100 * (r['top1'] - r['float_top1']):+.2f} | "
            f"{100 * r['agreement']:.2f}% | {r['output_snr_db']:.2f} dB |"
        )
    write_markdown(args.out / f"validation_{run.name}.md", lines)


if __name__ == "__main__":
    main()

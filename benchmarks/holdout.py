"""Our quantization measured on images it was not calibrated on, by k-fold cross-validation of
the calibration set itself.

    python benchmarks/holdout.py --config configs/imagenet_lite0.yaml --precisions w8a8 w4a8

Why: where the calibration images are the only real images on the machine (Lite0: the 100
ImageNet samples), `effdeploy quantize` measures on the calibration images themselves, and a
pass that learns from data (AdaRound above all: 8-bit AdaRound on Lite0 gives 32 dB on its own
calibration images) looks better there than it will on other images. Here the set is cut into
``--folds`` folds; each fold is quantized from the other folds ("ours", exactly as the config
runs it, and the min-max baseline) and measured on its own images; the logits of all folds are
pooled into one top-1, agreement and SNR. Writes benchmarks/results/holdout_<name>_<precisions>.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


def folds_of(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index sets covering ``range(n)``, shuffled with ``seed``."""
    if not 2 <= k <= n:
        raise ValueError(f"--folds must be between 2 and the number of images ({n}), got {k}")
    return list(np.array_split(np.random.default_rng(seed).permutation(n), k))


def _passes(method: dict) -> str:
    done = [n for key, n in (("adaround", "AdaRound"), ("bias_correction", "bias correction")) if method.get(key)]
    return f": {', '.join(done)}" if done and method["name"] == "ours" else ""


def cross_validate(run, precisions: list[str], folds: int, seed: int, *, log=print) -> dict:
    """Pooled out-of-fold logits of "ours" and min-max at each precision (see the module doc)."""
    from effdeploy.data.sources import load_images
    from effdeploy.metrics import snr_db, top1_agreement, topk_accuracy
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.quant import pipeline

    q = run.quant
    model = load_checkpoint(run.checkpoint).eval()
    pre = model.config.preprocess
    data = load_images(q.calibration, pre, n=q.calibration_images)
    x, labels = torch.from_numpy(data.inputs(pre)), data.labels
    parts = folds_of(len(labels), folds, seed)
    with torch.inference_mode():
        ref = torch.cat([model(x[i : i + 50]) for i in range(0, len(x), 50)]).numpy()
    rows = []
    for precision in precisions:
        for method in pipeline.methods_for(run, precision):
            t0 = time.perf_counter()
            out = np.zeros_like(ref)
            for i, held in enumerate(parts):
                cal = np.setdiff1d(np.arange(len(x)), held)
                batches = [x[cal[j : j + 64]] for j in range(0, len(cal), 64)]
                sim, _, _ = pipeline.calibrated_sim(model, q, method, precision, batches)
                with sim.running(True):
                    out[held] = sim(x[held]).numpy()
                log(f"{precision} {method.name}: fold {i + 1}/{len(parts)} done")
            r = {
                "precision": precision,
                "method": asdict(method),
                "top1": topk_accuracy(out, labels, 1),
                "agreement": top1_agreement(ref, out),
                "output_snr_db": snr_db(ref, out),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(r)
            log(
                f"{precision} {method.name}: top-1 {100 * r['top1']:.2f}%, agreement {100 * r['agreement']:.2f}%, "
                f"SNR {r['output_snr_db']:.2f} dB"
            )
    return {
        "name": run.name,
        "images": len(labels),
        "calibration": str(q.calibration),
        "folds": folds,
        "seed": seed,
        "float_top1": topk_accuracy(ref, labels, 1),
        "config": json.loads(q.model_dump_json()),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/imagenet_lite0.yaml"))
    ap.add_argument("--precisions", nargs="+", default=None, help="default: the config's")
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    from effdeploy.config import load_run_config
    from effdeploy.fileio import atomic_write_text
    from effdeploy.report import json_safe, method_label, wider_layers, write_markdown

    run = load_run_config(args.config)
    precisions = list(args.precisions or run.quant.precisions)
    report = cross_validate(run, precisions, args.folds, args.seed, log=lambda m: print(m, flush=True))
    float_top1 = report["float_top1"]
    cmd = f"python benchmarks/holdout.py --config {args.config} --precisions {' '.join(precisions)}"
    if args.folds != 2 or args.seed != 0:
        cmd += f" --folds {args.folds} --seed {args.seed}"
    lines = [
        f"# Held-out check: {run.name}",
        "",
        f"Generated by `{cmd}`.",
        f"{report['images']} images from {report['calibration']}, cut into {args.folds} folds (seed {args.seed}); "
        f"each fold is quantized from the other {args.folds - 1} and measured on its own images, so no image "
        f"is measured by a quantization that saw it. Float top-1 {100 * float_top1:.2f}%. SNR in dB against "
        "the float network, pooled over all folds.",
        "",
        "| precision | method | top-1 | Δ top-1 | agreement with float | output SNR |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        wider = wider_layers(report["config"], r["precision"])
        name = {"name": "min-max, nearest"} if r["method"]["name"] == "minmax" else r["method"]
        label = method_label(name, wider) + _passes(r["method"])
        lines.append(
            f"| {r['precision']} | {label} | {100 * r['top1']:.2f}% | {100 * (r['top1'] - float_top1):+.2f} | "
            f"{100 * r['agreement']:.2f}% | {r['output_snr_db']:.2f} dB |"
        )
    stem = f"holdout_{run.name}_{'_'.join(precisions)}"
    write_markdown(args.out / f"{stem}.md", lines)
    atomic_write_text(args.out / f"{stem}.json", json.dumps(json_safe(report), indent=2))


if __name__ == "__main__":
    main()

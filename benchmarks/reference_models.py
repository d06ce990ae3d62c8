"""Test-split accuracy and learning curves of the CIFAR-10 reference models.

    python benchmarks/reference_models.py --models-dir models --out benchmarks/results/reference_models

Writes <out>.json (every number), <out>.md (the README table) and <out>.png (validation top-1
per epoch). Test accuracy is measured here, on ../shared/data/cifar10/test, by the committed
checkpoints loaded from file alone; nothing was tuned on that split.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from effdeploy.config import load_run_config
from effdeploy.data.datasets import load_pixels
from effdeploy.fileio import atomic_path, atomic_write_text
from effdeploy.metrics import topk_accuracy
from effdeploy.model.checkpoints import load_checkpoint
from effdeploy.train.trainer import predict_pixels

MODELS = {
    "cifar10_b0w05_after": "SE after (from scratch)",
    "cifar10_b0w05_before": "SE before (from scratch)",
    "cifar10_b0w05_none": "no SE (from scratch)",
    "cifar10_b0w05_before_reorder": "SE before (reordered from after + distillation)",
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reference_models"))
    args = ap.parse_args()

    rows = []
    test_cache: dict[str, object] = {}
    for name, label in MODELS.items():
        ckpt = args.models_dir / name / "model.safetensors"
        if not ckpt.is_file():
            print(f"skip {name}: {ckpt} not found", file=sys.stderr)
            continue
        run = load_run_config(Path("configs") / f"{name}.yaml")
        model = load_checkpoint(ckpt)
        key = str(run.data.test)
        if key not in test_cache:
            test_cache[key] = load_pixels(run.data.test, model.config.preprocess)
        test = test_cache[key]
        t0 = time.perf_counter()
        logits = predict_pixels(model, test.pixels)
        history = read_jsonl(args.models_dir / name / "metrics.jsonl")
        reorder = args.models_dir / name / "reorder.json"
        row = {
            "name": name,
            "label": label,
            "checkpoint": str(ckpt),
            "checkpoint_bytes": ckpt.stat().st_size,
            "se_placement": model.config.se_placement,
            "params": sum(p.numel() for p in model.parameters()),
            "test_images": len(test),
            "test_top1": topk_accuracy(logits, test.labels, 1),
            "test_top5": topk_accuracy(logits, test.labels, 5),
            "eval_seconds": round(time.perf_counter() - t0, 1),
            "epochs": len(history),
            "train_minutes": round(sum(h["epoch_seconds"] for h in history) / 60, 1) if history else None,
            "final_val_top1": history[-1]["val_top1"] if history else None,
            "history": history,
        }
        if reorder.is_file():
            rep = json.loads(reorder.read_text())
            row["reorder"] = {k: v for k, v in rep.items() if k != "distill_history"}
        rows.append(row)
        print(f"{name}: test top-1 {100 * row['test_top1']:.2f}%", file=sys.stderr)

    result = {
        "command": " ".join(sys.argv),
        "machine": {"processor": platform.processor(), "python": platform.python_version()},
        "models": rows,
    }
    out = args.out
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2))
    atomic_write_text(out.with_suffix(".md"), markdown(rows))
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | SE | params | epochs | train time | final val top-1 | test top-1 | test top-5 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tm = f"{r['train_minutes']} min" if r["train_minutes"] is not None else "-"
        lines.append(
            f"| {r['label']} | {r['se_placement']} | {r['params']:,} | {r['epochs'] or '-'} | {tm} | "
            f"{_pct(r['final_val_top1'])} | **{_pct(r['test_top1'])}** | {_pct(r['test_top5'])} |"
        )
    reorders = [r for r in rows if "reorder" in r]
    if reorders:
        lines += [
            "",
            "| reordered model | val top-1 of source | right after transplant | after distillation | steps |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in reorders:
            rep = r["reorder"]
            lines.append(
                f"| {rep['from']} -> {rep['to']} | {_pct(rep['source_val_top1'])} | "
                f"{_pct(rep['transplant_val_top1'])} | {_pct(rep['distilled_val_top1'])} | {rep['distill_steps']} |"
            )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in rows:
        h = r["history"]
        if h:
            ax.plot([e["epoch"] for e in h], [100 * e["val_top1"] for e in h], marker=".", label=r["label"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("CIFAR-10 reference models (B0 depth, width 0.5, 32 px)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    raise SystemExit(main())

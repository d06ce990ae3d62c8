"""Test-split accuracy and learning curves of the CIFAR-10 reference models.

Test accuracy is measured by the committed checkpoints loaded from file alone, on the config's
test folder; nothing was tuned on that split, so these are the numbers the README may quote.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from effdeploy.fileio import atomic_path

MODELS = {
    "cifar10_b0w05_after": "SE after (from scratch)",
    "cifar10_b0w05_before": "SE before (from scratch)",
    "cifar10_b0w05_none": "no SE (from scratch)",
    "cifar10_b0w05_before_reorder": "SE before (reordered from after + distillation)",
}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def evaluate(
    models_dir: Path, configs_dir: Path = Path("configs"), *, log: Callable[[str], None] = _stderr
) -> list[dict]:
    """One row per model of ``MODELS`` found in ``models_dir``: test top-1/top-5 of its checkpoint,
    its training history (``metrics.jsonl``) and, for a reordered model, its ``reorder.json``."""
    from effdeploy.config import load_run_config
    from effdeploy.data.datasets import load_pixels
    from effdeploy.metrics import topk_accuracy
    from effdeploy.model.checkpoints import load_checkpoint
    from effdeploy.model.pixels import predict_pixels

    rows = []
    test_cache: dict[str, object] = {}
    for name, label in MODELS.items():
        ckpt = models_dir / name / "model.safetensors"
        if not ckpt.is_file():
            log(f"skip {name}: {ckpt} not found")
            continue
        run = load_run_config(configs_dir / f"{name}.yaml")
        model = load_checkpoint(ckpt)
        key = str(run.data.test)
        if key not in test_cache:
            test_cache[key] = load_pixels(run.data.test, model.config.preprocess)
        test = test_cache[key]
        t0 = time.perf_counter()
        logits = predict_pixels(model, test.pixels)
        history = read_jsonl(models_dir / name / "metrics.jsonl")
        reorder = models_dir / name / "reorder.json"
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
        log(f"{name}: test top-1 {100 * row['test_top1']:.2f}%")
    return rows


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def markdown(rows: list[dict]) -> str:
    """The README table of ``evaluate`` rows, and the reorder table where a model was reordered."""
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
    """Validation top-1 per epoch of every model with a training history."""
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

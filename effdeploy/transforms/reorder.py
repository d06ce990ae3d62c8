"""SE reordering: turn a trained SE-after model into SE-before (or SE-none) and recover accuracy.

Step 1, transplant: every weight carries over by name. ``before`` has exactly the parameter
shapes of ``after`` (the gate acts on the expanded features either way), so the load is strict;
``none`` drops the SE tensors. The network now computes something different, and accuracy drops.
Step 2, distillation (``transforms.distill``): the transplanted student learns the original
teacher's temperature-softened logits on unlabelled training images. Labels are never read.

``quant`` calls ``reorder_model`` when a config asks for another placement than the
checkpoint's; ``effdeploy reorder`` runs ``reorder_run``.
"""

from __future__ import annotations

import time

import torch

from effdeploy.config import ModelConfig, ReorderConfig, parse
from effdeploy.data.datasets import PixelDataset
from effdeploy.errors import EffdeployError
from effdeploy.metrics import topk_accuracy
from effdeploy.model.efficientnet import EfficientNet
from effdeploy.model.pixels import predict_pixels
from effdeploy.transforms.distill import distill


def transplant(source: EfficientNet, se_placement: str) -> EfficientNet:
    """A new model with ``se_placement`` carrying every compatible weight of ``source``."""
    cfg = parse(ModelConfig, {**source.config.model_dump(), "se_placement": se_placement}, "reorder target")
    target = EfficientNet(cfg)
    src = source.state_dict()
    want = target.state_dict()
    missing = [k for k in want if k not in src]
    if missing:
        raise EffdeployError(
            f"cannot transplant {source.config.se_placement!r} -> {se_placement!r}: source lacks {missing[0]!r}"
        )
    for k, v in want.items():
        if src[k].shape != v.shape:
            raise EffdeployError(f"cannot transplant: {k!r} has shape {tuple(src[k].shape)}, target {tuple(v.shape)}")
    target.load_state_dict({k: src[k] for k in want}, strict=True)
    return target


def reorder_model(
    source: EfficientNet,
    se_placement: str,
    unlabelled: PixelDataset,
    val: PixelDataset,
    cfg: ReorderConfig,
    *,
    crop_padding: int = 4,
    hflip: bool = True,
    log=print,
) -> tuple[EfficientNet, dict]:
    """Transplant then distill; report validation top-1 before, right after, and after distillation."""
    if se_placement == source.config.se_placement:
        raise EffdeployError(f"the model already has se_placement={se_placement!r}")

    def val_top1(m: EfficientNet) -> float | None:
        if len(val) == 0:
            return None
        return topk_accuracy(predict_pixels(m, val.pixels, desc="validate"), val.labels, 1)

    t0 = time.perf_counter()
    report: dict = {
        "from": source.config.se_placement,
        "to": se_placement,
        "val_images": len(val),
        "source_val_top1": val_top1(source),
    }
    student = transplant(source, se_placement)
    report["transplant_val_top1"] = val_top1(student)
    log(
        f"transplant {report['from']} -> {se_placement}: val top-1 {_pct(report['source_val_top1'])} -> "
        f"{_pct(report['transplant_val_top1'])}"
    )
    report["distill_history"] = distill(
        student, source, unlabelled, cfg, crop_padding=crop_padding, hflip=hflip, log=log
    )
    student = student.to(memory_format=torch.contiguous_format)
    report["distilled_val_top1"] = val_top1(student)
    report["distill_steps"] = cfg.steps
    report["seconds"] = round(time.perf_counter() - t0, 1)
    log(f"after {cfg.steps} distillation steps: val top-1 {_pct(report['distilled_val_top1'])}")
    return student, report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def reorder_run(checkpoint, se_placement: str, run, out_dir, *, log=print) -> dict:
    """The `effdeploy reorder` pipeline: checkpoint in, reordered checkpoint + report out."""
    import json
    from pathlib import Path

    from effdeploy.data.splits import load_split
    from effdeploy.fileio import atomic_write_text, check_writable_dir
    from effdeploy.model.checkpoints import load_checkpoint, save_checkpoint

    out_dir = Path(out_dir)
    check_writable_dir(out_dir, "--out")  # before the distillation, not after it
    source = load_checkpoint(checkpoint)
    run = run.model_copy(update={"model": source.config})
    train_set, val_set = load_split(run)
    student, report = reorder_model(
        source,
        se_placement,
        train_set,
        val_set,
        run.reorder,
        crop_padding=run.train.augment.crop_padding,
        hflip=run.train.augment.hflip,
        log=log,
    )
    report["source_checkpoint"] = str(checkpoint)
    report["config"] = json.loads(run.reorder.model_dump_json())
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(student, out_dir / "model.safetensors", fp16=True)
    atomic_write_text(out_dir / "reorder.json", json.dumps(report, indent=2))
    return report

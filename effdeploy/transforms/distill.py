"""Distillation: a student learns a teacher's temperature-softened logits (KL divergence, scaled
by T^2) on unlabelled images, with the same per-sample crop/flip as training. Labels are never
read, so any image folder of the task will do."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from effdeploy.config import ReorderConfig
from effdeploy.data.augment import crop_flip
from effdeploy.data.datasets import PixelDataset
from effdeploy.errors import EffdeployError
from effdeploy.model.efficientnet import EfficientNet
from effdeploy.model.pixels import norm_tensors, to_input
from effdeploy.progress import progress


def distill(
    student: EfficientNet,
    teacher: EfficientNet,
    images: PixelDataset,
    cfg: ReorderConfig,
    *,
    crop_padding: int = 4,
    hflip: bool = True,
    log=print,
) -> list[dict]:
    """KL distillation of ``teacher``'s logits into ``student`` for ``cfg.steps`` steps."""
    if cfg.steps == 0:
        return []
    if len(images) < cfg.batch_size:
        raise EffdeployError(f"distillation needs at least {cfg.batch_size} images, got {len(images)}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    teacher.eval()
    student.train()
    student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    mean, std = norm_tensors(student)
    pixels = torch.from_numpy(images.pixels)
    t2 = cfg.temperature**2
    order = torch.randperm(len(images), generator=gen)
    cursor = 0
    history = []
    running = 0.0
    for step in progress(range(cfg.steps), desc="distill", unit="step"):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor : cursor + cfg.batch_size]
        cursor += cfg.batch_size
        x = to_input(crop_flip(pixels[idx], crop_padding, hflip, gen), mean, std)
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = (
            F.kl_div(
                F.log_softmax(s_logits / cfg.temperature, 1),
                F.log_softmax(t_logits / cfg.temperature, 1),
                log_target=True,
                reduction="batchmean",
            )
            * t2
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            n = (step % 100) + 1
            history.append({"step": step + 1, "kl": running / n, "lr": lr})
            log(f"distill step {step + 1}/{cfg.steps}: KL {running / n:.4f}")
            running = 0.0
    student.eval()
    return history

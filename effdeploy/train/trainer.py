"""Training from scratch on a labelled image folder, sized for a 2-core CPU.

Why it is fast enough: images are decoded once and cached as uint8 pixels; augmentation runs
per sample but vectorised over the batch; tensors are channels_last. Why it is safe to stop:
every epoch writes ``last.safetensors`` (weights + config) and ``train_state.pt`` (optimizer,
RNG streams, history) atomically, so ``--resume`` continues bit-for-bit where it stopped.

Run directory layout::

    <out>/last.safetensors   weights after the latest finished epoch (fp32)
    <out>/train_state.pt     optimizer + RNG + history (weights_only-loadable)
    <out>/metrics.jsonl      one JSON object per epoch
    <out>/run.yaml           the exact config
    <out>/model.safetensors  the finished model (fp16 storage), written after the last epoch
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from effdeploy.config import RunConfig, TrainConfig, check_model_size, env_number, parse
from effdeploy.data.augment import crop_flip
from effdeploy.data.splits import load_split
from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_path, atomic_write_text, check_writable_dir
from effdeploy.model.checkpoints import load_checkpoint, load_pickle_weights_only, save_checkpoint
from effdeploy.model.efficientnet import EfficientNet
from effdeploy.model.pixels import norm_tensors, predict_pixels, to_input
from effdeploy.progress import progress

LAST = "last.safetensors"
STATE = "train_state.pt"
FINAL = "model.safetensors"
METRICS = "metrics.jsonl"


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to ``cfg.lr * min_lr_ratio``."""
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _config_fingerprint(run: RunConfig) -> str:
    """What must not change across --resume: the model, the data and the recipe (not threads)."""
    return json.dumps(
        {
            "model": run.model.model_dump(mode="json"),
            "data": run.data.model_dump(mode="json"),
            "train": run.train.model_dump(mode="json", exclude={"threads", "eval_batch_size"}),
        },
        sort_keys=True,
    )


def train(run: RunConfig, out_dir: str | Path, *, resume: bool = False, limit: int | None = None, log=print) -> dict:
    """Train ``run.model`` on ``run.data.train`` for ``run.train.epochs``; returns the summary."""
    out_dir = Path(out_dir)
    cfg = run.train
    state_file = out_dir / STATE
    if not resume and (state_file.exists() or (out_dir / FINAL).exists()):
        raise EffdeployError(f"{out_dir}: already holds a run; pass --resume to continue it or choose another --out")
    if resume and not state_file.exists():
        raise EffdeployError(f"{out_dir}: nothing to resume (no {STATE})")
    if limit is not None and limit < 1:
        raise EffdeployError(f"--limit: must be at least 1, got {limit}")
    check_writable_dir(out_dir, "--out")
    check_training_memory(run)
    saved_state = _read_state(state_file) if resume else None  # a bad file fails before the data is decoded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    train_set, val_set = load_split(run, limit)
    torch.manual_seed(cfg.seed)
    data_rng = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    start_epoch = 0
    if resume:
        model = load_checkpoint(out_dir / LAST)
        state = saved_state
        saved = parse(RunConfig, _json(state["run_config"], state_file, "run_config"), f"{state_file}: run config")
        if _config_fingerprint(saved) != _config_fingerprint(run):
            raise EffdeployError(f"{out_dir}: config differs from the run being resumed (see {out_dir / 'run.yaml'})")
        with _state_mismatch(state_file):
            if "model" in state:  # the weights of the epoch the state describes (see _save_epoch)
                model.load_state_dict(state["model"])
            start_epoch = int(state["epoch"])
            history = _json(state["history"], state_file, "history")
            if not isinstance(history, list):
                raise EffdeployError(f"{state_file}: history is not a list")
            torch.set_rng_state(state["rng_torch"])
            data_rng.set_state(state["rng_data"])
    else:
        model = EfficientNet(run.model)
        out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write_text(out_dir / "run.yaml", yaml.safe_dump(json.loads(run.model_dump_json()), sort_keys=False))
    model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    if resume:
        with _state_mismatch(state_file):
            opt.load_state_dict(state["optimizer"])

    n = len(train_set)
    steps_per_epoch = n // cfg.batch_size
    if steps_per_epoch == 0:
        raise EffdeployError(f"{run.data.train}: {n} training images, fewer than one batch of {cfg.batch_size}")
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    mean, std = norm_tensors(model)
    pixels = torch.from_numpy(train_set.pixels)
    labels = torch.from_numpy(train_set.labels)
    log(
        f"training {run.model.variant} (width {run.model.width_mult}, depth {run.model.depth_mult}, "
        f"{run.model.resolution}px, se_placement={run.model.se_placement}) on {n} images, "
        f"validating on {len(val_set)}; epochs {start_epoch + 1}..{cfg.epochs}, {torch.get_num_threads()} threads"
    )

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=data_rng)
        loss_sum = correct = seen = 0.0
        bar = progress(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for i in bar:
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, total_steps, warmup_steps, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = crop_flip(pixels[idx], cfg.augment.crop_padding, cfg.augment.hflip, data_rng)
            x = to_input(batch, mean, std)
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
            opt.step()
            if not torch.isfinite(loss):
                raise EffdeployError(f"training diverged at epoch {epoch + 1}, step {i} (loss {loss.item()}); lower lr")
            bs = len(idx)
            loss_sum += loss.item() * bs
            correct += (logits.argmax(1) == y).sum().item()
            seen += bs
            if i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.4f}")
        train_seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "train_seconds": round(train_seconds, 1),
            "images_per_second": round(seen / train_seconds, 1),
        }
        if len(val_set):
            val_logits = predict_pixels(model, val_set.pixels, cfg.eval_batch_size, desc="validate")
            vl = torch.from_numpy(val_logits)
            vy = torch.from_numpy(val_set.labels)
            record["val_loss"] = F.cross_entropy(vl, vy).item()
            record["val_top1"] = float((vl.argmax(1) == vy).float().mean())
        record["epoch_seconds"] = round(time.perf_counter() - t0, 1)
        history.append(record)
        _save_epoch(out_dir, model, opt, run, epoch + 1, history, data_rng)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}  train {100 * record['train_top1']:.2f}%"
            + (f"  val {100 * record['val_top1']:.2f}%" if "val_top1" in record else "")
            + f"  ({record['epoch_seconds']:.0f} s, {record['images_per_second']:.0f} img/s)"
        )

    final = out_dir / FINAL
    save_checkpoint(model.to(memory_format=torch.contiguous_format), final, fp16=True)
    summary = {"out": str(out_dir), "epochs": cfg.epochs, "history": history, "final_checkpoint": str(final)}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _save_epoch(out_dir: Path, model, opt, run: RunConfig, epoch: int, history: list[dict], data_rng) -> None:
    """Write the epoch's outputs, then train_state.pt last: it is the commit point for --resume and
    holds its own copy of the weights, so a run stopped between two of these writes still resumes
    from one consistent epoch (last.safetensors may then be one epoch ahead; it is rewritten)."""
    save_checkpoint(model, out_dir / LAST)
    atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in history))
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_data": data_rng.get_state(),
        "history": json.dumps(history),
        "run_config": run.model_dump_json(),
    }
    with atomic_path(out_dir / STATE) as tmp:
        torch.save(state, tmp)


def _read_state(state_file: Path) -> dict:
    """train_state.pt, unpickled with ``weights_only=True`` (tensors and plain containers only: a
    pickle that names any other callable is refused, never run), checked for the keys --resume reads."""
    state = load_pickle_weights_only(state_file)
    types = {
        "epoch": int,
        "optimizer": dict,
        "rng_torch": torch.Tensor,
        "rng_data": torch.Tensor,
        "history": str,
        "run_config": str,
    }
    if not isinstance(state, dict):
        raise EffdeployError(f"{state_file}: not an effdeploy training state (a {type(state).__name__})")
    for key, kind in types.items():
        if not isinstance(state.get(key), kind):
            raise EffdeployError(f"{state_file}: not an effdeploy training state ({key!r} missing or malformed)")
    if "model" in state and not isinstance(state["model"], dict):
        raise EffdeployError(f"{state_file}: not an effdeploy training state ('model' malformed)")
    return state


def _json(text: str, state_file: Path, key: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise EffdeployError(f"{state_file}: {key} is not valid JSON") from None


@contextlib.contextmanager
def _state_mismatch(state_file: Path):
    """Turn torch's complaints about a state that does not fit this model into one line."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise EffdeployError(f"{state_file}: does not fit this run's model ({first})") from None


#: Bytes per float, times: the parameters, their gradients and two optimizer buffers; and for each
#: image of a batch, the tensors kept for the backward pass (convolution input, norm input,
#: activation output) of every block's expanded, depthwise and projected features.
_PARAM_COPIES = 4
_SAVED_PER_ACTIVATION = 3
MAX_TRAIN_MEMORY_ENV = "EFFDEPLOY_MAX_TRAIN_GB"


def training_memory_bytes(run: RunConfig) -> int:
    """An estimate of training's peak memory, from the analytic profile (nothing allocated)."""
    from effdeploy.model.profile import profile_config

    prof = profile_config(run.model)
    per_image = sum(
        (b.expand_channels * b.in_size**2 if b.expand_channels != b.in_channels else 0)
        + b.expand_channels * b.out_size**2
        + b.out_channels * b.out_size**2
        for b in prof.blocks
    )
    return 4 * (_PARAM_COPIES * prof.params + _SAVED_PER_ACTIVATION * run.train.batch_size * per_image)


def _memory_limit() -> int:
    import os

    gb = env_number(MAX_TRAIN_MEMORY_ENV, "a number of GB")
    if gb is not None:
        return int(gb * 2**30)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: no memory limit, the parameter limit still applies


def check_training_memory(run: RunConfig) -> None:
    """Refuse a model or batch that cannot fit in memory before anything is allocated."""
    check_model_size(run.model, "model")
    need, limit = training_memory_bytes(run), _memory_limit()
    if need > limit:
        raise EffdeployError(
            f"model: training needs about {need / 2**30:,.1f} GB (batch {run.train.batch_size}, "
            f"{run.model.resolution} px), more than the {limit / 2**30:,.1f} GB available "
            f"(lower train.batch_size or the model size, or set {MAX_TRAIN_MEMORY_ENV})"
        )


def main_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

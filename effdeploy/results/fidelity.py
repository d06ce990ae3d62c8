"""Export fidelity across models: ONNX and TFLite against PyTorch, on real images.

Each model runs through ``effdeploy export`` into a temporary directory (deleted once measured),
with the converters timed and the reference logits kept, so that one report holds every format's
distance from PyTorch, the logits' scale and, optionally, float32 PyTorch's own distance from
float64.

Read the numbers with the logits' size in mind: with the default init every BatchNorm is the
identity and activations shrink ~50x per stage, so random-init logits are ~1e-13 and an absolute
max |diff| of 1e-4 holds trivially (SNR and top-1 agreement are scale-free and still mean
something). ``weights="conditioned"`` gives every BN running statistics drawn from its real input
and a classifier scaled to trained-model logits (effdeploy.model.conditioning), so the
non-linearities work outside their linear region and the absolute bound means something.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError

FORMATS = ("onnx", "tflite")
MAX_ABS_DIFF = 1e-4
MIN_SNR_DB = 80.0


# --------------------------------------------------------------------------- instrumentation


@contextlib.contextmanager
def instrument(record: dict):
    """Time each converter call and keep what the pipeline measured with, without changing it.

    ``export_run`` imports ``export_onnx`` / ``export_tflite`` from their modules when it runs and
    calls ``run_batched`` from its own module globals, so wrapping those names for the duration
    of one ``export_run`` sees: seconds per conversion (the file written, nothing else), and the
    reference logits (the torch backend's output), the model and the fidelity inputs.
    """
    import effdeploy.export.onnx as onnx_mod
    import effdeploy.export.pipeline as pipeline
    import effdeploy.export.tflite as tflite_mod

    saved = (onnx_mod.export_onnx, tflite_mod.export_tflite, pipeline.run_batched)

    def timed(fmt, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                record.setdefault("export_s", {})[fmt] = time.perf_counter() - t0

        return wrapper

    def run_batched(backend, images, *args, **kwargs):
        out = saved[2](backend, images, *args, **kwargs)
        if getattr(backend, "name", None) == "torch":
            record.update(reference=out, inputs=images, model=backend.model)
        return out

    onnx_mod.export_onnx = timed("onnx", saved[0])
    tflite_mod.export_tflite = timed("tflite", saved[1])
    pipeline.run_batched = run_batched
    try:
        yield record
    finally:
        onnx_mod.export_onnx, tflite_mod.export_tflite, pipeline.run_batched = saved


# --------------------------------------------------------------------------- weights


def conditioned_model(config, data: Path, images: int, seed: int = 0):
    """Random-init weights (seed ``seed``) conditioned on the fidelity images (see
    effdeploy.model.conditioning)."""
    import torch

    from effdeploy.data.sources import load_images
    from effdeploy.model.conditioning import condition_batchnorm_
    from effdeploy.model.efficientnet import EfficientNet

    torch.manual_seed(seed)
    model = EfficientNet(config).eval()
    pre = config.preprocess
    x = torch.from_numpy(load_images(data, pre, n=images).inputs(pre))
    return condition_batchnorm_(model, x, seed=seed + 1)


def float64_floor(model, inputs: np.ndarray, reference: np.ndarray) -> float:
    """SNR (dB) of float32 PyTorch against the same model in float64, one image at a time: the
    best any float32 artifact can do."""
    import torch

    from effdeploy.metrics import snr_db

    m64 = copy.deepcopy(model).double().eval()
    with torch.inference_mode():
        out = np.concatenate([m64(torch.from_numpy(inputs[i : i + 1]).double()).numpy() for i in range(len(inputs))])
    return snr_db(out, reference)


# --------------------------------------------------------------------------- one model


def measure(label: str, run, *, random_init: bool, workdir: Path | None, floor: bool) -> dict:
    """Export ``run`` into a temporary directory under ``workdir`` and return every format's
    fidelity, conversion time and size, and the reference logits' scale."""
    from effdeploy.export.pipeline import export_run

    out_dir = Path(tempfile.mkdtemp(prefix=f"effdeploy-fidelity-{label}-", dir=workdir))
    rec: dict = {}
    try:
        t0 = time.perf_counter()
        with instrument(rec):
            result = export_run(run, out_dir, random_init=random_init, log=lambda _msg: None)
        total = time.perf_counter() - t0
        sizes = {f["format"]: f["bytes"] for f in result.manifest["files"]}
        ref = rec.get("reference")
        scale = float(np.abs(ref).max()) if ref is not None else None
        row = {
            "images": result.manifest["fidelity"]["images"],
            "data": result.manifest["fidelity"]["data"],
            "ref_max_abs_logit": scale,
            "total_s": round(total, 2),
        }
        for fmt in run.export.formats:
            m = dict(result.fidelity[fmt])
            if scale:
                m["rel_max_abs_diff"] = m["max_abs_diff"] / scale
            m["export_s"] = round(rec.get("export_s", {}).get(fmt, float("nan")), 2)
            m["bytes"] = sizes[fmt]
            row[fmt] = m
        if floor and ref is not None:
            row["float64_floor_db"] = float64_floor(rec["model"], rec["inputs"], ref)
        return row
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def passed(row: dict) -> bool | None:
    """Every measured format within ``MAX_ABS_DIFF`` and ``MIN_SNR_DB``; None where none ran."""
    fmts = [f for f in FORMATS if f in row]
    if not fmts:
        return None
    return all(row[f]["max_abs_diff"] <= MAX_ABS_DIFF and row[f]["snr_db"] >= MIN_SNR_DB for f in fmts)


def _family_job(name: str, export, weights: str):
    """The row and run config of one family member (random init at its native resolution)."""
    from effdeploy.config import ModelConfig, RunConfig, parse
    from effdeploy.model.profile import profile_config

    config = parse(ModelConfig, {"variant": name}, f"--models {name}")
    prof = profile_config(config)
    row = {"name": name, "kind": "family", "variant": config.variant, "resolution": config.resolution}
    row.update(params=prof.params, macs=prof.macs, weights=weights, checkpoint=None)
    return row, config, RunConfig(name=name, model=config, export=export)


def _config_job(path: str, updates: dict):
    """The row and run config of one trained model's config; no config where its checkpoint does
    not exist yet (the row then says why it was skipped)."""
    from effdeploy.config import load_run_config
    from effdeploy.model.checkpoints import checkpoint_config
    from effdeploy.model.profile import profile_config

    run_cfg = load_run_config(path)
    ckpt = run_cfg.checkpoint
    row = {"name": str(run_cfg.name), "kind": "config", "config": path, "checkpoint": str(ckpt)}
    if ckpt is None or not Path(ckpt).is_file():
        row["skipped"] = f"checkpoint {ckpt} not found (not trained yet)"
        return row, None, None
    config = checkpoint_config(ckpt)
    prof = profile_config(config)
    row.update(variant=config.variant, resolution=config.resolution, params=prof.params, macs=prof.macs)
    return row, config, run_cfg.model_copy(update={"export": run_cfg.export.model_copy(update=updates)})


def _db(x) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:.1f}")


def _progress(row: dict, formats: tuple[str, ...]) -> str:
    parts = []
    for fmt in formats:
        m = row[fmt]
        parts.append(
            f"{fmt} {m['export_s']:.1f} s  max|diff| {m['max_abs_diff']:.2e}  SNR {_db(m['snr_db'])} dB  "
            f"top-1 {100 * m['top1_agreement']:.1f}%"
        )
    floor = f"; float32 floor {_db(row['float64_floor_db'])} dB" if "float64_floor_db" in row else ""
    verdict = "pass" if row["pass"] else "FAIL"
    return f"{'; '.join(parts)}{floor} -> {verdict} ({row['total_s']:.0f} s)"


def cpu_model() -> str | None:
    """The CPU's marketing name (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def fidelity_report(
    models: list[str],
    configs: list[Path],
    *,
    images: int,
    data: Path,
    formats: tuple[str, ...],
    weights: str = "init",
    threads: int | None = None,
    workdir: Path | None = None,
    floor: bool = False,
    command: str,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every family member of ``models`` (``weights``: "init" or "conditioned", fidelity
    images from ``data``) and every trained model of ``configs``; the report holds every number,
    the tool versions, ``command`` and the machine. A model whose export fails is a row with its
    error, not an exception."""
    from effdeploy.config import ExportConfig, parse
    from effdeploy.export.pipeline import tool_versions
    from effdeploy.model.checkpoints import save_checkpoint

    export = parse(ExportConfig, {"formats": formats, "fidelity_images": images, "threads": threads}, "options")
    if models and not data.exists():
        raise EffdeployError(f"{data}: fidelity images not found (pass --data)")
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    jobs = [("model", name) for name in models] + [("config", str(path)) for path in configs]
    started = datetime.now(UTC)
    rows: list[dict] = []
    for i, (kind, what) in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}]"
        if kind == "model":
            row, config, run_cfg = _family_job(what, export.model_copy(update={"fidelity_data": data}), weights)
        else:
            updates = {"formats": formats, "fidelity_images": images, "threads": threads}
            row, config, run_cfg = _config_job(what, updates)
            if run_cfg is None:
                log(f"{tag} {row['name']}: skipped, {row['skipped']}")
                rows.append(row)
                continue
        log(f"{tag} {row['name']}: {row['resolution']} px, {row['params'] / 1e6:.2f} M params ...")
        tmp_ckpt_dir = None
        try:
            random_init = kind == "model"
            if kind == "model" and weights == "conditioned":
                tmp_ckpt_dir = Path(tempfile.mkdtemp(prefix="effdeploy-fidelity-ckpt-", dir=workdir))
                model = conditioned_model(config, data, images)
                ckpt = save_checkpoint(model, tmp_ckpt_dir / "model.safetensors")
                run_cfg = run_cfg.model_copy(update={"checkpoint": ckpt})
                random_init = False
                del model
            row.update(measure(row["name"], run_cfg, random_init=random_init, workdir=workdir, floor=floor))
            row["pass"] = passed(row)
        except EffdeployError as err:
            row["error"] = str(err)
            row["pass"] = False
            log(f"{tag} {row['name']}: error: {err}")
            rows.append(row)
            continue
        finally:
            if tmp_ckpt_dir is not None:
                shutil.rmtree(tmp_ckpt_dir, ignore_errors=True)
        rows.append(row)
        log(f"{tag} {row['name']}: {_progress(row, formats)}")

    return {
        "benchmark": "export_fidelity",
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "tools": tool_versions(),
        "settings": {
            "images": images,
            "data": str(data),
            "formats": list(formats),
            "weights": weights,
            "threads": threads,
            "criteria": {"max_abs_diff": MAX_ABS_DIFF, "snr_db": MIN_SNR_DB},
            "reference": "torch eager float32",
        },
        "models": rows,
    }


# --------------------------------------------------------------------------- report


def _e(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def _s(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def markdown(report: dict) -> str:
    """The tables of a ``fidelity_report``: pass/fail per model, then scale, timing and size."""
    rows = report["models"]
    s = report["settings"]
    lines = [
        f"Export fidelity against PyTorch (float32 eager) on {s['images']} real images per model; "
        f"family members use {s['weights']} weights, fidelity data `{s['data']}`. "
        f"Pass: max \\|diff\\| <= {MAX_ABS_DIFF:g} and SNR >= {MIN_SNR_DB:g} dB for every format.",
        "",
        "| model | resolution | ONNX max \\|diff\\| | ONNX SNR dB | TFLite max \\|diff\\| | TFLite SNR dB "
        "| top-1 agreement (ONNX / TFLite) | pass |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or f"error: {r['error']}"
            lines.append(f"| {r['name']} | {r.get('resolution', '-')} | {why} | | | | | - |")
            continue
        o, t = r.get("onnx", {}), r.get("tflite", {})
        top1 = " / ".join(f"{100 * r[f]['top1_agreement']:.1f}%" if f in r else "-" for f in FORMATS)
        ok = {True: "yes", False: "**no**", None: "-"}[r["pass"]]
        lines.append(
            f"| {r['name']} | {r['resolution']} | {_e(o.get('max_abs_diff'))} | {_db(o.get('snr_db'))} | "
            f"{_e(t.get('max_abs_diff'))} | {_db(t.get('snr_db'))} | {top1} | {ok} |"
        )
    lines += [
        "",
        "| model | params | ref max \\|logit\\| | ONNX rel. max \\|diff\\| | TFLite rel. max \\|diff\\| "
        "| float32 floor dB | ONNX export s | TFLite export s | ONNX MB | TFLite MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            continue
        o, t = r.get("onnx", {}), r.get("tflite", {})
        cells = [
            r["name"],
            f"{r['params']:,}",
            _e(r.get("ref_max_abs_logit")),
            _e(o.get("rel_max_abs_diff")),
            _e(t.get("rel_max_abs_diff")),
            _db(r.get("float64_floor_db")),
            _s(o.get("export_s")),
            _s(t.get("export_s")),
            _mb(o.get("bytes")),
            _mb(t.get("bytes")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m = report["machine"]
    tools = ", ".join(f"{k} {v}" for k, v in report["tools"].items())
    lines += [
        "",
        f"Machine: {m.get('cpu_model') or m['processor'] or m['machine']}, {m['cpu_count']} CPUs, "
        f"{m['platform']}. Tools: {tools}.",
        f"Command: `{report['command']}`",
    ]
    if s["weights"] == "init" and any((r.get("ref_max_abs_logit") or 1) < 1e-3 for r in rows):
        lines += [
            "",
            "Note: random-init logits are tiny (see ref max |logit|), so the absolute max |diff| bound is "
            "met trivially; SNR, top-1 agreement and the relative column carry the information. "
            "`--weights conditioned` measures with realistic activations.",
        ]
    return "\n".join(lines) + "\n"

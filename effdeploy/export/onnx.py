"""PyTorch -> ONNX through torch.onnx (dynamo exporter): input ``images`` NCHW float32 with a
dynamic batch, output ``logits``; the model config, preprocessing and class names travel in the
file's metadata so a consumer needs nothing else."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from effdeploy import __version__
from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_path

DEFAULT_OPSET = 18


def onnx_metadata(model, class_names: list[str] | None = None) -> dict[str, str]:
    cfg = model.config
    return {
        "effdeploy_version": __version__,
        "model_config": cfg.model_dump_json(),
        "preprocess": cfg.preprocess.model_dump_json(),
        "class_names": json.dumps(list(class_names or [])),
        "input_layout": "NCHW float32, normalised as in preprocess",
    }


def torch_to_onnx(model: torch.nn.Module, dest: Path, *, opset: int, resolution: int, name: Path) -> None:
    """The one torch.onnx call: input ``images`` NCHW with a dynamic batch, output ``logits``.
    Failures become a one-line error naming ``name`` (the artifact the user asked for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (torch.zeros(2, 3, resolution, resolution),),
                str(dest),
                input_names=["images"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        except Exception as err:
            raise EffdeployError(f"{name}: ONNX export failed ({str(err).splitlines()[0][:200]})") from None


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    class_names: list[str] | None = None,
) -> Path:
    import onnx

    path = Path(path)
    model = model.eval()
    with atomic_path(path) as tmp:
        torch_to_onnx(model, tmp, opset=opset, resolution=model.config.resolution, name=path)
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in onnx_metadata(model, class_names).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "effdeploy"
        proto.producer_version = __version__
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as err:
            raise EffdeployError(
                f"{path}: exported graph fails the ONNX checker ({str(err).splitlines()[0]})"
            ) from None
        onnx.save(proto, str(tmp))
    return path

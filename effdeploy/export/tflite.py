"""PyTorch -> TFLite through litert-torch, with NHWC input and no layout TRANSPOSE.

``litert_torch.to_channel_last_io(model, args=[0])`` makes the input NHWC (the layout mobile
camera pipelines and every LiteRT delegate want); the converter then folds the layout change
into the convolutions, so no TRANSPOSE remains anywhere. The logits are 2-D, so the output has
no layout. The batch dimension is 1 in the file; runtimes resize it.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch

from effdeploy.errors import EffdeployError
from effdeploy.fileio import atomic_path


def _quiet():
    """litert-torch prints progress lines to stdout; keep our output ours."""
    return contextlib.redirect_stdout(io.StringIO())


def export_tflite(model: torch.nn.Module, path: str | Path) -> Path:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import litert_torch
    except ImportError:
        raise EffdeployError("TFLite export needs litert-torch (pip install litert-torch)") from None
    path = Path(path)
    res = model.config.resolution
    model = model.eval()
    sample = torch.zeros(1, res, res, 3)
    with atomic_path(path) as tmp, warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        try:
            nhwc = litert_torch.to_channel_last_io(model, args=[0]).eval()
            edge = litert_torch.convert(nhwc, (sample,))
            edge.export(str(tmp))
        except Exception as err:
            raise EffdeployError(f"{path}: TFLite conversion failed ({str(err).splitlines()[0][:200]})") from None
    return path


def tflite_ops(path: str | Path) -> list[dict]:
    """The model's operators (no delegate applied), each with its input and output tensor ids."""
    from effdeploy.runtime.litert_backend import LiteRTBackend

    interp = LiteRTBackend(path, use_xnnpack=False).interpreter
    interp.allocate_tensors()
    return [
        {"op": d["op_name"], "inputs": [int(i) for i in d["inputs"]], "outputs": [int(i) for i in d["outputs"]]}
        for d in interp._get_ops_details()
    ]


def tflite_io(path: str | Path) -> dict:
    from effdeploy.runtime.litert_backend import LiteRTBackend

    interp = LiteRTBackend(path, use_xnnpack=False).interpreter
    i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    return {
        "input": {"index": int(i["index"]), "shape": [int(s) for s in i["shape"]], "dtype": i["dtype"].__name__},
        "output": {"index": int(o["index"]), "shape": [int(s) for s in o["shape"]], "dtype": o["dtype"].__name__},
    }


def edge_transposes(path: str | Path) -> list[str]:
    """TRANSPOSE ops that read the model input or write the model output (should be none)."""
    io_ = tflite_io(path)
    found = []
    for op in tflite_ops(path):
        if op["op"] == "TRANSPOSE":
            if io_["input"]["index"] in op["inputs"]:
                found.append("TRANSPOSE after the input")
            if io_["output"]["index"] in op["outputs"]:
                found.append("TRANSPOSE before the output")
    return found

"""Are LiteRT's integer kernels exact? Each 1x1 CONV_2D and FULLY_CONNECTED of a full-integer
TFLite model, recomputed in exact integer arithmetic from the int8 input LiteRT itself fed it.

    python benchmarks/litert_kernels.py artifacts/cifar10_b0w05_after/model_w8a8.tflite \\
        artifacts/cifar10_b0w05_after/model_w4a8.tflite --config configs/cifar10_b0w05_after.yaml

For every such op: acc = sum((x - zx) * w) + bias in int64, y = round(acc * sx * sw / sy) + zy,
clamped to int8 (the real-valued requantization the simulation models), against LiteRT's own
output of that op on the same images. Because every op starts from LiteRT's own input, a
difference here is that kernel's, not inherited. int8 kernels differ by one step on a fraction of
a percent of outputs (fixed-point requantization rounds near-ties the other way); the table shows
what int4 weights do. Writes benchmarks/results/litert_kernels_<config name>.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

INT4, INT8 = 17, 9  # TFLite TensorType codes


def _weights(fb, tensor) -> np.ndarray:
    raw = np.frombuffer(bytes(fb.buffers[tensor.buffer].data), np.uint8)
    if tensor.type == INT8:
        return raw.view(np.int8).reshape(tensor.shape).astype(np.int64)
    nib = np.stack([raw & 0xF, raw >> 4], 1).reshape(-1).astype(np.int64)  # int4: two per byte, low first
    nib = np.where(nib > 7, nib - 16, nib)
    return nib[: int(np.prod(tensor.shape))].reshape(tensor.shape)


def check_model(path: Path, x_nhwc: np.ndarray) -> list[dict]:
    """One row per checked op: type, weight dtype, outputs compared, outputs one step or more off."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    from effdeploy.quant.emit_tflite import invoked

    fb = flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    it = invoked(path, x_nhwc)
    graph = fb.subgraphs[0]
    rows = []
    for op in graph.operators:
        code = fb.operatorCodes[op.opcodeIndex]
        kind = names.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if kind not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        wt = graph.tensors[op.inputs[1]]
        if wt.type not in (INT8, INT4) or (kind == "CONV_2D" and tuple(wt.shape[1:3]) != (1, 1)):
            continue
        opts = op.builtinOptions
        if getattr(opts, "fusedActivationFunction", 0) != 0 or (
            kind == "CONV_2D" and (opts.strideH, opts.strideW) != (1, 1)
        ):
            continue
        w = _weights(fb, wt).reshape(wt.shape[0], -1)  # [out, in]
        w_scale = np.asarray(wt.quantization.scale, np.float64)
        bias = (
            np.frombuffer(bytes(fb.buffers[graph.tensors[op.inputs[2]].buffer].data), np.int32).astype(np.int64)
            if len(op.inputs) > 2 and op.inputs[2] >= 0
            else 0
        )
        ti, to = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
        sx, zx = float(ti.quantization.scale[0]), int(ti.quantization.zeroPoint[0])
        sy, zy = float(to.quantization.scale[0]), int(to.quantization.zeroPoint[0])
        xi = it.get_tensor(op.inputs[0]).astype(np.int64)
        y = it.get_tensor(op.outputs[0]).astype(np.int64)
        acc = (xi - zx).reshape(-1, w.shape[1]) @ w.T + bias
        ref = np.clip(np.round(acc * (sx * w_scale) / sy) + zy, -128, 127).reshape(y.shape)
        diff = np.abs(ref - y)
        rows.append(
            {
                "op": kind,
                "weights": "int4" if wt.type == INT4 else "int8",
                "outputs": int(diff.size),
                "off": int((diff > 0).sum()),
                "max_steps": int(diff.max()),
                "litert_higher": int((y > ref).sum()),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="full-integer .tflite files")
    ap.add_argument("--config", type=Path, default=Path("configs/cifar10_b0w05_after.yaml"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    from effdeploy.config import load_run_config
    from effdeploy.data.datasets import load_images
    from effdeploy.errors import EffdeployError
    from effdeploy.report import write_markdown

    run = load_run_config(args.config)
    for m in args.models:
        if not m.is_file():
            raise SystemExit(f"error: {m}: no such TFLite model (run 'make quantize' first)")
    pre = run.model.preprocess
    source = run.quant.eval_data or run.data.test
    if source is None:
        raise EffdeployError(f"{args.config}: no quant.eval_data or data.test to take images from")
    x = np.transpose(load_images(source, pre, n=args.images).inputs(pre), (0, 2, 3, 1)).copy()
    lines = [
        f"# LiteRT integer kernels against exact integer arithmetic: {run.name}",
        "",
        f"Generated by `python benchmarks/litert_kernels.py {' '.join(str(m) for m in args.models)} "
        f"--config {args.config} --images {args.images}`.",
        f"{len(x)} images from {source}. Every 1x1 CONV_2D and FULLY_CONNECTED without fused activation, "
        "recomputed from the int8 input LiteRT fed it: acc = sum((x - zx) w) + b, "
        "y = round(acc sx sw / sy) + zy. 'Off' counts outputs one step or more from that.",
        "",
        "| model | op | weights | ops | outputs | off by >= 1 step | LiteRT higher | max steps |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in args.models:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in check_model(m, x):
            groups[(r["op"], r["weights"])].append(r)
        for (op, wdt), rs in sorted(groups.items()):
            n, off = sum(r["outputs"] for r in rs), sum(r["off"] for r in rs)
            higher = sum(r["litert_higher"] for r in rs)
            lines.append(
                f"| {m.name} | {op} | {wdt} | {len(rs)} | {n} | {100 * off / n:.2f}% | "
                f"{100 * higher / max(off, 1):.0f}% of those | {max(r['max_steps'] for r in rs)} |"
            )
    write_markdown(args.out / f"litert_kernels_{run.name}.md", lines)


if __name__ == "__main__":
    main()

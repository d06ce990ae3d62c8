"""onnxruntime on CPU.

``x64quantprecision``: on x86 CPUs without VNNI, onnxruntime's default int8 kernels can
saturate their intermediate sums (a W8A8 Lite0 QDQ model measured 7.9 dB on such a CPU); the
session option ``session.x64quantprecision=1`` selects the exact path (19.3 dB). That path
converts int8 weights to uint8 and runs U8U8 kernels, which on a VNNI CPU are slower than float
(benchmarks/results/ort_int8_fusion.md), and VNNI does not saturate. So by default it is on
exactly where int8 may saturate (``runtime.cpu.int8_may_saturate``); every report states the
options used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.runtime.base import register


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(
        self, path: str | Path | bytes, threads: int | None = None, x64quantprecision: bool | None = None
    ) -> None:
        """``path`` may also be a serialized model (bytes), as an edited graph is held in memory."""
        import onnxruntime as ort

        if isinstance(path, bytes):
            source, path = path, "ONNX model in memory"
        else:
            path = Path(path)
            if not path.is_file():
                raise EffdeployError(f"{path}: ONNX model not found")
            source = str(path)
        if x64quantprecision is None:
            from effdeploy.runtime.cpu import int8_may_saturate

            x64quantprecision = int8_may_saturate()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if x64quantprecision:
            opts.add_session_config_entry("session.x64quantprecision", "1")
        self.session_options = {
            "intra_op_num_threads": threads,
            "session.x64quantprecision": int(x64quantprecision),
            "graph_optimization_level": str(opts.graph_optimization_level).split(".")[-1],
            "execution_mode": str(opts.execution_mode).split(".")[-1],
        }
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise EffdeployError(f"{path}: onnxruntime cannot load it ({str(err).splitlines()[0][:200]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    def run_all(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every graph output, by name."""
        values = self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})
        return dict(zip(self.output_names, values, strict=True))


register("onnxruntime")(OnnxRuntimeBackend)

"""The machine a latency was measured on: CPU model and the ISA flags that decide int8 speed.

Int8 kernels differ by ISA: AVX-512 VNNI (and AVX-VNNI) run u8s8 dot products natively, plain
AVX2 emulates them and onnxruntime's default int8 path may saturate there. Every bench report
carries this record so a ratio is never read without the machine it came from.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from effdeploy.runtime.cpu import cpu_info

LIBRARIES = (
    "effdeploy",
    "torch",
    "numpy",
    "onnx",
    "onnxruntime",
    "ai-edge-litert",
    "ai-edge-quantizer",
    "litert-torch",
)


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def machine_record() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": cpu_info(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


def describe(machine: dict) -> str:
    """One line: 'Intel Xeon ... (x86_64; avx2 avx512f avx512_vnni; 2 cores)'."""
    cpu = machine["cpu"]
    flags = " ".join(cpu["flags"]) or "no int8 ISA flags"
    return f"{cpu['model']} ({cpu['arch']}; {flags}; {machine['usable_cores']} cores)"

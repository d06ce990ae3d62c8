"""The machine a latency was measured on: CPU model and the ISA flags that decide int8 speed.

Int8 kernels differ by ISA: AVX-512 VNNI (and AVX-VNNI) run u8s8 dot products natively, plain
AVX2 emulates them and onnxruntime's default int8 path may saturate there. Every bench report
carries this record so a ratio is never read without the machine it came from.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
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


def cpu_info(cpuinfo: str | None = None) -> dict:
    """CPU model and the int8-relevant flags, read from /proc/cpuinfo (Linux) or platform."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    present = [f for f in FLAGS if f in flags]
    return {
        "model": model,
        "arch": platform.machine(),
        "flags": present,
        "vnni": any(f in flags for f in ("avx512_vnni", "avx_vnni")),
    }


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

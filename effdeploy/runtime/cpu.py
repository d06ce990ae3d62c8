"""The host CPU's model and the ISA flags that decide int8 speed and int8 exactness.

Int8 kernels differ by ISA: AVX-512 VNNI (and AVX-VNNI) run u8s8 dot products natively; plain
AVX2 emulates them with 16-bit intermediate sums that onnxruntime's default int8 path can
saturate. Runtimes read this to choose their options; bench records it with every figure.
"""

from __future__ import annotations

import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


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


def int8_may_saturate(info: dict | None = None) -> bool:
    """True on x86 CPUs without VNNI, where onnxruntime's default u8s8 kernels can saturate."""
    info = info or cpu_info()
    return info["arch"] in ("x86_64", "AMD64", "i686") and not info["vnni"]

"""A .tflite on an Android phone over adb, run by LiteRT's ``benchmark_model``.

The phone runs the model the way LiteRT ships it: ``benchmark_model`` reads one raw input file
(``--input_layer_value_files``) and writes the raw bytes of every output (``--output_filepath``,
newer builds only), one image per invocation. The host only pushes, runs and pulls through
``adb -s SERIAL``; every argument that reaches the device shell goes through ``shlex.quote``,
so a file name with a space or a ``;`` stays one argument. adb, the tool binaries and the phone
are optional: their absence is a ``ToolMissing`` that says where to get them.

Nothing heavy is imported at module level: LiteRT (for the model's tensor details) only when a
model is opened.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from effdeploy.errors import EffdeployError
from effdeploy.runtime.base import register

REMOTE_DIR = "/data/local/tmp/effdeploy"
ADB_HOWTO = (
    "install adb: pip install adbutils (it bundles adb), or the Android SDK platform-tools "
    "(https://developer.android.com/tools/releases/platform-tools); or pass --adb / set ADB"
)
BENCHMARK_MODEL_HOWTO = (
    "get LiteRT's prebuilt benchmark_model for android_aarch64 from the LiteRT releases or nightly "
    "builds (github.com/google-ai-edge/LiteRT), or build //tflite/tools/benchmark:benchmark_model with "
    "bazel (--config=android_arm64); then pass --benchmark-model PATH or set EFFDEPLOY_BENCHMARK_MODEL"
)
BENCHMARK_LITERT_MODEL_HOWTO = (
    "build //litert/tools:benchmark_litert_model for android_arm64 from github.com/google-ai-edge/LiteRT; "
    "then pass --benchmark-litert-model PATH or set EFFDEPLOY_BENCHMARK_LITERT_MODEL"
)

# what adb prints when the phone is no longer there (unplugged, rebooted, adbd restarted)
_GONE = re.compile(r"device '[^']*' not found|no devices/emulators found|device offline|error: closed|protocol fault")
_EXIT = re.compile(r"EXIT:(\d+)\s*\Z")


class ToolMissing(EffdeployError):
    """An optional tool (adb, a benchmark binary) is not installed; the message says how to get it."""


class AdbError(EffdeployError):
    """adb could not do what was asked (a push, a pull, a shell command), in one line."""


class DeviceGone(AdbError):
    """The phone left while a command ran: what was measured before it stays valid."""


class ToolFailed(EffdeployError):
    """The benchmark tool ran on the phone and exited non-zero."""


def find_adb(explicit: str | None = None) -> str:
    """adb from ``--adb``, then ``$ADB``, then PATH, then the binary the adbutils package bundles."""
    if explicit:
        return _executable(explicit, "--adb")
    if os.environ.get("ADB"):
        return _executable(os.environ["ADB"], "ADB")
    found = shutil.which("adb")
    if found:
        return found
    bundled = _adbutils_adb()
    if bundled:
        return bundled
    raise ToolMissing(f"adb not found: {ADB_HOWTO}")


def _executable(path: str, source: str) -> str:
    p = Path(path).expanduser()
    if p.is_file() and os.access(p, os.X_OK):
        return str(p)
    found = shutil.which(path)
    if found:
        return found
    raise EffdeployError(f"{source}: {path} is not an executable file")


def _adbutils_adb() -> str | None:
    """The adb that the optional ``adbutils`` package ships, if it is installed."""
    try:
        import adbutils
    except Exception:
        return None
    getter = getattr(adbutils, "adb_path", None)
    if callable(getter):
        try:
            path = getter()
        except Exception:
            path = None
        if path and Path(path).is_file():
            return str(path)
    package_dir = Path(getattr(adbutils, "__file__", "") or ".").parent
    for name in ("adb", "adb.exe"):
        candidate = package_dir / "binaries" / name
        if candidate.is_file():
            return str(candidate)
    return None


def _find_tool(explicit: str | os.PathLike | None, option: str, env: str, what: str, howto: str) -> Path:
    if explicit:
        path, source = Path(explicit).expanduser(), option
    elif os.environ.get(env):
        path, source = Path(os.environ[env]).expanduser(), env
    else:
        raise ToolMissing(f"{what} not given: {howto}")
    if not path.is_file():
        raise EffdeployError(f"{source}: {path} is not a file ({what} for Android)")
    return path


def find_benchmark_binary(explicit: str | os.PathLike | None = None) -> Path:
    """LiteRT's ``benchmark_model`` for the phone: ``--benchmark-model``, then $EFFDEPLOY_BENCHMARK_MODEL."""
    return _find_tool(
        explicit, "--benchmark-model", "EFFDEPLOY_BENCHMARK_MODEL", "benchmark_model", BENCHMARK_MODEL_HOWTO
    )


def find_benchmark_litert_binary(explicit: str | os.PathLike | None = None) -> Path:
    """LiteRT's ``benchmark_litert_model`` (CompiledModel: CPU, GPU, NPU): ``--benchmark-litert-model``,
    then $EFFDEPLOY_BENCHMARK_LITERT_MODEL."""
    return _find_tool(
        explicit,
        "--benchmark-litert-model",
        "EFFDEPLOY_BENCHMARK_LITERT_MODEL",
        "benchmark_litert_model",
        BENCHMARK_LITERT_MODEL_HOWTO,
    )


def _run_adb(adb: str, args: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([adb, *args], capture_output=True, text=True, timeout=timeout, errors="replace")
    except subprocess.TimeoutExpired:
        raise AdbError(f"adb {' '.join(args[:3])}: no answer within {timeout:.0f} s") from None
    except OSError as err:
        raise AdbError(f"{adb}: cannot run it ({err.strerror or err})") from None


def list_devices(adb: str) -> list[dict]:
    """``adb devices -l`` as dicts: serial, state (device / offline / unauthorized / ...), model,
    product, device, transport_id (absent fields are None)."""
    proc = _run_adb(adb, ["devices", "-l"], timeout=60)
    if proc.returncode != 0:
        raise AdbError(f"adb devices -l failed: {_one_line(proc.stderr or proc.stdout)}")
    devices = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*")):
            continue  # header, and "* daemon started successfully" chatter
        parts = line.split()
        if len(parts) < 2:
            continue
        info = dict(p.split(":", 1) for p in parts[2:] if ":" in p)
        tid = info.get("transport_id")
        devices.append(
            {
                "serial": parts[0],
                "state": parts[1],
                "model": info.get("model"),
                "product": info.get("product"),
                "device": info.get("device"),
                "transport_id": int(tid) if tid and tid.isdigit() else None,
            }
        )
    return devices


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").replace("\r", "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no message"


@dataclass
class ShellResult:
    rc: int
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr


class AdbDevice:
    """One phone, addressed by serial: push, pull, shell. Every shell argument is quoted, and the
    remote exit status is read from an ``EXIT:$?`` marker (old adb does not return it)."""

    def __init__(self, adb: str, serial: str, timeout: float = 900.0) -> None:
        self.adb = adb
        self.serial = serial
        self.timeout = timeout
        self._props: dict[str, str] | None = None

    def _adb(self, args: Sequence[str], what: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        proc = _run_adb(self.adb, ["-s", self.serial, *args], timeout or self.timeout)
        if proc.returncode != 0:
            self._raise(what, proc)
        return proc

    def _raise(self, what: str, proc: subprocess.CompletedProcess) -> NoReturn:
        message = (proc.stderr or "") + "\n" + (proc.stdout or "")
        gone = _GONE.search(message)
        if gone:
            raise DeviceGone(f"{self.serial}: device disconnected during {what} ({gone.group(0)})")
        raise AdbError(f"{self.serial}: {what} failed ({_one_line(message)})")

    def push(self, local: str | os.PathLike, remote: str) -> None:
        self._adb(["push", str(local), remote], f"push {Path(local).name}")

    def pull(self, remote: str, local: str | os.PathLike) -> None:
        self._adb(["pull", remote, str(local)], f"pull {remote.rsplit('/', 1)[-1]}")

    def shell(self, argv: Sequence[str], timeout: float | None = None) -> ShellResult:
        """Run ``argv`` on the phone; its exit status comes back in ``rc`` (never raises for it)."""
        command = " ".join(shlex.quote(str(a)) for a in argv) + "; echo EXIT:$?"
        proc = _run_adb(self.adb, ["-s", self.serial, "shell", command], timeout or self.timeout)
        stdout = proc.stdout.replace("\r\n", "\n")
        marker = _EXIT.search(stdout)
        if marker is None:
            self._raise(f"shell {Path(str(argv[0])).name}", proc)  # raises: gone, or failed
        return ShellResult(int(marker.group(1)), stdout[: marker.start()], proc.stderr.replace("\r\n", "\n"))

    def check(self, argv: Sequence[str]) -> ShellResult:
        res = self.shell(argv)
        if res.rc != 0:
            raise AdbError(f"{self.serial}: {' '.join(map(str, argv))} exited {res.rc} ({_one_line(res.text)})")
        return res

    def props(self) -> dict[str, str]:
        """All system properties (``getprop``), read once."""
        if self._props is None:
            out = self.check(["getprop"]).stdout
            self._props = dict(re.findall(r"^\[([^\]]+)\]:\s*\[(.*)\]\s*$", out, flags=re.M))
        return self._props

    def getprop(self, name: str) -> str | None:
        return self.props().get(name) or None

    @property
    def sdk(self) -> int | None:
        value = self.getprop("ro.build.version.sdk")
        return int(value) if value and value.isdigit() else None

    @property
    def release(self) -> str | None:
        return self.getprop("ro.build.version.release")

    @property
    def model(self) -> str | None:
        return self.getprop("ro.product.model")

    def describe(self) -> str:
        """``SERIAL (model, Android release / API sdk)`` for the record's device column."""
        bits = [b for b in (self.model, self.release and f"Android {self.release}") if b]
        if self.sdk is not None:
            bits.append(f"API {self.sdk}")
        return f"{self.serial} ({', '.join(bits)})" if bits else self.serial

    def install(self, local: str | os.PathLike, name: str) -> str:
        """Push an executable into the work folder under ``name``; its remote path."""
        remote = f"{REMOTE_DIR}/{name}"
        self.check(["mkdir", "-p", REMOTE_DIR])
        self.push(local, remote)
        self.check(["chmod", "755", remote])
        return remote


def ready_serials(adb: str, serials: Sequence[str] | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """The serials to use (state ``device``), and (serial, reason) for each requested one that is not."""
    devices = {d["serial"]: d for d in list_devices(adb)}
    if serials is None:
        return [s for s, d in devices.items() if d["state"] == "device"], []
    ready, problems = [], []
    for s in serials:
        state = devices.get(s, {}).get("state")
        if state == "device":
            ready.append(s)
        else:
            problems.append((s, f"{s}: " + (f"state {state}" if state else "not connected (adb devices -l)")))
    return ready, problems


def supports_output_file(device: AdbDevice, remote_binary: str) -> bool:
    """Whether this benchmark_model build knows ``--output_filepath`` (its ``--help`` lists it;
    the tool exits non-zero after printing help, so only the text counts)."""
    return "output_filepath" in device.shell([remote_binary, "--help"]).text


def failure_reason(tool: str, rc: int, text: str) -> str:
    """One line for a tool that exited non-zero: its first ERROR/FATAL line, else its last line."""
    for line in text.replace("\r", "").splitlines():
        m = re.match(r"^\s*(?:ERROR|FATAL|E/[^:]*):?\s*(.+)$", line)
        if m and "Benchmarking failed" not in m.group(1):
            return f"{tool} exited {rc}: {m.group(1).strip()[:200]}"
    return f"{tool} exited {rc}: {_one_line(text)}"


def model_io(path: str | os.PathLike) -> dict:
    """The model's input and output tensor details (name, shape, dtype, quantization), read on the host."""
    from effdeploy.runtime.litert_backend import LiteRTBackend

    interp = LiteRTBackend(path, use_xnnpack=False).interpreter
    inputs = interp.get_input_details()
    if len(inputs) != 1:
        raise EffdeployError(f"{path}: {len(inputs)} inputs; an image classifier has one")
    return {"input": inputs[0], "outputs": interp.get_output_details()}


class PhoneModel:
    """One .tflite pushed beside ``benchmark_model`` on one phone: logits for images, one image
    per invocation (``--input_layer_value_files`` in, ``--output_filepath`` out)."""

    def __init__(
        self, device: AdbDevice, model: str | os.PathLike, remote_binary: str, threads: int = 1, io: dict | None = None
    ) -> None:
        self.device = device
        self.path = Path(model)
        self.io = io if io is not None else model_io(self.path)
        self.remote_binary = remote_binary
        self.threads = threads
        self.remote_model = f"{REMOTE_DIR}/{self.path.name}"
        device.check(["mkdir", "-p", REMOTE_DIR])
        device.push(self.path, self.remote_model)

    def base_command(self, runs: int, warmup: int) -> list[str]:
        return [
            self.remote_binary,
            f"--graph={self.remote_model}",
            f"--num_threads={self.threads}",
            f"--warmup_runs={warmup}",
            f"--num_runs={runs}",
            # exactly the runs asked for: no extra runs to fill a minimum duration
            "--min_secs=0",
            "--warmup_min_secs=0",
        ]

    def _input_bytes(self, image: np.ndarray) -> tuple[bytes, list[int]]:
        from effdeploy.runtime.litert_backend import quantize_input

        detail = self.io["input"]
        shape = [int(s) for s in detail["shape"]]
        x = np.ascontiguousarray(np.transpose(image[None], (0, 2, 3, 1)), dtype=np.float32)
        if list(x.shape[1:]) != shape[1:]:
            raise EffdeployError(f"{self.path.name}: input is {shape[1:]} (NHWC); images are {list(x.shape[1:])}")
        return quantize_input(x, detail).tobytes(), [1, *shape[1:]]

    def _decode(self, data: bytes) -> np.ndarray:
        from effdeploy.runtime.litert_backend import dequantize_output

        expected = sum(int(np.prod(o["shape"])) * np.dtype(o["dtype"]).itemsize for o in self.io["outputs"])
        if len(data) != expected:
            raise EffdeployError(
                f"{self.path.name}: the phone wrote {len(data)} output bytes, the model's outputs have {expected}"
            )
        out = self.io["outputs"][0]
        n = int(np.prod(out["shape"])) * np.dtype(out["dtype"]).itemsize
        y = np.frombuffer(data[:n], dtype=out["dtype"]).reshape([int(s) for s in out["shape"]])
        return dequantize_output(y, out).reshape(1, -1)

    def logits(self, images: np.ndarray, flags: Sequence[str] = ()) -> np.ndarray:
        """float32 NCHW images -> float32 logits (N, classes), computed on the phone with ``flags``."""
        name = str(self.io["input"]["name"])
        if "," in name:
            raise EffdeployError(f"{self.path.name}: input name {name!r} has a comma; benchmark_model cannot take it")
        io_dir = f"{REMOTE_DIR}/io"
        self.device.check(["rm", "-rf", io_dir])
        self.device.check(["mkdir", "-p", io_dir])
        rows = []
        with tempfile.TemporaryDirectory(prefix="effdeploy-android-") as tmp:
            for i, image in enumerate(np.asarray(images, dtype=np.float32)):
                data, shape = self._input_bytes(image)
                local_in, local_out = Path(tmp) / f"in_{i}.bin", Path(tmp) / f"out_{i}.bin"
                local_in.write_bytes(data)
                remote_in, remote_out = f"{io_dir}/in_{i}.bin", f"{io_dir}/out_{i}.bin"
                self.device.push(local_in, remote_in)
                escaped = name.replace(":", "::") + ":" + remote_in.replace(":", "::")
                argv = [
                    *self.base_command(runs=1, warmup=0),
                    f"--input_layer={name}",
                    f"--input_layer_shape={','.join(map(str, shape))}",
                    f"--input_layer_value_files={escaped}",
                    f"--output_filepath={remote_out}",
                    *flags,
                ]
                res = self.device.shell(argv)
                if res.rc != 0:
                    raise ToolFailed(f"{self.device.serial}: " + failure_reason("benchmark_model", res.rc, res.text))
                self.device.pull(remote_out, local_out)
                rows.append(self._decode(local_out.read_bytes()))
        self.device.shell(["rm", "-rf", io_dir])
        return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)

    def remove(self) -> None:
        self.device.shell(["rm", "-f", self.remote_model])


def pick_serial(adb: str, serial: str | None) -> str:
    """``serial`` if it is connected and authorized; without one, the only such phone."""
    ready, problems = ready_serials(adb, None if serial is None else [serial])
    if serial is not None:
        if problems:
            raise EffdeployError(f"android: {problems[0][1]}")
        return serial
    if len(ready) != 1:
        found = ", ".join(ready) or "none"
        raise EffdeployError(f"android: {len(ready)} phones ready ({found}); name one with serial=")
    return ready[0]


class AndroidBackend:
    """``load_backend("android", model.tflite, serial=.., flags=["--use_gpu=true"])``: logits
    computed on the phone. Needs a ``benchmark_model`` build with ``--output_filepath``."""

    name = "android"

    def __init__(
        self,
        path: str | os.PathLike,
        serial: str | None = None,
        adb: str | None = None,
        binary: str | os.PathLike | None = None,
        threads: int | None = 1,
        flags: Sequence[str] = ("--use_xnnpack=true",),
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise EffdeployError(f"{path}: TFLite model not found")
        self.adb = find_adb(adb)
        self.device = AdbDevice(self.adb, pick_serial(self.adb, serial))
        remote_binary = self.device.install(find_benchmark_binary(binary), "benchmark_model")
        if not supports_output_file(self.device, remote_binary):
            raise EffdeployError(
                f"{binary or 'benchmark_model'}: this build has no --output_filepath, so the phone's outputs "
                f"cannot be read back; use a newer LiteRT benchmark_model"
            )
        self.flags = list(flags)
        self.options = {"serial": self.device.serial, "threads": threads or 1, "flags": self.flags}
        self.phone_model = PhoneModel(self.device, path, remote_binary, threads or 1)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.phone_model.logits(images, self.flags)


register("android")(AndroidBackend)

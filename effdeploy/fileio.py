"""Atomic file writing: artifacts appear under their final name complete, or not at all.

One file (``atomic_path``), a set of files in one directory (``staged_dir``), and the checks that
refuse an unwritable output path before any work starts (``check_writable_file`` / ``_dir``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from effdeploy.errors import EffdeployError


def json_safe(obj):
    """Replace non-finite floats by the strings "inf" / "-inf" / "nan" (JSON has no such numbers)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the body succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; artifacts are ordinary files
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(final, text.encode())


# --------------------------------------------------------------------------- output paths


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the folder that new folders are made in)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _probe_write(folder: Path, path: Path, option: str, what: str) -> None:
    """Create and remove one empty file in ``folder``: the only test of writability that holds
    for root, read-only mounts and pseudo file systems (/proc) alike."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".effdeploy-probe-", dir=folder)
    except OSError as err:
        raise EffdeployError(
            f"{path}: cannot write the {what} ({option}): cannot create files in {folder} ({err.strerror or err})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_writable_file(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work starts, an output file that could not be written: an existing
    directory or device in its place, a regular file where a folder is needed, no permission."""
    path = Path(path)
    what = "output file"
    if path.is_dir():
        raise EffdeployError(f"{path}: is a directory; {option} needs a file name")
    if os.path.lexists(path) and not path.is_file():
        raise EffdeployError(f"{path}: exists and is not a regular file ({option})")
    base = _first_existing(path.parent)
    if not base.is_dir():
        raise EffdeployError(f"{path}: cannot write the {what} ({option}): {base} is not a directory")
    _probe_write(base, path, option, what)
    return path


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Refuse, before any work starts, an output directory that could not be written: a regular
    file in its place or on its path, no permission, a pseudo file system. Creates nothing."""
    path = Path(path)
    what = "output directory"
    if os.path.lexists(path) and not path.is_dir():
        raise EffdeployError(f"{path}: cannot use it as the {what} ({option}): it is not a directory")
    base = _first_existing(path)
    if not base.is_dir():
        raise EffdeployError(f"{path}: cannot create the {what} ({option}): {base} is not a directory")
    _probe_write(base, path, option, what)
    if base == Path(os.path.abspath(path)):  # sets are staged beside the directory (staged_dir)
        parent = base.parent
        if parent != base and not os.path.ismount(base):
            _probe_write(parent, path, option, what)
    return path


# --------------------------------------------------------------------------- artifact sets


@contextlib.contextmanager
def hold_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the body (a few renames); each arrives right after it, to
    the handler that was installed before. Python runs signal handlers in the main thread whichever
    thread the system delivered the signal to, so the handlers are swapped there (masking the
    signal in one thread would not stop torch's threads from taking it)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, object]] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append((signum, frame))) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum, frame in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


@contextlib.contextmanager
def staged_dir(
    final: str | os.PathLike, *, owns: Callable[[str], bool] | None = None, last: str | None = None
) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final`` for a set of artifacts; ``final`` shows either
    its previous set or the whole new one, never a mix.

    When the body succeeds, the entries of ``final`` that belong to the set (``owns(name)``, or
    staged under the same name) make way for every staged entry, ``last`` (the manifest) moved in
    after all the others, with SIGINT and SIGTERM held back meanwhile; a failure while moving puts
    the previous set back. Other entries of ``final`` (another command's files) stay untouched.
    When the body fails or is interrupted, ``final`` is not touched; an EffdeployError that names
    a staged file names it under ``final``. The staging folder is always removed.
    """
    given = Path(final)
    final = Path(os.path.abspath(final))
    beside = final.parent
    beside.mkdir(parents=True, exist_ok=True)
    where = final if os.path.ismount(final) else beside  # renames stay on one file system
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=where))
    try:
        yield stage
        _commit(stage, final, owns or (lambda _name: False), last)
    except EffdeployError as err:
        raise EffdeployError(relocate(str(err), stage, given)) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def relocate(obj, old: Path, new: Path):
    """``obj`` (a string, or JSON-like lists and dicts of them) with every mention of the folder
    ``old`` replaced by ``new``: what a run staged in ``old`` recorded, as it will be found."""
    if isinstance(obj, str):
        return obj.replace(str(old), str(new))
    if isinstance(obj, dict):
        return {k: relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(relocate(v, old, new) for v in obj)
    return obj


def relocate_json_file(path: Path, old: Path, new: Path) -> None:
    """Rewrite the JSON file ``path`` in place (atomically) with ``old`` mentioned as ``new``."""
    text = path.read_text()
    escaped_old, escaped_new = json.dumps(str(old))[1:-1], json.dumps(str(new))[1:-1]
    if escaped_old in text:
        atomic_write_text(path, text.replace(escaped_old, escaped_new))


def _commit(stage: Path, final: Path, owns: Callable[[str], bool], last: str | None) -> None:
    staged = sorted(os.listdir(stage), key=lambda n: (n == last, n))
    with hold_signals():
        final.mkdir(parents=True, exist_ok=True)
        previous = stage / ".effdeploy-previous"
        previous.mkdir()
        old = [n for n in os.listdir(final) if n in staged or owns(n)]
        old.sort(key=lambda n: n != last)  # the old manifest leaves first
        moved_out: list[str] = []
        moved_in: list[str] = []
        try:
            for name in old:
                os.replace(final / name, previous / name)
                moved_out.append(name)
            for name in staged:
                os.replace(stage / name, final / name)
                moved_in.append(name)
        except BaseException:
            for name in reversed(moved_in):
                os.replace(final / name, stage / name)
            for name in moved_out:
                os.replace(previous / name, final / name)
            raise

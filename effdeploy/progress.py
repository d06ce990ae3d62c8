"""Progress for long work: a tqdm bar on a terminal; in CI logs and pipes, one plain line at most
every ``LOG_INTERVAL_S`` seconds (a 40-minute AdaRound run should not look like a hang).
``EFFDEPLOY_PROGRESS=0`` silences both."""

from __future__ import annotations

import os
import sys
import time

LOG_INTERVAL_S = 60.0
_label = ""


def set_label(label: str) -> None:
    """Name this process's work in front of its progress lines (a worker of a parallel run)."""
    global _label
    _label = f"[{label}] " if label else ""


class _Logged:
    """The plain-line form of a bar: iterates, logs its position now and then (never when
    ``quiet``), and keeps the postfix (``set_postfix``) a bar would show."""

    def __init__(self, iterable, desc: str, unit: str, total: int | None, quiet: bool = False) -> None:
        self.iterable, self.desc, self.unit, self.quiet = iterable, desc, unit, quiet
        if total is None:
            try:
                total = len(iterable)
            except TypeError:
                total = None
        self.total = total
        self.postfix = ""

    def set_postfix(self, **values) -> None:
        self.postfix = " " + ", ".join(f"{k}={v}" for k, v in values.items())

    def __iter__(self):
        start = last = time.monotonic()
        for i, item in enumerate(self.iterable):
            now = time.monotonic()
            if not self.quiet and now - last >= LOG_INTERVAL_S:
                last = now
                of = f"/{self.total}" if self.total is not None else ""
                eta = ""
                if self.total and i:
                    eta = f", ETA {_duration((now - start) / i * (self.total - i))}"
                line = f"  {_label}{self.desc}: {i}{of} {self.unit} ({now - start:.0f} s{eta}){self.postfix}"
                print(line, file=sys.stderr, flush=True)
            yield item


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def progress(iterable, *, desc: str = "", unit: str = "it", total: int | None = None, **kw):
    quiet = os.environ.get("EFFDEPLOY_PROGRESS", "") == "0"
    if quiet or not sys.stderr.isatty():
        return _Logged(iterable, desc or "progress", unit, total, quiet=quiet)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=f"{_label}{desc}", unit=unit, total=total, leave=False, dynamic_ncols=True, **kw)

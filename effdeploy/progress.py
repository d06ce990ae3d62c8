"""Progress bars for long work: tqdm on a terminal, silent in CI and pipes."""

from __future__ import annotations

import os
import sys


def progress(iterable, *, desc: str = "", unit: str = "it", total: int | None = None, **kw):
    from tqdm.auto import tqdm

    disable = os.environ.get("EFFDEPLOY_PROGRESS", "") == "0" or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable, leave=False, dynamic_ncols=True, **kw)

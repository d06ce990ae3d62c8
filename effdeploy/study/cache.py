"""Sweep cells keyed by the content of what they read: a cell runs again only when one of its
inputs changed (checkpoint bytes, calibration bytes, the evaluation images, a config value, the
quantizer's code), never because a file was touched or a path was retyped elsewhere.

A cell is one quantization run: a model (its config, optionally another checkpoint) at one
precision, with changes to the config (``overrides``: e.g. a method pass switched off). Its result
directory ``<root>/cells/<key[:16]>/`` holds outputs.npz, report.json and, written last, cell.json
(the inputs described): a directory with cell.json is a finished cell.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effdeploy.config import RunConfig, deep_merge, load_yaml, parse
from effdeploy.errors import EffdeployError

CELL_FILE = "cell.json"
KEY_CHARS = 16  # of the SHA-256 hex digest, in the directory name


class MissingInput(Exception):
    """An input of a cell does not exist (yet): the cell is skipped with this one-line reason."""


@dataclass(frozen=True)
class Cell:
    """One model at one precision. ``overrides`` are nested changes merged into the config file's
    contents (``{"checkpoint": ..., "quant": {"peers": False}}``)."""

    label: str  # e.g. "after_s1/w8a8": how reports and --only name it
    config: Path
    precision: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def resolve_run(cell: Cell) -> RunConfig:
    """The run config the cell quantizes: the file, its overrides, and only the cell's precision."""
    data = deep_merge(load_yaml(cell.config), cell.overrides)
    data = deep_merge(data, {"quant": {"precisions": [cell.precision]}})
    data.setdefault("name", Path(cell.config).stem)
    return parse(RunConfig, data, f"{cell.config} ({cell.label})")


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) within one process."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def data_identity(source: str | Path) -> dict:
    """Cheap identity of evaluation images: a folder by its path and sorted (file, size) list, a
    single file (a calibration set used as eval data) by its bytes."""
    source = Path(source)
    if source.is_file():
        return {"path": str(source), "sha256": file_sha256(source)}
    if not source.is_dir():
        raise MissingInput(f"evaluation data not found: {source}")
    listing = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath, name)
            listing.append(f"{p.relative_to(source).as_posix()}\t{p.stat().st_size}")
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()
    return {"path": str(source), "files": len(listing), "listing_sha256": digest}


def code_version() -> str:
    """The package version plus a hash of the quantizer's sources (effdeploy/quant/*.py)."""
    import effdeploy

    quant = Path(effdeploy.__file__).parent / "quant"
    h = hashlib.sha256()
    for path in sorted(quant.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{effdeploy.__version__}+quant.{h.hexdigest()[:12]}"


def cell_inputs(cell: Cell, run: RunConfig) -> dict:
    """What the cell reads, described by content. Raises MissingInput when a file is not there."""
    if run.checkpoint is None:
        raise EffdeployError(f"{cell.config}: no `checkpoint:` for cell {cell.label}")
    ckpt = Path(run.checkpoint)
    if not ckpt.is_file():
        raise MissingInput(f"checkpoint not there yet: {ckpt}")
    cal = Path(run.quant.calibration)
    if not cal.is_file():
        raise MissingInput(f"calibration set not found: {cal}")
    eval_source = run.quant.eval_data or run.data.test
    if eval_source is None:
        raise EffdeployError(f"{cell.config}: quant.eval_data (or data.test) is needed for cell {cell.label}")
    return {
        "label": cell.label,
        "config_file": str(cell.config),
        "precision": cell.precision,
        "checkpoint": {"path": str(ckpt), "sha256": file_sha256(ckpt), "bytes": ckpt.stat().st_size},
        "calibration": {"path": str(cal), "sha256": file_sha256(cal)},
        "eval_data": data_identity(eval_source),
        "config": json.loads(run.model_dump_json()),
        "code_version": code_version(),
    }


def cell_key(inputs: Mapping) -> str:
    """SHA-256 over the inputs, less the label and the config file's name (which name the cell
    but do not change what it computes)."""
    keyed = {k: v for k, v in inputs.items() if k not in ("label", "config_file")}
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cells_root(root: str | Path) -> Path:
    return Path(root) / "cells"


def cell_dir(root: str | Path, key: str) -> Path:
    return cells_root(root) / key[:KEY_CHARS]


def is_done(root: str | Path, key: str) -> bool:
    return (cell_dir(root, key) / CELL_FILE).is_file()

"""Decoded image arrays: a labelled image list decoded once through the model's preprocessing
into uint8 pixels (N, H, W, 3), cached on disk, and split deterministically.

Training on a 2-core CPU cannot afford to decode JPEGs every epoch; CIFAR-10 train decodes to
150 MB of uint8, which fits in memory many times over. The cache key covers the exact file
list (with each file's size and modification time) and the preprocessing, so a stale cache
can never be used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effdeploy.config import PreprocessConfig
from effdeploy.data.folders import ImageList, scan_labelled
from effdeploy.data.preprocess import load_rgb, normalize, to_pixels
from effdeploy.fileio import atomic_path
from effdeploy.progress import progress


@dataclass
class PixelDataset:
    """Images as uint8 NHWC pixels at the model's resolution, with integer labels."""

    pixels: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: tuple[str, ...]
    source: ImageList | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> PixelDataset:
        indices = np.asarray(indices)
        src = self.source.subset(indices) if self.source is not None else None
        return PixelDataset(self.pixels[indices], self.labels[indices], self.class_names, src)

    def inputs(self, pre: PreprocessConfig, indices: np.ndarray | None = None) -> np.ndarray:
        """float32 NCHW model inputs for ``indices`` (all when None)."""
        px = self.pixels if indices is None else self.pixels[indices]
        return normalize(px, pre)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EFFDEPLOY_CACHE", Path.home() / ".cache" / "effdeploy"))


def _cache_key(images: ImageList, pre: PreprocessConfig) -> str:
    geometry = pre.model_dump(include={"resolution", "resize", "crop_pct", "interpolation"})
    h = hashlib.sha256(images.fingerprint().encode() + json.dumps(geometry, sort_keys=True).encode())
    h.update(str(images.root.resolve()).encode())
    # size and modification time of every file: an image rewritten in place invalidates the cache
    for f in images.files:
        st = f.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def decode_images(images: ImageList, pre: PreprocessConfig, desc: str = "decode") -> np.ndarray:
    res = pre.resolution
    out = np.empty((len(images), res, res, 3), dtype=np.uint8)
    for i, f in enumerate(progress(images.files, desc=desc, unit="img")):
        out[i] = to_pixels(load_rgb(f), pre)
    return out


def load_pixels(
    root: str | Path, pre: PreprocessConfig, *, cache: bool = True, cache_dir: Path | None = None
) -> PixelDataset:
    """Scan ``root``, decode every image (or reuse the cache), and return the pixel dataset."""
    images = scan_labelled(root)
    if images.balance_note:
        import sys

        print(f"effdeploy: warning: {images.balance_note}", file=sys.stderr)
    labels = np.asarray(images.labels, dtype=np.int64)
    cache_file = (cache_dir or default_cache_dir()) / f"pixels-{_cache_key(images, pre)}.npy"
    if cache and cache_file.is_file():
        pixels = np.load(cache_file, allow_pickle=False)
        if pixels.shape[0] == len(images):
            return PixelDataset(pixels, labels, images.class_names, images)
    pixels = decode_images(images, pre, desc=f"decode {Path(root).name}")
    if cache:
        with atomic_path(cache_file) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, pixels, allow_pickle=False)
    return PixelDataset(pixels, labels, images.class_names, images)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of every class held out, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n = int(round(len(idx) * fraction))
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def stratified_sample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices spread as evenly as possible over classes, deterministic in ``seed``."""
    classes = np.unique(labels)
    if n > len(labels):
        raise ValueError(f"asked for {n} samples from {len(labels)}")
    rng = np.random.default_rng(seed)
    per = {c: n // len(classes) + (1 if i < n % len(classes) else 0) for i, c in enumerate(classes)}
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        take = min(per[c], len(idx))
        chosen.append(idx[rng.permutation(len(idx))[:take]])
    out = np.concatenate(chosen)
    if len(out) < n:  # small classes could not fill their share: top up from the rest
        rest = np.setdiff1d(np.arange(len(labels)), out)
        out = np.concatenate([out, rest[rng.permutation(len(rest))[: n - len(out)]]])
    return np.sort(out)

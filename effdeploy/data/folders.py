"""Labelled image lists: ImageFolder trees (``root/<class>/*.jpg``) and flat ImageNet-style
folders with a ``classes.tsv`` (``index<TAB>wnid<TAB>name``, files named ``<wnid>_*.JPEG``).

Scanning only lists files; decoding happens in the dataset. Problems are reported, never
silently used: a missing or empty folder and an empty class are errors naming the path; an
unbalanced folder is reported in ``ImageList.balance_note``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from effdeploy.errors import EffdeployError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


@dataclass(frozen=True)
class ImageList:
    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}

    @property
    def balance_note(self) -> str | None:
        """A one-line warning when class sizes differ by more than 2x, else None."""
        present = [n for n in self.counts().values() if n > 0]
        if present and max(present) > 2 * min(present):
            return f"{self.root}: unbalanced classes (smallest {min(present)}, largest {max(present)} images)"
        return None

    def fingerprint(self) -> str:
        """SHA-256 over the relative file names and labels: identifies the exact list."""
        h = hashlib.sha256()
        for f, y in zip(self.files, self.labels, strict=True):
            h.update(f"{f.relative_to(self.root).as_posix()}\t{y}\n".encode())
        return h.hexdigest()

    def subset(self, indices) -> ImageList:
        idx = list(indices)
        return ImageList(
            self.root, tuple(self.files[i] for i in idx), tuple(self.labels[i] for i in idx), self.class_names
        )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(root: str | Path) -> ImageList:
    root = Path(root)
    if not root.is_dir():
        raise EffdeployError(f"{root}: data folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EffdeployError(f"{root}: no class sub-folders (expected ImageFolder layout root/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        imgs = _images_in(root / name)
        if not imgs:
            raise EffdeployError(f"{root / name}: class folder has no images")
        files += imgs
        labels += [i] * len(imgs)
    return ImageList(root, tuple(files), tuple(labels), tuple(classes))


def scan_tsv_folder(root: str | Path) -> ImageList:
    """A flat folder of ``<wnid>_<anything>.<ext>`` images labelled through ``classes.tsv``."""
    root = Path(root)
    tsv = root / "classes.tsv"
    index: dict[str, int] = {}
    names: dict[int, str] = {}
    for lineno, line in enumerate(tsv.read_text().splitlines(), start=1):
        parts = line.split("\t")
        if not line.strip() or not parts[0].strip().isdigit():
            continue
        if len(parts) < 3:
            raise EffdeployError(f"{tsv}:{lineno}: expected index<TAB>wnid<TAB>name")
        index[parts[1]] = int(parts[0])
        names[int(parts[0])] = parts[2]
    if not index:
        raise EffdeployError(f"{tsv}: no classes listed")
    class_names = tuple(names.get(i, "") for i in range(max(names) + 1))
    files, labels = [], []
    for f in _images_in(root):
        wnid = f.name.split("_", 1)[0]
        if wnid not in index:
            raise EffdeployError(f"{f}: file name does not start with a wnid listed in {tsv.name}")
        files.append(f)
        labels.append(index[wnid])
    if not files:
        raise EffdeployError(f"{root}: no images")
    return ImageList(root, tuple(files), tuple(labels), class_names)


def scan_labelled(root: str | Path) -> ImageList:
    """ImageFolder, or a flat folder labelled by classes.tsv when one is present."""
    root = Path(root)
    if (root / "classes.tsv").is_file():
        return scan_tsv_folder(root)
    return scan_image_folder(root)

"""Labelled image lists: ImageFolder trees (``root/<class>/*.jpg``) and flat ImageNet-style
folders with a ``classes.tsv`` (``index<TAB>wnid<TAB>name``, files named ``<wnid>_*.JPEG``).

Scanning only lists files; decoding happens in the dataset. Problems are reported, never
silently used: a missing or empty folder and an empty class are errors naming the path; an
unbalanced folder is reported in ``ImageList.balance_note``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from effdeploy.errors import EffdeployError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}
MAX_CLASS_INDEX = 1_000_000  # classes.tsv indices past this are a typo, not a label space


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

    @property
    def positional(self) -> bool:
        """True when labels are positions among the classes present (ImageFolder), False when a
        classes.tsv states each class's index (absolute, whatever subset is present)."""
        return not (self.root / "classes.tsv").is_file()

    def with_classes(self, class_names: Sequence[str]) -> ImageList:
        """The same images labelled by their class NAME's index in ``class_names`` (a model's
        outputs): a folder holding some of the classes is scored against the right outputs."""
        labels = relabel(self.labels, self.class_names, class_names, self.root)
        return ImageList(self.root, self.files, tuple(int(y) for y in labels), tuple(class_names))


def relabel(labels: Sequence[int], names: Sequence[str], wanted: Sequence[str], source) -> list[int]:
    """Labels indexing ``names`` turned into indices of the same names in ``wanted``; a present
    class that ``wanted`` lacks (or names twice) is an error naming it."""
    if tuple(names) == tuple(wanted):
        return list(labels)
    index: dict[str, int] = {}
    twice = set()
    for i, name in enumerate(wanted):
        if name in index:
            twice.add(name)
        index.setdefault(name, i)
    present = sorted(set(labels))
    if present and not 0 <= present[0] <= present[-1] < len(names):
        raise EffdeployError(f"{source}: labels without class names; cannot match them to the model's classes")
    lacking = [names[y] for y in present if names[y] not in index]
    if lacking:
        shown = ", ".join(repr(n) for n in lacking[:5]) + (", ..." if len(lacking) > 5 else "")
        raise EffdeployError(f"{source}: class(es) {shown} are not among the model's {len(wanted)} classes")
    ambiguous = [names[y] for y in present if names[y] in twice]
    if ambiguous:
        raise EffdeployError(f"{source}: class {ambiguous[0]!r} names two of the model's outputs")
    table = {y: index[names[y]] for y in present}
    return [table[y] for y in labels]


def folder_class_names(root: str | Path) -> tuple[str, ...]:
    """A labelled folder's class names from its layout alone, without listing the images: the
    class sub-folders in sorted order (ImageFolder) or the names in classes.tsv."""
    root = Path(root)
    if (root / "classes.tsv").is_file():
        return _read_tsv(root / "classes.tsv")[1]
    if not root.is_dir():
        raise EffdeployError(f"{root}: data folder not found")
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))


def _read_tsv(tsv: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """classes.tsv as (wnid -> index, class names by index)."""
    try:
        text = tsv.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EffdeployError(f"{tsv}: not a text file (not valid UTF-8)") from None
    index: dict[str, int] = {}
    names: dict[int, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split("\t")
        if not line.strip() or not parts[0].strip().isdigit():
            continue
        if len(parts) < 3:
            raise EffdeployError(f"{tsv}:{lineno}: expected index<TAB>wnid<TAB>name")
        i = int(parts[0])
        if i > MAX_CLASS_INDEX:
            raise EffdeployError(f"{tsv}:{lineno}: class index {i} is past {MAX_CLASS_INDEX}")
        index[parts[1]] = i
        names[i] = parts[2]
    if not index:
        raise EffdeployError(f"{tsv}: no classes listed")
    return index, tuple(names.get(i, "") for i in range(max(names) + 1))


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
    index, class_names = _read_tsv(tsv)
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

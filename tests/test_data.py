"""effdeploy.data: folder scanning, image decoding and conversion, preprocessing, splits,
the pixel cache, and the one-line errors bad data gives (in the library and through the CLI)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from effdeploy.config import PreprocessConfig
from effdeploy.data.datasets import load_pixels, stratified_sample, stratified_split
from effdeploy.data.folders import scan_labelled
from effdeploy.data.preprocess import load_rgb, normalize, to_pixels
from effdeploy.errors import EffdeployError

PRE32 = PreprocessConfig(resolution=32, resize="resize", interpolation="bilinear")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the pixel cache out of ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EFFDEPLOY_CACHE", str(cache))
    return cache


def make_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (32, 32), ext: str = "png") -> Path:
    """An ImageFolder of random-colour images: ``counts`` maps class name -> number of images."""
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:04d}.{ext}")
    return root


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(EffdeployError) as err:
        scan_labelled(missing)
    assert str(missing) in _one_line(err)


def test_folder_without_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    with pytest.raises(EffdeployError) as err:
        scan_labelled(root)
    msg = _one_line(err)
    assert str(root) in msg and "class" in msg


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    (root / "emu").mkdir()
    (root / "emu" / "notes.txt").write_text("not an image")
    with pytest.raises(EffdeployError) as err:
        scan_labelled(root)
    assert str(root / "emu") in _one_line(err)


def test_truncated_jpeg_names_file(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = tmp_path / "trunc.jpg"
    bad.write_bytes(buf.getvalue()[:100])
    with pytest.raises(EffdeployError) as err:
        load_rgb(bad)
    assert str(bad) in _one_line(err)


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("hello, I am not a JPEG\n")
    with pytest.raises(EffdeployError) as err:
        load_rgb(bad)
    msg = _one_line(err)
    assert str(bad) in msg and "not an image" in msg


def test_missing_image_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EffdeployError) as err:
        load_rgb(tmp_path / "gone.png")
    assert str(tmp_path / "gone.png") in _one_line(err)


def test_corrupt_image_inside_folder_fails_load_pixels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "b" / "zz.jpg").write_text("garbage")
    with pytest.raises(EffdeployError) as err:
        load_pixels(root, PRE32)
    assert str(root / "b" / "zz.jpg") in _one_line(err)


# --------------------------------------------------------------------------- conversions


def _roundtrip(tmp_path: Path, img: Image.Image, name: str) -> np.ndarray:
    path = tmp_path / name
    img.save(path)
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    px = to_pixels(rgb, PreprocessConfig(resolution=img.size[0], resize="resize"))
    assert px.dtype == np.uint8 and px.shape == (img.size[1], img.size[0], 3)
    return px


def test_grayscale_loads_as_rgb(tmp_path: Path) -> None:
    px = _roundtrip(tmp_path, Image.new("L", (16, 16), 100), "gray.png")
    assert (px == 100).all()
    assert tuple(px[3, 5]) == (100, 100, 100)


def test_palette_loads_as_rgb(tmp_path: Path) -> None:
    img = Image.new("RGB", (16, 16), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert img.mode == "P"
    px = _roundtrip(tmp_path, img, "pal.png")
    assert tuple(px[0, 0]) == (200, 30, 60)


def test_cmyk_loads_as_rgb(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # pure magenta
    px = _roundtrip(tmp_path, img, "cmyk.jpg")
    r, g, b = (int(v) for v in px[8, 8])
    assert r > 240 and g < 15 and b > 240


def test_rgba_transparent_composites_on_white(tmp_path: Path) -> None:
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[..., 0] = 10  # fully transparent dark red -> white
    arr[:8, :, :] = (0, 0, 255, 255)  # opaque blue top half stays blue
    px = _roundtrip(tmp_path, Image.fromarray(arr, "RGBA"), "rgba.png")
    assert (px[8:] == 255).all()
    assert (px[:8] == (0, 0, 255)).all()


def test_16bit_loads_as_rgb(tmp_path: Path) -> None:
    arr = np.zeros((16, 16), dtype=np.uint16)
    arr[:, 8:] = 65535
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    px = _roundtrip(tmp_path, img, "deep.png")
    assert (px[:, :8] == 0).all() and (px[:, 8:] == 255).all()


# --------------------------------------------------------------------------- balance


def test_unbalanced_folder_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "data", {"a": 10, "b": 2})
    images = scan_labelled(root)
    assert images.counts() == {"a": 10, "b": 2}
    note = images.balance_note
    assert isinstance(note, str) and "\n" not in note and str(root) in note
    capsys.readouterr()
    data = load_pixels(root, PRE32)
    assert len(data) == 12
    err = capsys.readouterr().err
    assert "warning" in err and note in err


def test_balanced_folder_has_no_note(tmp_path: Path) -> None:
    assert scan_labelled(make_folder(tmp_path / "data", {"a": 3, "b": 2})).balance_note is None


# --------------------------------------------------------------------------- preprocessing


def test_center_crop_shape(tmp_path: Path) -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    assert img.size == (64, 48)
    for res in (16, 32, 40):
        px = to_pixels(img, PreprocessConfig(resolution=res, resize="center_crop"))
        assert px.shape == (res, res, 3) and px.dtype == np.uint8
    tall = img.transpose(Image.Transpose.ROTATE_90)
    assert to_pixels(tall, PreprocessConfig(resolution=32)).shape == (32, 32, 3)


def test_center_crop_takes_the_centre() -> None:
    # a 64x32 image whose left and right quarters are black and middle half white: resized so the
    # short side is 32 / 0.875 -> 36, the centre crop lies inside the white band
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, 16:48] = 255
    px = to_pixels(Image.fromarray(arr), PreprocessConfig(resolution=16, crop_pct=1.0, interpolation="bilinear"))
    assert px.shape == (16, 16, 3)
    assert (px[:, 4:12] == 255).all()


def test_normalize_layout_and_values() -> None:
    pre = PreprocessConfig(resolution=8, mean=(0.5, 0.25, 0.125), std=(0.2, 0.3, 0.4))
    px = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    x = normalize(px, pre)
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 4) and x.flags.c_contiguous
    n, c, h, w = 1, 2, 3, 1
    want = (np.float32(px[n, h, w, c]) / np.float32(255.0) - np.float32(pre.mean[c])) / np.float32(pre.std[c])
    assert x[n, c, h, w] == want
    np.testing.assert_allclose(x[0, 0], (px[0, ..., 0] / 255.0 - 0.5) / 0.2, rtol=1e-5, atol=1e-6)
    single = normalize(px[1], pre)  # HWC -> CHW
    assert single.shape == (3, 4, 4)
    np.testing.assert_array_equal(single, x[1])


# --------------------------------------------------------------------------- splits


LABELS = np.array([0] * 20 + [1] * 10 + [2] * 7 + [3] * 3)


def test_stratified_split_properties() -> None:
    labels = np.random.default_rng(0).permutation(LABELS)
    keep, held = stratified_split(labels, 0.3, seed=5)
    keep2, held2 = stratified_split(labels, 0.3, seed=5)
    np.testing.assert_array_equal(keep, keep2)
    np.testing.assert_array_equal(held, held2)
    assert len(np.intersect1d(keep, held)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    assert (np.diff(keep) > 0).all() and (np.diff(held) > 0).all()
    for c in np.unique(labels):
        total = int((labels == c).sum())
        assert int((labels[held] == c).sum()) == round(total * 0.3)
    other_keep, other_held = stratified_split(labels, 0.3, seed=6)
    assert not np.array_equal(held, other_held)
    assert len(other_held) == len(held)


def test_stratified_split_zero_fraction() -> None:
    keep, held = stratified_split(LABELS, 0.0, seed=0)
    assert len(held) == 0
    np.testing.assert_array_equal(keep, np.arange(len(LABELS)))


def test_stratified_sample_properties() -> None:
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(4), 25))
    for n in (1, 7, 10, 13, 50, 100):
        idx = stratified_sample(labels, n, seed=3)
        assert len(idx) == n
        assert len(np.unique(idx)) == n
        assert (np.diff(idx) > 0).all()
        counts = np.bincount(labels[idx], minlength=4)
        assert counts.max() - counts.min() <= 1, (n, counts)
        np.testing.assert_array_equal(idx, stratified_sample(labels, n, seed=3))
    assert not np.array_equal(stratified_sample(labels, 13, seed=3), stratified_sample(labels, 13, seed=4))


def test_stratified_sample_tops_up_small_classes() -> None:
    idx = stratified_sample(LABELS, 20, seed=0)  # class 3 has only 3 images for a share of 5
    assert len(idx) == 20 and len(np.unique(idx)) == 20
    assert (np.bincount(LABELS[idx], minlength=4)[3]) == 3


# --------------------------------------------------------------------------- pixel cache


def test_load_pixels_caches(tmp_path: Path, _cache_dir: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 4, "b": 3}, ext="jpg")
    first = load_pixels(root, PRE32)
    assert first.pixels.shape == (7, 32, 32, 3) and first.pixels.dtype == np.uint8
    np.testing.assert_array_equal(first.labels, [0, 0, 0, 0, 1, 1, 1])
    assert first.class_names == ("a", "b")
    files = sorted(_cache_dir.glob("pixels-*.npy"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = load_pixels(root, PRE32)
    np.testing.assert_array_equal(first.pixels, second.pixels)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert sorted(_cache_dir.glob("pixels-*.npy")) == files
    assert files[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in _cache_dir.iterdir() if p.suffix == ".tmp"]

    other = load_pixels(root, PRE32.model_copy(update={"resolution": 16}))
    assert other.pixels.shape == (7, 16, 16, 3)
    assert len(list(_cache_dir.glob("pixels-*.npy"))) == 2
    # normalisation is not part of the cached pixels: a different mean reuses the file
    load_pixels(root, PRE32.model_copy(update={"mean": (0.1, 0.2, 0.3)}))
    assert len(list(_cache_dir.glob("pixels-*.npy"))) == 2


def test_load_pixels_cache_follows_file_list(tmp_path: Path, _cache_dir: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 3, "b": 3})
    load_pixels(root, PRE32)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "b" / "extra.png")
    data = load_pixels(root, PRE32)
    assert len(data) == 7
    assert tuple(data.pixels[-1, 0, 0]) == (1, 2, 3)
    assert len(list(_cache_dir.glob("pixels-*.npy"))) == 2


def test_load_pixels_without_cache_writes_nothing(tmp_path: Path, _cache_dir: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    load_pixels(root, PRE32, cache=False)
    assert not _cache_dir.exists() or not list(_cache_dir.iterdir())


# --------------------------------------------------------------------------- CLI


def test_cli_train_missing_data_folder(tmp_path: Path, repo_root: Path, _cache_dir: Path) -> None:
    missing = tmp_path / "no_such_data"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {
                    "variant": "b0",
                    "width_mult": 0.25,
                    "depth_mult": 0.25,
                    "resolution": 32,
                    "num_classes": 3,
                    "dropout": 0.0,
                    "drop_path_rate": 0.0,
                },
                "data": {"train": str(missing), "test": None},
                "train": {"epochs": 1, "batch_size": 4},
            }
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "effdeploy.cli", "train", "--config", str(cfg), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
        env={**os.environ, "EFFDEPLOY_CACHE": str(_cache_dir), "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("effdeploy: error:")
    assert str(missing) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.rglob("*"))


def test_load_pixels_cache_follows_file_contents(tmp_path: Path, _cache_dir: Path) -> None:
    """An image rewritten in place (same name, new pixels) must not be served from the cache."""
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    target = root / "b" / "0001.png"
    first = load_pixels(root, PRE32)
    Image.new("RGB", (32, 32), (7, 8, 9)).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # edited later
    second = load_pixels(root, PRE32)
    assert (second.pixels[3] == (7, 8, 9)).all()
    np.testing.assert_array_equal(second.pixels[:3], first.pixels[:3])


def test_16bit_keeps_its_brightness(tmp_path: Path) -> None:
    """16-bit values are fractions of 65535: a uniform mid-grey must stay mid-grey, not be
    stretched to white by per-image normalisation."""
    img = Image.fromarray(np.full((16, 16), 25700, dtype=np.uint16))  # 25700 / 257 = 100
    px = _roundtrip(tmp_path, img, "grey16.png")
    assert (px == 100).all(), np.unique(px)
    ramp = Image.fromarray(np.array([[0, 257 * 50, 257 * 200, 65535]] * 16, dtype=np.uint16).repeat(4, axis=1))
    px = _roundtrip(tmp_path, ramp, "ramp16.png")
    assert [int(v) for v in px[0, ::4, 0]] == [0, 50, 200, 255]

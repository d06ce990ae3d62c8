"""The model-owned preprocessing: one implementation used by training, evaluation, calibration
and export metadata, driven by `PreprocessConfig`, so they can never disagree.

Two steps, split so datasets can cache the expensive one:
  ``load_rgb`` + ``to_pixels``: decode, convert to RGB, resize/crop -> uint8 HWC (cacheable)
  ``normalize``: uint8 NHWC -> float32 NCHW, (x/255 - mean) / std
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from effdeploy.config import PreprocessConfig, env_number
from effdeploy.errors import EffdeployError

#: The largest image decoded, in pixels (width x height): 64 megapixels is 192 MB of RGB. Larger
#: files are refused from their header alone, before any pixel is decoded: a 200-megapixel PNG of
#: a few kilobytes must not take 600 MB. EFFDEPLOY_MAX_IMAGE_PIXELS overrides it.
MAX_IMAGE_PIXELS = 64_000_000


def max_image_pixels() -> int:
    value = env_number("EFFDEPLOY_MAX_IMAGE_PIXELS")
    return MAX_IMAGE_PIXELS if value is None else int(value)


def _too_large(path: Path, shape: str, limit: int) -> EffdeployError:
    return EffdeployError(
        f"{path}: image too large ({shape}; the limit is {limit / 1e6:g} megapixels, "
        "EFFDEPLOY_MAX_IMAGE_PIXELS raises it)"
    )


def load_rgb(path: str | Path):
    """Decode an image file to an RGB PIL image, converting grayscale, palette, CMYK and alpha.

    Raises a one-line EffdeployError naming the file when it is not a decodable image
    (a text file with a .jpg name, a truncated JPEG, a missing file) or when its header declares
    more than ``max_image_pixels()`` pixels (checked before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            # PIL's own guard (a warning past MAX_IMAGE_PIXELS, an error past twice that) fires
            # inside Image.open, before the size is known here: both become the same error below
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > limit:
                    raise _too_large(path, f"{img.width} x {img.height} pixels", limit)
                img.load()  # force the full decode here so truncation is caught here
                mode = img.mode
                if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    return Image.alpha_composite(background, rgba).convert("RGB")
                if mode.startswith("I;16"):  # 16-bit: values are fractions of 65535, as 8-bit of 255
                    arr = np.asarray(img, dtype=np.float64) / 257.0
                    return Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).convert("RGB")
                if mode in ("I", "F"):  # range unknown: scale the maximum to 255
                    arr = np.asarray(img, dtype=np.float64)
                    hi = arr.max() if arr.size and arr.max() > 0 else 1.0
                    return Image.fromarray((arr / hi * 255).round().astype(np.uint8)).convert("RGB")
                return img.convert("RGB")
    except FileNotFoundError:
        raise EffdeployError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise EffdeployError(f"{path}: not an image file (cannot identify format)") from None
    except OSError as err:
        raise EffdeployError(f"{path}: corrupt or truncated image ({str(err).splitlines()[0]})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        import re

        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(path, f"{found.group(1)} pixels" if found else "past PIL's bomb guard", limit) from None


def to_pixels(img, cfg: PreprocessConfig) -> np.ndarray:
    """Resize/crop an RGB PIL image to ``cfg.resolution`` square; uint8 HWC."""
    from PIL import Image

    res = cfg.resolution
    resample = Image.BICUBIC if cfg.interpolation == "bicubic" else Image.BILINEAR
    if cfg.resize == "resize":
        if img.size != (res, res):
            img = img.resize((res, res), resample)
    else:
        scale = math.floor(res / cfg.crop_pct)
        w, h = img.size
        if w <= h:
            new_w, new_h = scale, max(scale, round(h * scale / w))
        else:
            new_w, new_h = max(scale, round(w * scale / h)), scale
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample)
        left = (new_w - res) // 2
        top = (new_h - res) // 2
        img = img.crop((left, top, left + res, top + res))
    return np.asarray(img, dtype=np.uint8)


def normalize(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """uint8 HWC or NHWC -> float32 CHW or NCHW, ``(x / 255 - mean) / std``."""
    x = pixels.astype(np.float32) / 255.0
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess_file(path: str | Path, cfg: PreprocessConfig) -> np.ndarray:
    """One image file -> float32 CHW model input."""
    return normalize(to_pixels(load_rgb(path), cfg), cfg)

"""Reading image files safely: one place that turns any file into an upright RGB PIL image or a clear error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images with more pixels than this (decompression bombs); 8k x 8k photos still pass.
MAX_PIXELS = 80_000_000


class ImageError(Exception):
    """An image that cannot be used; str(error) is one line naming the file and the problem."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` fully decoded, EXIF-rotated upright, converted to RGB.

    Raises ImageError with a one-line message for anything that is not a usable image.
    """
    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image")
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    try:
        if p.stat().st_size == 0:
            raise ImageError(f"{p}: empty file (0 bytes)")
        with open(p, "rb") as f:
            return to_rgb(_decode(f, str(p)), str(p))
    except ImageError:
        raise
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read image ({e})") from None


def open_image(fileobj, name: str = "<upload>") -> Image.Image:
    """Like load_image, for an open binary file object (uploads)."""
    return to_rgb(_decode(fileobj, name), name)


def _decode(fileobj, name: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fileobj)
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{name}: image too large ({w}x{h} pixels, limit {MAX_PIXELS:,}): possible decompression bomb")
            img.load()
            return img
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        msg = "not a recognised image format" if isinstance(e, UnidentifiedImageError) else f"decompression bomb ({e})"
        raise ImageError(f"{name}: {msg}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """EXIF-transpose and convert any mode (P, RGBA, CMYK, I;16, L, ...) to 8-bit RGB; first frame of animations."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose the picture
        pass
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray((a / hi * 255.0).clip(0, 255).astype("uint8"), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")

"""Reading image files safely: one place that turns any file into an upright RGB PIL image or a clear error."""

from __future__ import annotations

import os
import re
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

# Refuse images with more pixels than this (decompression bombs); 8k x 8k photos still pass.
MAX_PIXELS = 80_000_000

# The only formats imcap opens (Pillow format ids; PPM covers PBM/PGM/PPM), all decoded by Pillow itself.
# Anything else is refused before a decoder runs, whatever the file's name: EPS would hand the file to
# Ghostscript (an external program), and the exotic decoders (PSD, FITS, ...) are attack surface for no use.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
NOT_AN_IMAGE = f"not a recognised image format (supported: {', '.join(FORMATS)})"


class ImageError(Exception):
    """An image that cannot be used; str(error) is one line naming the file and the problem."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open `path` fully decoded, EXIF-rotated upright, converted to RGB.

    Raises ImageError with a one-line message for anything that is not a usable image.
    """
    p = Path(path)
    with _opened(p) as f:
        return _to_rgb_checked(_decode(f, str(p)), str(p))


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of `path`, checked as load_image checks it but from the header alone, nothing decoded:
    fast on 100k images (`imcap prepare`), though a truncated body is not noticed (the feature store marks
    such an image failed). Raises ImageError with load_image's one-line messages."""
    p = Path(path)
    with _opened(p) as f, _decode(f, str(p), load=False) as img:
        w, h = img.size
    if w * h == 0:
        raise ImageError(f"{p}: unusable image size {w}x{h}")
    return w, h


@contextmanager
def _opened(p: Path) -> Iterator[BinaryIO]:
    """`p` open for reading once check_file passes; an OSError opening it is an ImageError naming it."""
    try:
        check_file(p)
        with open(p, "rb") as f:
            yield f
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read image ({e.strerror or e})") from None


def check_file(p: Path) -> None:
    """ImageError unless `p` is a non-empty regular file (a FIFO or device would block or never end)."""
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError(f"{p}: no such file") from None
    except PermissionError:
        raise ImageError(f"{p}: permission denied") from None
    except (OSError, ValueError) as e:  # e.g. file name too long, symlink loop, NUL in the name
        raise ImageError(f"{p}: cannot read image ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{p}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{p}: not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")


def open_image(fileobj, name: str = "<upload>") -> Image.Image:
    """Like load_image, for an open binary file object (uploads)."""
    return _to_rgb_checked(_decode(fileobj, name), name)


def _to_rgb_checked(img: Image.Image, name: str) -> Image.Image:
    try:
        return to_rgb(img, name)
    except Exception as e:  # noqa: BLE001 - an exotic mode PIL cannot convert: the file's problem, one line
        raise ImageError(f"{name}: cannot convert a {img.mode} image to RGB ({e})") from None


def _decode(fileobj, name: str, load: bool = True) -> Image.Image:
    """The image in `fileobj`, decoded (load=False: its header only); ImageError naming `name` otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_header(fileobj, name)
            if load:
                img.load()
            return img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise bomb_error(name, e) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: corrupt or truncated image ({_one_line(e)})") from None
    except MemoryError:
        raise ImageError(f"{name}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - a PIL plugin tripping over a corrupt file (EOFError, struct.error, ...)
        raise ImageError(f"{name}: corrupt image ({type(e).__name__}: {_one_line(e)})") from None


def open_header(fileobj, name: str) -> Image.Image:
    """Image.open of a file or path limited to FORMATS, header read, nothing decoded; ImageError for another
    format or for more than MAX_PIXELS. PIL's own errors (a corrupt header, a bomb) are left to the caller."""
    try:
        img = Image.open(fileobj, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: {NOT_AN_IMAGE}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise ImageError(f"{name}: image too large ({w}x{h} pixels, limit {MAX_PIXELS:,}): possible decompression bomb")
    return img


def bomb_error(name: str, e: Exception) -> ImageError:
    """The ImageError for PIL's DecompressionBombError/Warning."""
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(pixels[1]):,} pixels, limit {MAX_PIXELS:,}" if pixels else _one_line(e)
    return ImageError(f"{name}: image too large ({size}): possible decompression bomb")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] or type(e).__name__


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """EXIF-transpose and convert any mode (P, RGBA, CMYK, I;16, L, ...) to 8-bit RGB; first frame of animations."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not lose the picture
        pass
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.nan_to_num(np.asarray(img, dtype=np.float32))
        # 16-bit data scaled from 0-65535, 8-bit from 0-255, floats from 0-1
        hi = 65535.0 if a.max() > 255 else 255.0 if a.max() > 1 or img.mode != "F" else 1.0
        img = Image.fromarray((a / hi * 255.0).clip(0, 255).astype("uint8"), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")

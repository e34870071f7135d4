"""load_image: every kind of file becomes an upright RGB image or one clear ImageError line."""

import io

import numpy as np
import pytest
from PIL import Image

from imcap.images import MAX_PIXELS, ImageError, load_image, open_image


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_zero_byte_truncated_text_directory_and_missing(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.getvalue()[:200])
    (tmp_path / "text.jpg").write_text("not an image at all")
    (tmp_path / "folder.jpg").mkdir()
    cases = {"empty.jpg": "empty file", "cut.jpg": "truncated", "text.jpg": "not a recognised image",
             "folder.jpg": "directory", "absent.jpg": "no such file"}
    for name, words in cases.items():
        with pytest.raises(ImageError) as e:
            load_image(tmp_path / name)
        assert name in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    path = save(Image.new("1", (side, side)), tmp_path / "bomb.png")  # 1-bit: tiny file, huge image
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(path)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "LA", "I;16"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (20, 10), (30, 120, 220))
    if mode == "I;16":
        img = Image.fromarray((np.full((10, 20), 40000)).astype(np.uint16))
    else:
        img = img.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = load_image(save(img, tmp_path / f"x.{fmt.lower()}", format=fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(save(img, tmp_path / "t.png"))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = save(img, tmp_path / "r.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).size == (8, 8)


def test_open_image_from_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, "PNG")
    buf.seek(0)
    assert open_image(buf).size == (5, 5)
    with pytest.raises(ImageError, match="upload"):
        open_image(io.BytesIO(b"garbage"))

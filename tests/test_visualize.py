import numpy as np
import pytest
from PIL import Image

from imcap.visualize import TILE_GAP, attention_figure, draw_boxes, heatmap_overlay, save_attention_figure, upsample_attention


def _grey(size=(140, 98)):
    return Image.new("RGB", size, (128, 128, 128))


def _one_hot(i, j, shape=(7, 7)):
    a = np.zeros(shape)
    a[i, j] = 1
    return a


def _luminance(img, box):
    return np.asarray(img.crop(box).convert("L"), dtype=np.float64).mean()


def test_upsample_is_normalised_and_peaks_at_the_hot_cell():
    m = upsample_attention(_one_hot(1, 5) * 0.3, (140, 70))
    assert m.shape == (70, 140) and m.min() >= 0 and m.max() == pytest.approx(1.0)
    y, x = np.unravel_index(m.argmax(), m.shape)
    assert 5 * 20 <= x < 6 * 20 and 1 * 10 <= y < 2 * 10
    nearest = upsample_attention(_one_hot(1, 5), (140, 70), "nearest")
    assert set(np.unique(nearest)) == {0.0, 1.0} and nearest[10:20, 100:120].all()
    assert not upsample_attention(np.zeros((7, 7)), (14, 14)).any()  # no division by zero
    with pytest.raises(ValueError):
        upsample_attention(_one_hot(0, 0), (14, 14), "blocky")


@pytest.mark.parametrize("style", ["heat", "spotlight"])
@pytest.mark.parametrize("upscale", ["smooth", "nearest"])
def test_overlay_is_brighter_where_attention_is_high(style, upscale):
    img = _grey()  # 140 x 98: cells of 20 x 14
    out = heatmap_overlay(img, _one_hot(2, 3), upscale=upscale, style=style)
    assert out.size == img.size and out.mode == "RGB"
    hot = _luminance(out, (60, 28, 80, 42))
    cold = _luminance(out, (0, 84, 20, 98))
    assert hot > cold + 50
    if style == "heat":
        r, g, b = np.asarray(out.crop((66, 32, 74, 38)), dtype=np.float64).mean((0, 1))
        assert r > b and g > b  # hot end of the colour map: yellow


def test_overlay_accepts_any_mode():
    out = heatmap_overlay(Image.new("L", (30, 20), 200), np.ones((3, 3)))
    assert out.mode == "RGB" and out.size == (30, 20)


def _runs(line, min_len):
    """Lengths of runs of non-white pixels in a 1-D (n, 3) line, keeping those at least min_len long."""
    dark = (line < 250).any(axis=-1)
    runs, n = [], 0
    for d in list(dark) + [False]:
        if d:
            n += 1
        else:
            if n >= min_len:
                runs.append(n)
            n = 0
    return runs


def _count_tiles(fig, tile):
    px = np.asarray(fig)
    x_mid = TILE_GAP + tile // 2  # centre of the first column
    column = px[:, x_mid]
    rows, y, dark = [], 0, (column < 250).any(axis=-1)
    while y < len(dark):  # the top of each tile in the first column
        if dark[y] and dark[y : y + tile].all():
            rows.append(y)
            y += tile
        y += 1
    return sum(len(_runs(px[y + tile // 2], int(tile * 0.9))) for y in rows)


@pytest.mark.parametrize("n_tokens,columns", [(3, 5), (7, 5), (11, 4)])
def test_figure_has_one_tile_per_token_plus_the_image(n_tokens, columns):
    tokens = [f"w{i}" for i in range(n_tokens - 1)] + ["<end>"]
    alphas = np.random.default_rng(0).random((n_tokens, 7, 7))
    fig = attention_figure(_grey((64, 64)), tokens, alphas, columns=columns, tile=64)
    cols = min(columns, n_tokens + 1)
    assert fig.width == cols * (64 + TILE_GAP) + TILE_GAP
    assert _count_tiles(fig, 64) == n_tokens + 1


def test_figure_rows_grow_with_tokens_and_non_square_images_fit():
    img = _grey((200, 100))
    a = np.full((6, 7, 7), 1 / 49)
    one_row = attention_figure(img, ["a"] * 4, a, caption="x", columns=5, tile=50)
    two_rows = attention_figure(img, ["a"] * 5, a, caption="x", columns=5, tile=50)
    assert two_rows.width == one_row.width and two_rows.height > one_row.height + 50
    with pytest.raises(ValueError):
        attention_figure(img, ["a"] * 7, a)


def test_save_attention_figure_writes_a_png(tmp_path):
    path = save_attention_figure(tmp_path / "sub" / "fig.png", _grey(), ["a", "cat", "<end>"], np.random.rand(3, 7, 7), tile=48)
    assert path == tmp_path / "sub" / "fig.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width == 4 * (48 + TILE_GAP) + TILE_GAP
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary file left


def test_draw_boxes_outlines_the_box():
    img = Image.new("RGB", (100, 100), (255, 255, 255))
    out = draw_boxes(img, [{"shape": "circle", "color": "red", "size": "large", "box": [20, 30, 60, 80]}])
    assert out.size == img.size and img.getpixel((20, 55)) == (255, 255, 255)
    assert out.getpixel((20, 55)) == (0, 0, 0) and out.getpixel((40, 55)) == (255, 255, 255)


def figure(words: list[str], caption: str | None = None) -> np.ndarray:
    """The attention figure of a black image with these words, as pixels."""
    alphas = np.full((len(words), 7, 7), 1 / 49)
    return np.asarray(attention_figure(Image.new("RGB", (64, 64)), words, alphas, caption=caption))


def test_attention_figure_font_draws_vietnamese_accents():
    accented = figure(["một", "người"])
    assert not np.array_equal(accented, figure(["mot", "nguoi"]))  # the accents are drawn
    assert not np.array_equal(accented, figure(["m\U000f0000t", "ngư\U000f0000i"]))  # not the missing-glyph box


def _cjk_font_installed() -> bool:
    from imcap.visualize import _CJK_FONTS
    from PIL import ImageFont

    for name in _CJK_FONTS:
        try:
            ImageFont.truetype(name, 12)
            return True
        except OSError:
            continue
    return False


@pytest.mark.skipif(not _cjk_font_installed(), reason="no CJK font installed (make test installs fonts-wqy-microhei as root)")
def test_attention_figure_draws_chinese_words_as_glyphs_and_wraps_them(monkeypatch):
    monkeypatch.delenv("IMCAP_FONT", raising=False)
    dog, cat = figure(["狗", "跑"]), figure(["猫", "跑"])
    assert dog.shape == cat.shape and not np.array_equal(dog, cat)  # two glyphs, not twice the missing-glyph box
    short = figure(["狗", "跑"], caption="狗跑")
    long = figure(["狗", "跑"], caption="一只黑色的狗在绿色的草地上奔跑着追一个红色的球" * 3)
    assert long.shape[1] == short.shape[1] and long.shape[0] > short.shape[0]  # wrapped between characters


def test_chinese_words_without_a_chinese_font_warn_once(monkeypatch):
    import imcap.visualize as visualize

    monkeypatch.setattr(visualize, "_CJK_FONTS", ())
    monkeypatch.delenv("IMCAP_FONT", raising=False)
    visualize._warn_no_cjk_font.cache_clear()
    with pytest.warns(RuntimeWarning, match="no font with Chinese characters"):
        attention_figure(Image.new("RGB", (64, 64)), ["狗", "跑"], np.full((2, 7, 7), 1 / 49), caption="狗跑")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_figure(Image.new("RGB", (64, 64)), ["狗"], np.full((1, 7, 7), 1 / 49), caption="狗")  # once only
        attention_figure(Image.new("RGB", (64, 64)), ["dog"], np.full((1, 7, 7), 1 / 49))  # English: never
    visualize._warn_no_cjk_font.cache_clear()

"""Attention pictures: where the decoder looked for each word, drawn over the image (Xu et al. 2015, figs. 2-3).

PIL and numpy only. An attention map `alpha` is the (h, w) grid of the encoder (7 x 7 for EfficientNet-Lite0
at 224 px) and is assumed to cover the whole image as the encoder saw it (the image resized, not cropped).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

# Matplotlib's "inferno" sampled at 9 evenly spaced points (black -> purple -> orange -> pale yellow),
# interpolated to 256 entries: perceptually uniform and readable in grey.
_INFERNO_ANCHORS = np.array(
    [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
     (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164)], dtype=np.float64)  # fmt: skip
INFERNO = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO_ANCHORS)), _INFERNO_ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.float32)  # (256, 3)

TILE_GAP = 6  # pixels between tiles and around the figure
_BACKGROUND = (255, 255, 255)
_SPECIAL = {"<start>", "<end>", "<pad>"}


# Fonts with the accents of Vietnamese and most Latin/Greek/Cyrillic scripts, then CJK ones (Chinese captions),
# looked up by file name in the system's font folders; IMCAP_FONT (a .ttf/.ttc path) comes first when set.
# Pillow's own default font has ASCII only: Vietnamese or Chinese words would be drawn as empty boxes.
_FONTS = ("DejaVuSans.ttf", "NotoSans-Regular.ttf", "Arial Unicode.ttf", "arialuni.ttf", "Arial.ttf", "arial.ttf")
_CJK_FONTS = ("NotoSansCJK-Regular.ttc", "NotoSansCJKsc-Regular.otf", "wqy-microhei.ttc", "wqy-zenhei.ttc",
              "msyh.ttc", "simhei.ttf", "PingFang.ttc")


def has_cjk(text: str) -> bool:
    """True when `text` holds a CJK ideograph (Chinese; Japanese kanji)."""
    return any("\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" for ch in text)


def _font(size: int, text: str = "") -> ImageFont.ImageFont:
    """A scalable font that can draw `text` (CJK fonts first when it holds CJK characters). When `text` holds
    CJK and no CJK font is installed, one warning says so (the words come out as empty boxes)."""
    cjk = has_cjk(text)
    chosen = os.environ.get("IMCAP_FONT")
    for name in filter(None, (chosen, *(_CJK_FONTS + _FONTS if cjk else _FONTS + _CJK_FONTS))):
        try:
            font = ImageFont.truetype(name, size)
            break
        except OSError:
            continue
    else:
        name = None
        try:
            font = ImageFont.load_default(size=size)  # scalable font, Pillow >= 10.1 with FreeType
        except (TypeError, OSError, AttributeError):
            font = ImageFont.load_default()
    if cjk and name != chosen and name not in _CJK_FONTS:
        _warn_no_cjk_font()
    return font


@functools.cache
def _warn_no_cjk_font() -> None:
    warnings.warn("no font with Chinese characters is installed, so the figure's Chinese words are drawn as boxes: "
                  "install one (Debian/Ubuntu: apt install fonts-wqy-microhei or fonts-noto-cjk) or set IMCAP_FONT "
                  "to a .ttf/.ttc/.otf file", RuntimeWarning, stacklevel=4)


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array, edges replicated."""
    if sigma <= 0:
        return x
    r = max(int(3 * sigma), 1)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in (0, 1)]
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return x


def upsample_attention(alpha: np.ndarray, size: tuple[int, int], upscale: Literal["smooth", "nearest"] = "smooth") -> np.ndarray:
    """(H, W) map in [0, 1] (1 at the strongest attention) from an (h, w) grid, for an image of size (W, H).

    "smooth": bicubic upsampling plus a Gaussian blur of a third of a cell, like the paper's figures;
    "nearest": one flat block per grid cell, which shows exactly what the model computed.
    """
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"alpha must be (h, w), got shape {a.shape}")
    a = a / a.max() if a.max() > 0 else np.zeros_like(a)
    W, H = size
    if upscale == "nearest":
        return np.asarray(Image.fromarray(a, "F").resize((W, H), Image.NEAREST))
    if upscale != "smooth":
        raise ValueError(f"upscale must be 'smooth' or 'nearest', got {upscale!r}")
    m = np.asarray(Image.fromarray(a, "F").resize((W, H), Image.BICUBIC), dtype=np.float64)  # (H, W)
    m = _gaussian_blur(m, sigma=min(W / a.shape[1], H / a.shape[0]) / 3)
    m = np.clip(m, 0, None)
    return (m / m.max() if m.max() > 0 else m).astype(np.float32)


def heatmap_overlay(
    image: Image.Image,
    alpha: np.ndarray,
    *,
    upscale: Literal["smooth", "nearest"] = "smooth",
    style: Literal["heat", "spotlight"] = "heat",
    strength: float = 0.6,
) -> Image.Image:
    """`image` (any size) with the (h, w) attention grid drawn over it; same size, RGB.

    "heat": the image blended with the inferno colour map of the attention (dark where the model did not
    look, pale yellow where it looked most); "spotlight": the paper's look, the image kept where attention
    is high and darkened elsewhere. `strength` in [0, 1] is how much the attention shows. An image without
    pixels (0 x N) comes back as it is.
    """
    if 0 in image.size:
        return image.convert("RGB")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    m = upsample_attention(alpha, image.size, upscale)[..., None]  # (H, W, 1)
    if style == "heat":
        colours = INFERNO[np.rint(m[..., 0] * 255).astype(np.int64)]  # (H, W, 3)
        out = (1 - strength) * rgb + strength * colours
    elif style == "spotlight":
        out = rgb * (1 - strength + strength * m)
    else:
        raise ValueError(f"style must be 'heat' or 'spotlight', got {style!r}")
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy wrap of `text` to lines at most `width` pixels wide: at spaces, and inside runs of CJK text
    (written without spaces) between any two characters; a longer single Latin word stays whole."""
    lines: list[str] = []
    for word in text.split():
        pieces = list(word) if has_cjk(word) else [word]
        for k, piece in enumerate(pieces):
            joined = f"{lines[-1]}{piece}" if k else f"{lines[-1]} {piece}" if lines else piece
            if lines and font.getlength(joined) <= width:
                lines[-1] = joined
            else:
                lines.append(piece)
    return lines or [""]


def _fit_label(word: str, font, width: int) -> str:
    while len(word) > 1 and font.getlength(word) > width:
        word = word[:-2] + "…"
    return word


def fit_square(image: Image.Image, side: int) -> Image.Image:
    """`image` resized to fit a side x side square, aspect kept, except that no side is made thinner than
    side / 8 (at least 1 px): a 100000 x 1 strip becomes side x side/8, so its attention still shows. An image
    without pixels becomes a white square."""
    if 0 in image.size:
        return Image.new("RGB", (side, side), _BACKGROUND)
    scale, thinnest = side / max(image.size), max(1, side // 8)
    size = tuple(min(side, max(thinnest, round(n * scale))) for n in image.size)
    return image.convert("RGB").resize(size, Image.BICUBIC)


def _tile(image: Image.Image, tile: int, alpha: np.ndarray | None, **overlay) -> Image.Image:
    """A tile x tile picture: the image fitted inside (fit_square), with the attention over it if given."""
    thumb = fit_square(image, tile)
    if alpha is not None:
        thumb = heatmap_overlay(thumb, alpha, **overlay)
    canvas = Image.new("RGB", (tile, tile), _BACKGROUND)
    canvas.paste(thumb, ((tile - thumb.width) // 2, (tile - thumb.height) // 2))
    return canvas


def attention_figure(
    image: Image.Image,
    tokens: list[str],
    alphas: np.ndarray,
    *,
    caption: str | None = None,
    columns: int = 5,
    tile: int = 160,
    **overlay,
) -> Image.Image:
    """A grid of tiles: the image, then one tile per token with its attention and the token under it.

    tokens: T' words (include "<end>" to show that step); alphas: (T, h, w) with T >= T', alphas[t] the
    attention when tokens[t] was emitted. The caption (default: the tokens without <start>/<end>/<pad>) is
    written above the grid. `overlay` goes to heatmap_overlay (upscale, style, strength).
    """
    alphas = np.asarray(alphas)
    if alphas.ndim != 3 or len(alphas) < len(tokens):
        raise ValueError(f"alphas must be (T, h, w) with T >= {len(tokens)} tokens, got shape {alphas.shape}")
    if caption is None:
        caption = " ".join(t for t in tokens if t not in _SPECIAL)
    n_tiles, gap = 1 + len(tokens), TILE_GAP
    cols = max(1, min(columns, n_tiles))
    rows = -(-n_tiles // cols)
    word_font, caption_font = _font(max(10, tile // 9), caption), _font(max(12, tile // 8), caption)
    width = cols * (tile + gap) + gap
    lines = _wrap(caption, caption_font, width - 2 * gap)
    line_h = caption_font.size + 4 if hasattr(caption_font, "size") else 14
    label_h = (word_font.size if hasattr(word_font, "size") else 11) + 8
    top = gap + len(lines) * line_h + gap
    fig = Image.new("RGB", (width, top + rows * (tile + label_h + gap)), _BACKGROUND)
    draw = ImageDraw.Draw(fig)
    for i, line in enumerate(lines):
        draw.text((gap, gap + i * line_h), line, fill=(0, 0, 0), font=caption_font)
    for k in range(n_tiles):
        x = gap + (k % cols) * (tile + gap)
        y = top + (k // cols) * (tile + label_h + gap)
        alpha = None if k == 0 else alphas[k - 1]
        fig.paste(_tile(image, tile, alpha, **overlay), (x, y))
        label = "(image)" if k == 0 else _fit_label(tokens[k - 1], word_font, tile)
        draw.text((x + (tile - draw.textlength(label, font=word_font)) / 2, y + tile + 4), label, fill=(0, 0, 0), font=word_font)
    return fig


def save_attention_figure(path: str | os.PathLike, image: Image.Image, tokens: list[str], alphas: np.ndarray, **kwargs) -> Path:
    """Write attention_figure(image, tokens, alphas, **kwargs) as a PNG at `path` (atomically); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = attention_figure(image, tokens, alphas, **kwargs)
    with atomic_path(path, fsync=False) as tmp:
        fig.save(tmp, format="PNG")
    return path


def draw_boxes(image: Image.Image, objects: list[dict]) -> Image.Image:
    """A copy of `image` with each object's box outlined and labelled "size colour shape" (synthetic scenes)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = _font(max(10, out.height // 22))
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 0, 0), width=2)
        label = " ".join(str(obj.get(k, "")) for k in ("size", "color", "shape")).strip()
        draw.text((x0 + 2, max(y0 - font.size - 2, 0) if hasattr(font, "size") else y0), label, fill=(0, 0, 0), font=font)
    return out

"""Synthetic scenes: the embedded default dataset (coloured shapes on a plain background, captioned by a grammar).

Each scene is a light, slightly tinted, softly lit background with 1 or 2 non-overlapping objects (half
of the scenes each). An object has a shape (circle, square, triangle, star, cross), a colour (red, green,
blue, yellow, purple, orange), a size (small: 20-25% of the image side, large: 40-48%) and a box in image
pixels, [x0, y0, x1, y1] with x1, y1 exclusive. Everything a caption says is derived from the boxes, so
captions and boxes always agree:

- position of a lone object: the third of the image its box centre falls in, horizontally (left / center /
  right) and vertically (top / middle / bottom), e.g. "on the left", "at the top right", "in the center";
  centres are sampled away from the thirds' borders so the word is never a coin toss.
- relation of two objects: "above" / "below" when their boxes are apart vertically and overlap horizontally
  by at least half the smaller box, "to the left of" / "to the right of" likewise; other layouts are
  resampled, so no diagonal, ambiguous pair exists.

Grammar (each image gets 5 captions from 5 distinct templates of its pool; `N` = "size colour shape",
`n` = "colour shape", article "a"/"an" as English wants):

    one object:   a N P | there is a N P | a n P | P there is a N | the image shows a N P | a N on a plain background
    two objects:  a N1 REL a N2 | a N2 INV a N1 | there is a N1 REL a N2 | a n1 and a n2 | a N1 and a N2
                  | the image shows a N1 REL a N2
                  (object 1 is the top or left one; REL = above | to the left of, INV = below | to the right of)

Paraphrase synonyms, drawn per caption: large ~ big, small ~ little, circle ~ disc (rarely),
"on the left" ~ "on the left side", "in the center" ~ "in the middle", "at the top" ~ "near the top",
"at the top left" ~ "in the top left corner". Every caption names the shape of every object. Captions are
lower case, space-separated, without punctuation: tokens are `raw.split()`.

Generation is seeded per image (numpy Generator seeded by [seed, index]), so scene i is the same whatever
the number of images, and the same seed gives byte-identical images and JSON.

Over 400 lines: the scene renderer, the caption grammar and the object boxes are one generator whose pieces
only make sense together (the captions describe what is drawn, the boxes score attention).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .fileio import atomic_path, write_json_atomic
from .images import open_header

SHAPES = ("circle", "square", "triangle", "star", "cross")
# Distinct hues, saturated enough to stand out on the light background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 25),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
}
# Object side as a fraction of the image side (min, max).
SIZES: dict[str, tuple[float, float]] = {"small": (0.20, 0.25), "large": (0.40, 0.48)}
# Words the grammar uses for each attribute: the first is the usual one, the others are paraphrases.
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {s: (s,) for s in SHAPES} | {"circle": ("circle", "disc")}
HORIZONTAL = ("left", "center", "right")  # thirds of the image width
VERTICAL = ("top", "middle", "bottom")  # thirds of the image height
# (horizontal, vertical) third -> phrases for a lone object; the first is the usual one.
POSITION_PHRASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("center", "middle"): ("in the center", "in the middle"),
    ("left", "middle"): ("on the left", "on the left side"),
    ("right", "middle"): ("on the right", "on the right side"),
    ("center", "top"): ("at the top", "near the top"),
    ("center", "bottom"): ("at the bottom", "near the bottom"),
}
for _v in ("top", "bottom"):
    for _h in ("left", "right"):
        POSITION_PHRASES[(_h, _v)] = (f"at the {_v} {_h}", f"in the {_v} {_h} corner")

_USUAL = 0.7  # probability of the usual word over a paraphrase
_DISC = 0.15  # probability of "disc" for a circle
_SUPERSAMPLE = 4  # shapes are drawn at 4x and averaged down: antialiased edges
_TRIES = 200  # layout attempts before resampling the objects


def object_words(obj: dict) -> set[str]:
    """The words that name `obj` in captions: its shape word and the synonyms the grammar uses for it."""
    return set(SHAPE_WORDS.get(obj["shape"], (obj["shape"],)))


def position_of(box, image_size: tuple[int, int]) -> tuple[str, str]:
    """(horizontal, vertical) third of the image holding the box centre, e.g. ("left", "top")."""
    w, h = image_size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return HORIZONTAL[min(int(3 * cx / w), 2)], VERTICAL[min(int(3 * cy / h), 2)]


def relation(a, b) -> str | None:
    """Where box `a` is relative to box `b`: "above", "below", "left", "right", or None when not clear-cut."""
    ow = min(a[2], b[2]) - max(a[0], b[0])  # horizontal overlap (negative: gap)
    oh = min(a[3], b[3]) - max(a[1], b[1])
    min_w, min_h = min(a[2] - a[0], b[2] - b[0]), min(a[3] - a[1], b[3] - b[1])
    if ow < 0 and oh >= 0.5 * min_h:
        return "left" if a[2] <= b[0] else "right"
    if oh < 0 and ow >= 0.5 * min_w:
        return "above" if a[3] <= b[1] else "below"
    return None


# ----------------------------------------------------------------------------------------------- layout


def _sample_object(rng: np.random.Generator, image_size: int) -> dict:
    size = str(rng.choice(list(SIZES)))
    lo, hi = SIZES[size]
    side = int(round(rng.uniform(lo, hi) * image_size))
    return {"shape": str(rng.choice(SHAPES)), "color": str(rng.choice(list(COLORS))), "size": size, "side": side}


def _box_at(cx: float, cy: float, side: int) -> list[int]:
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    return [x0, y0, x0 + side, y0 + side]


def _place_one(rng: np.random.Generator, obj: dict, image_size: int) -> list[int]:
    """A box whose centre lies in a random third (both ways), at least `margin` away from the thirds' borders."""
    s, half, margin = image_size, obj["side"] / 2, 0.03 * image_size
    centre = []
    for _ in range(2):
        k = int(rng.integers(3))
        lo = max(k * s / 3 + margin, half)
        hi = min((k + 1) * s / 3 - margin, s - half)
        centre.append(rng.uniform(lo, hi))
    return _box_at(centre[0], centre[1], obj["side"])


def _place_two(rng: np.random.Generator, a: dict, b: dict, image_size: int) -> tuple[list[int], list[int]] | None:
    """Two boxes apart by a gap and in a clear-cut relation, or None if `_TRIES` random layouts all failed."""
    gap = 0.04 * image_size
    for _ in range(_TRIES):
        boxes = []
        for obj in (a, b):
            half = obj["side"] / 2
            cx, cy = rng.uniform(half, image_size - half, size=2)
            boxes.append(_box_at(cx, cy, obj["side"]))
        ba, bb = boxes
        apart = max(bb[0] - ba[2], ba[0] - bb[2], bb[1] - ba[3], ba[1] - bb[3])
        if apart >= gap and relation(ba, bb) is not None:
            return ba, bb
    return None


def sample_objects(rng: np.random.Generator, image_size: int = 224, n_objects: int = 1) -> list[dict]:
    """1 or 2 objects with boxes; two objects never share both shape and colour."""
    while True:
        objs = [_sample_object(rng, image_size) for _ in range(n_objects)]
        if n_objects == 1:
            boxes = [_place_one(rng, objs[0], image_size)]
        else:
            if (objs[0]["shape"], objs[0]["color"]) == (objs[1]["shape"], objs[1]["color"]):
                continue
            placed = _place_two(rng, objs[0], objs[1], image_size)
            if placed is None:
                continue
            boxes = list(placed)
        return [{"shape": o["shape"], "color": o["color"], "size": o["size"], "box": bx} for o, bx in zip(objs, boxes)]


# ---------------------------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str) -> list[tuple[float, float]]:
    """Outline of `shape` in the unit box [0, 1]^2, touching all four sides."""
    if shape == "triangle":
        return [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)]
    if shape == "cross":
        t0, t1 = 0.32, 0.68  # arm thickness 0.36
        return [(t0, 0), (t1, 0), (t1, t0), (1, t0), (1, t1), (t1, t1), (t1, 1), (t0, 1), (t0, t1), (0, t1), (0, t0), (t0, t0)]
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.48)  # a fat star: its points stay visible at 7x7
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0))
        return [tuple(p) for p in pts]
    raise ValueError(f"no polygon for shape {shape!r}")


def _shape_mask(shape: str, side: int) -> Image.Image:
    """Antialiased 'L' mask (side x side) of the shape filling its box."""
    big = side * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([0, 0, big - 1, big - 1], fill=255)
    elif shape == "square":
        draw.rectangle([0, 0, big - 1, big - 1], fill=255)
    else:
        draw.polygon([(x * (big - 1), y * (big - 1)) for x, y in _shape_polygon(shape)], fill=255)
    return mask.reduce(_SUPERSAMPLE)


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """(S, S, 3) float: a light tone with a slight tint and gentle gradients (no pixel noise: PNGs stay small)."""
    tone = rng.uniform(222, 245) + rng.uniform(-6, 6, size=3)
    ramp = np.linspace(-1, 1, image_size, dtype=np.float32)
    light = ramp[:, None] * np.float32(rng.uniform(-8, 8)) + ramp[None, :] * np.float32(rng.uniform(-5, 5))  # (S, S)
    return light[..., None] + tone.astype(np.float32)  # (S, S, 3)


def _shading(rng: np.random.Generator, side: int) -> np.ndarray:
    """(s, s, 1) brightness factor around 1: a soft light falling on the object from a random direction."""
    angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.03, 0.10)
    ramp = np.linspace(-1, 1, side)
    light = np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None]  # (s, s)
    return (1 + strength * light / np.sqrt(2))[..., None]


def render_scene(objects: list[dict], rng: np.random.Generator, image_size: int = 224) -> Image.Image:
    """Draw `objects` (with boxes) over a light background; colours jitter slightly per object and are softly lit."""
    img = _background(rng, image_size)  # (S, S, 3)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        colour = np.clip(np.array(COLORS[obj["color"]]) + rng.integers(-10, 11, size=3), 0, 255)
        fill = colour * _shading(rng, x1 - x0)  # (s, s, 3)
        m = np.asarray(_shape_mask(obj["shape"], x1 - x0), np.float32)[..., None] / 255  # (s, s, 1)
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - m) + fill * m
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")  # rounded


def draw_scene(
    seed: int, index: int, image_size: int = 224, n_objects: int | None = None
) -> tuple[Image.Image, list[dict], list[str]]:
    """Scene `index` of dataset `seed`: (image, objects, 5 captions). Same arguments, same scene."""
    rng = np.random.default_rng([seed, index])
    if n_objects is None:
        n_objects = 1 + int(rng.random() < 0.5)
    objects = sample_objects(rng, image_size, n_objects)
    image = render_scene(objects, rng, image_size)
    return image, objects, captions(objects, rng, (image_size, image_size))


# ---------------------------------------------------------------------------------------------- grammar


def _pick(rng: np.random.Generator, words: tuple[str, ...], usual: float = _USUAL) -> str:
    """The usual word (first) with probability `usual`, else one of the paraphrases."""
    if len(words) == 1 or rng.random() < usual:
        return words[0]
    return words[1 + int(rng.integers(len(words) - 1))]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrases(rng: np.random.Generator, obj: dict) -> tuple[str, str]:
    """("size colour shape", "colour shape") with this caption's synonym choices."""
    shape = _pick(rng, SHAPE_WORDS[obj["shape"]], 1 - _DISC)
    colour_shape = f"{obj['color']} {shape}"
    return f"{_pick(rng, SIZE_WORDS[obj['size']])} {colour_shape}", colour_shape


def _one_object_caption(template: int, rng: np.random.Generator, obj: dict, image_size) -> str:
    full, short = _noun_phrases(rng, obj)
    pos = _pick(rng, POSITION_PHRASES[position_of(obj["box"], image_size)])
    return [
        f"{_a(full)} {pos}",
        f"there is {_a(full)} {pos}",
        f"{_a(short)} {pos}",
        f"{pos} there is {_a(full)}",
        f"the image shows {_a(full)} {pos}",
        f"{_a(full)} on a plain background",
    ][template]


def _two_object_caption(template: int, rng: np.random.Generator, first: dict, second: dict) -> str:
    """`first` is the top or left object; the relation words follow from the boxes."""
    rel = relation(first["box"], second["box"])
    forward, backward = ("above", "below") if rel == "above" else ("to the left of", "to the right of")
    (f1, s1), (f2, s2) = _noun_phrases(rng, first), _noun_phrases(rng, second)
    return [
        f"{_a(f1)} {forward} {_a(f2)}",
        f"{_a(f2)} {backward} {_a(f1)}",
        f"there is {_a(f1)} {forward} {_a(f2)}",
        f"{_a(s1)} and {_a(s2)}",
        f"{_a(f1)} and {_a(f2)}",
        f"the image shows {_a(f1)} {forward} {_a(f2)}",
    ][template]


def captions(objects: list[dict], rng: np.random.Generator, image_size: tuple[int, int], n: int = 5) -> list[str]:
    """`n` (<= 6) captions of the scene from `n` distinct templates (see the module docstring)."""
    templates = rng.permutation(6)[:n]
    if len(objects) == 1:
        return [_one_object_caption(int(t), rng, objects[0], image_size) for t in templates]
    if len(objects) != 2:
        raise ValueError(f"the grammar covers 1 or 2 objects, got {len(objects)}")
    first, second = objects
    if relation(first["box"], second["box"]) in ("below", "right"):
        first, second = second, first
    return [_two_object_caption(int(t), rng, first, second) for t in templates]


# --------------------------------------------------------------------------------------------- dataset


def _split_names(n: int, rng: np.random.Generator, val_fraction: float, test_fraction: float) -> list[str]:
    """A shuffled assignment with exactly round(n * fraction) val and test images."""
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n_val + n_test > n:
        raise ValueError(f"val_fraction + test_fraction > 1 ({val_fraction} + {test_fraction})")
    names = np.array(["train"] * n, dtype=object)
    order = rng.permutation(n)
    names[order[:n_val]] = "val"
    names[order[n_val : n_val + n_test]] = "test"
    return names.tolist()


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    with atomic_path(path, fsync=False) as tmp:
        image.save(tmp, format="PNG", compress_level=6)


def make_scenes(
    out_dir: str | os.PathLike,
    n_images: int = 1000,
    seed: int = 0,
    image_size: int = 224,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> Path:
    """Write `out_dir/images/scene_%05d.png` and `out_dir/scenes.json` (Karpathy split format); return the JSON path.

    Half the scenes have one object, half two. Same seed: byte-identical images and JSON.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    splits = _split_names(n_images, np.random.default_rng([seed, 1 << 30]), val_fraction, test_fraction)
    records = []
    for i in range(n_images):
        image, objects, caps = draw_scene(seed, i, image_size)
        filename = f"scene_{i:05d}.png"
        _save_png_atomic(image, out_dir / "images" / filename)
        records.append({
            "filename": filename,
            "filepath": "images",
            "imgid": i,
            "split": splits[i],
            "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
            "objects": objects,
        })
        if progress and ((i + 1) % max(n_images // 10, 1) == 0 or i + 1 == n_images):
            print(f"synth: {i + 1}/{n_images} scenes", file=sys.stderr, flush=True)
    path = out_dir / "scenes.json"
    write_json_atomic(path, {"dataset": "synthetic-scenes", "images": records})
    return path


# ------------------------------------------------------------------------------------------- grounding


def _box_share(box, grid: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(h, w): the fraction of each grid cell's pixel area that lies inside `box` (the grid spans the image)."""
    (h, w), (W, H) = grid, image_size

    def overlap(lo, hi, n, length):  # (n,) overlap of each of n equal cells of [0, length] with [lo, hi]
        edges = np.linspace(0, length, n + 1)
        return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) / (length / n)

    return np.outer(overlap(box[1], box[3], h, H), overlap(box[0], box[2], w, W))


def grounding_score(tokens: list[str], alphas: np.ndarray, objects: list[dict], image_size: tuple[int, int]) -> dict:
    """How much attention each word naming an object puts inside that object's box.

    tokens: T' <= T generated words (may include "<end>"); alphas: (T, h, w), alphas[t] the attention when
    tokens[t] was emitted, over a grid covering the whole image; image_size: (W, H) of the boxes' image.
    A word counts when it names exactly one object of the scene (`object_words`): a shape shared by two
    objects is skipped. Its share is the attention mass inside the box, each cell's mass spread evenly over
    its pixels. Returns {"score": mean share or None, "chance": mean box-area share or None, "words": count,
    "per_word": [{"index", "word", "share", "chance"}]}.
    """
    alphas = np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 3 or len(alphas) < len(tokens):
        raise ValueError(f"alphas must be (T, h, w) with T >= {len(tokens)} tokens, got shape {alphas.shape}")
    W, H = image_size
    per_word = []
    for t, word in enumerate(tokens):
        named = [o for o in objects if word in object_words(o)]
        if len(named) != 1:
            continue
        box = named[0]["box"]
        a = alphas[t]
        total = a.sum()
        share = float((a * _box_share(box, a.shape, image_size)).sum() / total) if total > 0 else 0.0
        x0, y0, x1, y1 = max(box[0], 0), max(box[1], 0), min(box[2], W), min(box[3], H)
        chance = max(x1 - x0, 0) * max(y1 - y0, 0) / (W * H)
        per_word.append({"index": t, "word": word, "share": share, "chance": float(chance)})
    mean = lambda key: float(np.mean([p[key] for p in per_word])) if per_word else None  # noqa: E731
    return {"score": mean("share"), "chance": mean("chance"), "words": len(per_word), "per_word": per_word}


def mean_grounding(results, records: list[dict], image_root: str | Path) -> dict | None:
    """grounding_score over a split: results[i] (a Caption with tokens and alphas) describes records[i].

    Scenes without boxes are skipped; None when no scene has any. Box coordinates are in the pixels of the
    image file, whose size is read from its header.
    """
    shares, chances, words, scored = [], [], 0, 0
    for r, rec in zip(results, records):
        if not rec.get("objects"):
            continue
        path = Path(image_root) / rec["file"]
        with open_header(path, str(path)) as im:  # the one image check: allowed formats only
            size = im.size
        g = grounding_score(r.tokens, r.alphas[: len(r.tokens)], rec["objects"], size)
        if g["score"] is not None:
            shares.append(g["score"])
            chances.append(g["chance"])
            words += g["words"]
            scored += 1
    if not scored:
        return None
    return {"score": float(np.mean(shares)), "chance": float(np.mean(chances)), "images": scored, "words": words}

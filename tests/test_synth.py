import json

import numpy as np
import pytest
from PIL import Image

from imcap import synth
from imcap.synth import COLORS, SHAPES, SIZES, draw_scene, grounding_score, make_scenes, object_words, position_of, relation

S = 224


def _scenes(n=60, seed=0):
    return [draw_scene(seed, i, S) for i in range(n)]


def _read_dir(d):
    files = sorted((d / "images").iterdir())
    return (d / "scenes.json").read_bytes(), {f.name: f.read_bytes() for f in files}


def test_same_seed_is_byte_identical_and_other_seeds_differ(tmp_path):
    a = _read_dir(make_scenes(tmp_path / "a", n_images=8, seed=3, progress=False).parent)
    b = _read_dir(make_scenes(tmp_path / "b", n_images=8, seed=3, progress=False).parent)
    c = _read_dir(make_scenes(tmp_path / "c", n_images=8, seed=4, progress=False).parent)
    assert a == b
    assert a[0] != c[0]
    assert all(a[1][name] != c[1][name] for name in a[1])


def test_scene_does_not_depend_on_the_number_of_images(tmp_path):
    small = json.loads(make_scenes(tmp_path / "s", n_images=3, progress=False).read_text())
    big = json.loads(make_scenes(tmp_path / "b", n_images=6, progress=False).read_text())
    for x, y in zip(small["images"], big["images"]):
        assert (x["sentences"], x["objects"]) == (y["sentences"], y["objects"])
        assert (tmp_path / "s/images" / x["filename"]).read_bytes() == (tmp_path / "b/images" / y["filename"]).read_bytes()


def test_karpathy_json(tmp_path):
    path = make_scenes(tmp_path, n_images=20, seed=1, image_size=128, val_fraction=0.1, test_fraction=0.25, progress=False)
    assert path == tmp_path / "scenes.json"
    assert not list(tmp_path.rglob(".*.tmp"))
    data = json.loads(path.read_text())
    assert data["dataset"] == "synthetic-scenes"
    images = data["images"]
    assert [im["imgid"] for im in images] == list(range(20))
    splits = [im["split"] for im in images]
    assert (splits.count("val"), splits.count("test"), splits.count("train")) == (2, 5, 13)
    for im in images:
        assert im["filename"] == f"scene_{im['imgid']:05d}.png" and im["filepath"] == "images"
        with Image.open(tmp_path / im["filepath"] / im["filename"]) as img:
            assert img.size == (128, 128) and img.mode == "RGB"
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        assert 1 <= len(im["objects"]) <= 2
        for obj in im["objects"]:
            assert set(obj) == {"shape", "color", "size", "box"}
        for s in im["sentences"]:
            assert s["tokens"] == s["raw"].split() and s["raw"] == s["raw"].lower()


def test_every_caption_names_every_shape():
    for _, objects, caps in _scenes():
        for cap in caps:
            words = set(cap.split())
            for obj in objects:
                assert words & object_words(obj), (cap, obj)


def test_articles_are_english():
    caps = [c for _, _, cs in _scenes(120) for c in cs]
    assert any("an orange" in c for c in caps)
    assert not any(" a orange" in f" {c}" for c in caps)


def test_boxes_inside_the_image_sized_as_labelled_and_apart():
    n_two = 0
    for _, objects, _ in _scenes():
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            lo, hi = SIZES[obj["size"]]
            assert lo * S - 1 <= x1 - x0 <= hi * S + 1
            assert obj["shape"] in SHAPES and obj["color"] in COLORS
        if len(objects) == 2:
            n_two += 1
            a, b = objects[0]["box"], objects[1]["box"]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # disjoint
            assert relation(a, b) is not None
    assert 10 < n_two < 50


def test_pixels_in_a_box_have_the_objects_colour_and_the_rest_is_background():
    for image, objects, _ in _scenes(30):
        px = np.asarray(image, dtype=np.int64)
        outside = np.ones(px.shape[:2], bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            outside[y0:y1, x0:x1] = False
            centre = px[(y0 + y1) // 2 - 1 : (y0 + y1) // 2 + 2, (x0 + x1) // 2 - 1 : (x0 + x1) // 2 + 2]
            assert np.abs(centre - np.array(COLORS[obj["color"]])).max() <= 35, obj
        assert px[outside].min() >= 200  # light background, nothing drawn outside the boxes


def test_captions_follow_the_layout():
    for _, objects, caps in _scenes(80):
        if len(objects) == 1:
            phrases = synth.POSITION_PHRASES[position_of(objects[0]["box"], (S, S))]
            for cap in caps:
                if "background" not in cap:
                    assert any(p in cap for p in phrases), (cap, objects)
        else:
            for cap in caps:
                for word, rel in ((" above ", "above"), (" to the left of ", "left"), (" below ", "below"), (" to the right of ", "right")):
                    if word in cap:
                        before = set(cap.split(word)[0].split())
                        first = next(o for o in objects if before & object_words(o) and o["color"] in before)
                        other = next(o for o in objects if o is not first)
                        assert relation(first["box"], other["box"]) == rel, (cap, objects)


def test_position_of_uses_thirds():
    assert position_of([0, 0, 20, 20], (300, 300)) == ("left", "top")
    assert position_of([140, 140, 160, 160], (300, 300)) == ("center", "middle")
    assert position_of([250, 120, 300, 130], (300, 300)) == ("right", "middle")


def test_synonyms_are_object_words():
    assert object_words({"shape": "circle"}) == {"circle", "disc"}
    assert object_words({"shape": "star"}) == {"star"}


# --------------------------------------------------------------------------------------------- grounding

RED_SQUARE = {"shape": "square", "color": "red", "size": "large", "box": [32, 64, 96, 128]}  # grid cells (2-3, 1-2)
BLUE_STAR = {"shape": "star", "color": "blue", "size": "small", "box": [160, 160, 224, 224]}


def _alphas(*maps):
    return np.stack(maps).astype(np.float64)


def test_grounding_all_mass_in_the_box_scores_one():
    a = np.zeros((7, 7))
    a[2:4, 1:3] = 0.25
    r = grounding_score(["a", "red", "square", "<end>"], _alphas(a, a, a, a), [RED_SQUARE, BLUE_STAR], (S, S))
    assert r["words"] == 1 and r["score"] == pytest.approx(1.0)
    assert r["per_word"][0]["word"] == "square" and r["per_word"][0]["index"] == 2
    assert r["chance"] == pytest.approx(64 * 64 / S**2)


def test_grounding_uniform_attention_scores_the_box_area_share():
    u = np.full((7, 7), 1 / 49)
    r = grounding_score(["star", "and", "square"], _alphas(u, u, u), [RED_SQUARE, BLUE_STAR], (S, S))
    assert r["words"] == 2
    assert r["score"] == pytest.approx(64 * 64 / S**2)
    assert r["score"] == pytest.approx(r["chance"])


def test_grounding_counts_partial_cells_proportionally():
    box = {"shape": "circle", "color": "red", "size": "small", "box": [0, 0, 16, 32]}  # half of cell (0, 0)
    a = np.zeros((7, 7))
    a[0, 0] = 1
    assert grounding_score(["disc"], a[None], [box], (S, S))["score"] == pytest.approx(0.5)


def test_grounding_ignores_words_naming_no_object_or_two():
    a = np.zeros((7, 7))
    a[6, 6] = 1
    circles = [dict(RED_SQUARE, shape="circle"), dict(BLUE_STAR, shape="circle")]
    r = grounding_score(["a", "red", "circle", "on", "the", "left"], _alphas(*[a] * 6), circles, (S, S))
    assert r == {"score": None, "chance": None, "words": 0, "per_word": []}
    r = grounding_score(["triangle", "star"], _alphas(a, a), [RED_SQUARE, BLUE_STAR], (S, S))
    assert r["words"] == 1 and r["score"] == pytest.approx(1.0)


def test_grounding_rejects_too_few_alphas():
    with pytest.raises(ValueError):
        grounding_score(["a", "square"], np.ones((1, 7, 7)), [RED_SQUARE], (S, S))


def test_progress_goes_to_stderr(tmp_path, capsys):
    make_scenes(tmp_path, n_images=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "2/2" in err


def test_grammar_rejects_three_objects():
    with pytest.raises(ValueError):
        synth.captions([RED_SQUARE] * 3, np.random.default_rng(0), (S, S))

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imcap.cli import main
from imcap.datasets import (FORMATS, DatasetError, ImageRecord, assign_splits, format_summary, load_dataset, load_vocab,
                            prepare, read_aic, read_coco, read_flickr8k, read_karpathy, read_lines, split_rows)
from imcap.text import ALIASES, LANGUAGE_TOKENS, LANGUAGES, SPECIAL_TOKENS

COUNT_KEYS = ("images_present", "images_missing", "images_unreadable", "images_duplicate", "images_bad_path")


def make_image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)


def make_fake_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is text, not a JPEG\n")


def problems_about(report: dict, text: str) -> list[dict]:
    return [p for p in report["problems"] if text in p["problem"]]


def check_report(report: dict, out: Path) -> None:
    """What every report must satisfy: the counts add up and the three files are there, alone."""
    assert report["images_listed"] == sum(report[k] for k in COUNT_KEYS)
    assert report["images_kept"] == report["images_present"] - report["images_without_captions"]
    assert report["images_kept"] == sum(report["splits"].values()) + report["images_no_split"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "report.json", "vocab.json"]
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == report
    meta, images = load_dataset(out)
    records = [ImageRecord.from_dict(d) for d in images]
    assert len(records) == report["images_kept"]
    assert sum(len(r.captions) for r in records) == report["captions"]
    assert all(len(r.tokens) == len(r.captions) and all(len(t) <= meta["max_length"] for t in r.tokens) for r in records)
    assert load_vocab(out).tokens[:4] == list(SPECIAL_TOKENS)
    assert len(load_vocab(out)) == report["vocab_size"]


def assert_one_line_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# ------------------------------------------------------------------------------------------- karpathy

def write_karpathy(tmp_path: Path) -> Path:
    root = tmp_path / "scenes"
    make_image(root / "images" / "a.png")
    make_image(root / "images" / "sub" / "b.png")
    make_image(root / "images" / "v.png")
    make_fake_image(root / "images" / "bad.jpg")
    make_image(tmp_path / "outside.png")
    long_caption = " ".join(["word"] * 12)

    def entry(filename, split, *raws, **extra):
        return {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": r.split()} for r in raws], **extra}

    objects = [{"shape": "circle", "color": "red", "size": "large", "box": [1, 1, 5, 5]}]
    data = {"dataset": "synthetic", "images": [
        entry("a.png", "train", "A red circle.", "   ", long_caption, objects=objects),
        entry("b.png", "restval", "A blue square.", filepath="sub"),
        entry("v.png", "val", "A zebra zebra zebra."),
        entry("missing.png", "test", "Nothing here."),
        entry("bad.jpg", "train", "Not an image."),
        entry("a.png", "train", "Same id again."),
        entry("outside.png", "train", "Escapes the root.", filepath=".."),
    ]}
    path = root / "dataset_scenes.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_read_karpathy_records(tmp_path):
    records, problems = read_karpathy(write_karpathy(tmp_path))
    assert problems == []
    a, b = records[0], records[1]
    assert a == ImageRecord("a", "a.png", "train", ["A red circle.", "", " ".join(["word"] * 12)], a.objects)
    assert a.objects[0]["box"] == [1, 1, 5, 5]
    assert (b.id, b.file, b.split) == ("b", "sub/b.png", "train")  # restval -> train, filepath joined


def test_prepare_karpathy(tmp_path):
    source, out = write_karpathy(tmp_path), tmp_path / "data"
    report = prepare(source, "karpathy", out, min_count=1, max_length=5, progress=False)
    check_report(report, out)
    assert report["image_root"] == str(source.parent / "images")  # the images/ subfolder by default
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (7, 3, 1)
    assert (report["images_unreadable"], report["images_duplicate"], report["images_bad_path"]) == (1, 1, 1)
    assert (report["captions"], report["captions_empty"], report["captions_truncated"]) == (4, 1, 1)
    assert report["splits"] == {"train": 2, "val": 1, "test": 0} and report["split_source"] == "source"
    assert problems_about(report, "listed but not found")[0]["file"].endswith("missing.png")
    assert problems_about(report, "unreadable")[0]["file"].endswith("bad.jpg")
    assert len(problems_about(report, "listed again")) == 1
    assert len(problems_about(report, "outside the image folder")) == 1
    assert len(problems_about(report, "empty caption")) == 1

    meta, images = load_dataset(out)
    assert meta["format"] == "karpathy" and meta["language"] == "en" and meta["max_length"] == 5
    a = images[0]
    assert a["captions"] == ["A red circle.", " ".join(["word"] * 12)]  # the empty caption dropped
    assert a["tokens"] == [["a", "red", "circle"], ["word"] * 5]
    assert a["objects"][0]["shape"] == "circle" and "objects" not in images[1]
    vocab = load_vocab(out)
    assert "circle" in vocab and "zebra" not in vocab  # built on the train split only
    assert report["tokens_unk"] == 3  # the three zebras of the val image


def test_prepare_summary(tmp_path):
    out = tmp_path / "data"
    summary = format_summary(prepare(write_karpathy(tmp_path), "karpathy", out, min_count=1, progress=False))
    assert "7 listed, 3 present, 1 missing (test 1), 1 unreadable" in summary
    assert "train 2, val 1, test 0" in summary
    assert str(out / "report.json") in summary


def test_karpathy_like_synth_without_splits(tmp_path):
    """JSON beside images/, entries with filepath "images" (as imcap synth writes): the root is the JSON's folder."""
    for i in range(10):
        make_image(tmp_path / "images" / f"scene_{i}.png")
    entries = [{"filename": f"scene_{i}.png", "filepath": "images", "imgid": i,
                "sentences": [{"raw": f"a red circle number {i}", "tokens": []}]} for i in range(10)]
    source = tmp_path / "scenes.json"
    source.write_text(json.dumps({"dataset": "synthetic-scenes", "images": entries}), encoding="utf-8")
    out = tmp_path / "data"
    report = prepare(source, "karpathy", out, min_count=1, progress=False)
    check_report(report, out)
    assert report["image_root"] == str(tmp_path) and report["images_present"] == 10
    assert report["split_source"] == "seeded" and report["splits"] == {"train": 8, "val": 1, "test": 1}
    assert load_dataset(out)[1][0]["id"] == "scene_0"


def test_karpathy_wrong_shape(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [{"filename": "a.png", "split": "train"}]}), encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_karpathy(path)
    assert_one_line_error(e, str(path), "images[0]", "sentences")
    path.write_text(json.dumps([1, 2]), encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_karpathy(path)
    assert_one_line_error(e, str(path), "Karpathy")


# ------------------------------------------------------------------------------------------- coco

def write_coco(tmp_path: Path, n: int = 4) -> Path:
    """annotations/captions_mini.json with images in mini/ (the COCO layout)."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "height": 6, "width": 8} for i in range(1, n + 1)]
    for i in range(1, n):
        make_image(tmp_path / "mini" / f"{i:012d}.jpg")  # the last one is missing
    annotations = [{"id": 10 * i + k, "image_id": i, "caption": f"A photo number {i}, take {k}."}
                   for i in range(1, n + 1) for k in range(2)]
    annotations.append({"id": 999, "image_id": 77, "caption": "An image that is not listed."})
    images.append(dict(images[0], file_name="again.jpg"))  # a repeated id
    path = tmp_path / "annotations" / "captions_mini.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}), encoding="utf-8")
    return path


def test_prepare_coco(tmp_path):
    out = tmp_path / "data"
    report = prepare(write_coco(tmp_path), "coco", out, min_count=1, progress=False)
    check_report(report, out)
    assert report["image_root"] == str(tmp_path / "mini")  # annotations/captions_mini.json -> ../mini
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (5, 3, 1)
    assert report["images_duplicate"] == 1 and report["captions"] == 6
    assert len(problems_about(report, "image_id 77 is not in 'images'")) == 1
    assert report["split_source"] == "seeded" and report["images_no_split"] == 0
    _, images = load_dataset(out)
    assert [r["id"] for r in images] == ["1", "2", "3"]
    assert images[0]["captions"] == ["A photo number 1, take 0.", "A photo number 1, take 1."]


def test_coco_not_json(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}', encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_coco(path)
    assert_one_line_error(e, f"{path}:2:", "not valid JSON")


def test_coco_not_utf8(tmp_path):
    path = tmp_path / "captions.json"
    path.write_bytes(b'{"images": [],\n"annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(DatasetError) as e:
        read_coco(path)
    assert_one_line_error(e, f"{path}:2:", "not UTF-8")


def test_coco_missing_key(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DatasetError) as e:
        read_coco(path)
    assert_one_line_error(e, str(path), "annotations[0]", "caption")


# ------------------------------------------------------------------------------------------- seeded splits

def test_assign_splits_is_seeded():
    def splits(seed, order=range(50)):
        records = [ImageRecord(f"{i:03d}", f"{i}.jpg", None, ["x"]) for i in order]
        assign_splits(records, 0.2, 0.1, seed)
        return {r.id: r.split for r in records}

    first = splits(0)
    assert splits(0) == first
    assert splits(0, order=reversed(range(50))) == first  # independent of source order
    assert splits(1) != first
    assert sorted(first.values()).count("val") == 10 and list(first.values()).count("test") == 5


def test_prepare_seeded_split_is_deterministic(tmp_path):
    source = write_coco(tmp_path, n=21)
    reports = [prepare(source, "coco", tmp_path / f"out{i}", seed=seed, min_count=1, progress=False)
               for i, seed in enumerate((7, 7, 8))]
    splits = [{r["id"]: r["split"] for r in load_dataset(tmp_path / f"out{i}")[1]} for i in range(3)]
    assert splits[0] == splits[1] and splits[0] != splits[2]
    assert reports[0]["splits"] == {"train": 16, "val": 2, "test": 2}


def test_prepare_forced_split_and_given_vocab(tmp_path):
    source = write_coco(tmp_path)
    prepare(source, "coco", tmp_path / "train", min_count=1, progress=False)
    report = prepare(source, "coco", tmp_path / "test", split="test", vocab=tmp_path / "train", progress=False)
    assert report["splits"] == {"train": 0, "val": 0, "test": 3} and report["split_source"] == "forced"
    assert load_vocab(tmp_path / "test") == load_vocab(tmp_path / "train")
    with pytest.raises(DatasetError, match="no images in the train split"):
        prepare(source, "coco", tmp_path / "x", split="val", progress=False)


def test_prepare_no_usable_image(tmp_path):
    with pytest.raises(DatasetError) as e:
        prepare(write_coco(tmp_path), "coco", tmp_path / "out", images=tmp_path, progress=False)
    assert_one_line_error(e, "none of the 5 listed images", "4 missing")
    assert not (tmp_path / "out").exists()


def test_prepare_bad_options(tmp_path):
    source = write_coco(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format"):
        prepare(source, "csv", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown language"):
        prepare(source, "coco", tmp_path / "out", language="xx")
    with pytest.raises(DatasetError, match="image folder not found"):
        prepare(source, "coco", tmp_path / "out", images=tmp_path / "nope")


def test_prepare_help_offers_every_format_and_language(monkeypatch, capsys):
    """`imcap prepare --help` lists the formats of the registry (a new format is one FORMATS entry) with what
    each SOURCE is, and the tokenizer languages of text.py."""
    monkeypatch.setenv("COLUMNS", "10000")  # one line per option: nothing wrapped
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert f"--format {{{','.join(FORMATS)}}}" in out
    assert f"--language {{{','.join([*LANGUAGES, *ALIASES])}}}" in out
    assert all(f"{name}: {f.help}" in out for name, f in FORMATS.items())
    assert all(f"{name} = {tokens}" in out for name, tokens in LANGUAGE_TOKENS.items())
    assert all(f"{f.language} for {name}" in out for name, f in FORMATS.items() if f.language != "en")


def test_split_rows_are_the_rows_of_a_split_with_features():
    images = [{"split": "train"}, {"split": "val"}, {"split": "train"}, {"split": None}, {"split": "train"}]
    assert split_rows(images, "train") == [0, 2, 4]
    assert split_rows(images, "train", ok=np.array([True, True, False, True, True])) == [0, 4]
    assert split_rows(images, "test") == []


# ------------------------------------------------------------------------------------------- flickr8k

def write_flickr8k(tmp_path: Path) -> Path:
    folder = tmp_path / "flickr8k"
    for name in ("tr1", "tr2", "dev1", "extra"):
        make_image(folder / "images" / f"{name}.jpg")
    lines = [f"{name}.jpg#{k}\t{name} caption number {k} ." for name in ("tr1", "tr2", "dev1", "test1", "extra")
             for k in range(2)]
    lines += ["tr1.jpg#2\t", "tr2.jpg.1#2\tA typo in the image name .", ""]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines), encoding="utf-8")
    (folder / "Flickr_8k.trainImages.txt").write_text("tr1.jpg\ntr2.jpg\nghost.jpg\n")
    (folder / "Flickr_8k.devImages.txt").write_text("dev1.jpg\n")
    (folder / "Flickr_8k.testImages.txt").write_text("test1.jpg\n")
    return folder


def test_read_flickr8k(tmp_path):
    records, problems = read_flickr8k(write_flickr8k(tmp_path))
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["dev1", "extra", "test1", "tr1", "tr2"]
    assert {i: r.split for i, r in by_id.items()} == {"tr1": "train", "tr2": "train", "dev1": "val",
                                                      "test1": "test", "extra": None}
    assert by_id["tr2"].captions[-1] == "A typo in the image name ."  # tr2.jpg.1 merged into tr2.jpg
    assert by_id["tr1"].captions[-1] == "" and by_id["tr1"].lines == [1, 2, 11]
    assert any("ghost.jpg" in p["problem"] and p["line"] == 3 for p in problems)
    assert any("tr2.jpg.1" in p["problem"] for p in problems)


def test_prepare_flickr8k(tmp_path):
    out = tmp_path / "data"
    report = prepare(write_flickr8k(tmp_path), "flickr8k", out, min_count=1, progress=False)
    check_report(report, out)
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (5, 4, 1)
    assert report["splits"] == {"train": 2, "val": 1, "test": 0} and report["images_no_split"] == 1
    assert report["captions"] == 9 and report["captions_empty"] == 1
    empty = problems_about(report, "empty caption")[0]
    assert empty["file"].endswith("Flickr8k.token.txt") and empty["line"] == 11
    assert problems_about(report, "listed but not found")[0]["file"].endswith("test1.jpg")


def test_flickr8k_malformed_line(tmp_path):
    folder = write_flickr8k(tmp_path)
    token_file = folder / "Flickr8k.token.txt"
    token_file.write_text("tr1.jpg#0\tA dog .\njust some words without a tab\n", encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_flickr8k(folder)
    assert_one_line_error(e, f"{token_file}:2:")
    with pytest.raises(DatasetError) as e:
        read_flickr8k(tmp_path)
    assert_one_line_error(e, str(tmp_path), "Flickr8k.token.txt")


# ------------------------------------------------------------------------------------------- aic

def test_prepare_aic(tmp_path):
    make_image(tmp_path / "images" / "a.jpg")
    make_image(tmp_path / "images" / "b.jpg")
    data = [
        {"url": "http://x/a.jpg", "image_id": "a.jpg", "caption": ["一个男人在骑自行车。", "\n男人 在路上骑车。"]},
        {"image_id": "b.jpg", "caption": ["两个女孩在草地上玩耍，", "！"]},
        {"image_id": "a.jpg", "caption": ["重复的图片。"]},
        {"image_id": "c.jpg", "caption": ["一只狗。"]},
    ]
    source = tmp_path / "caption.json"
    source.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "data"
    report = prepare(source, "aic", out, min_count=1, val_fraction=0, test_fraction=0, progress=False)
    check_report(report, out)
    assert report["language"] == "zh"
    assert (report["images_present"], report["images_missing"], report["images_duplicate"]) == (2, 1, 1)
    assert report["captions"] == 3 and report["captions_empty"] == 1  # "！" has no words
    _, images = load_dataset(out)
    assert images[0]["captions"][1] == "男人 在路上骑车。"
    assert images[0]["tokens"][0] == ["一个", "男人", "在", "骑", "自行车"]
    assert all(t not in "，。！ \n" for r in images for caption in r["tokens"] for t in caption)


def test_aic_wrong_shape(tmp_path):
    path = tmp_path / "caption.json"
    path.write_text(json.dumps([{"image_id": "a.jpg", "caption": ["好"]}, {"image_id": "b.jpg"}]), encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_aic(path)
    assert_one_line_error(e, str(path), "[1]", "caption")


# ------------------------------------------------------------------------------------------- lines

def test_read_lines_tolerates_mess(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("image, caption\n\n"
                    "1.jpg, Một người đàn ông đang đi xe đạp .\n"
                    "  2.jpg  ,   Hai con chó, trên cỏ . \n"
                    "1.jpg\tMột chiếc xe đạp .\n"
                    '3.jpg,"Ba con mèo, ""đen"" ."\n'
                    "2.jpg,\n", encoding="utf-8")
    records, problems = read_lines(path)
    assert problems == []
    assert [(r.id, r.file, r.lines) for r in records] == [("1", "1.jpg", [3, 5]), ("2", "2.jpg", [4, 7]), ("3", "3.jpg", [6])]
    assert records[0].captions == ["Một người đàn ông đang đi xe đạp .", "Một chiếc xe đạp ."]
    assert records[1].captions == ["Hai con chó, trên cỏ .", ""]
    assert records[2].captions == ['Ba con mèo, "đen" .']


def test_prepare_lines(tmp_path):
    for name in ("1", "2", "3"):
        make_image(tmp_path / "images" / f"{name}.jpg")
    make_image(tmp_path / "secret.jpg")
    source = tmp_path / "captions.txt"
    source.write_text("1.jpg, Một người đàn ông đang đi xe đạp .\n2.jpg, Hai con chó .\n2.jpg,   \n"
                      "3.jpg, Ba con mèo .\n../secret.jpg, Không được phép .\n", encoding="utf-8")
    out = tmp_path / "data"
    report = prepare(source, "lines", out, language="vi", min_count=1, val_fraction=0, test_fraction=0,
                     progress=False)
    check_report(report, out)
    assert report["language"] == "space" and report["images_present"] == 3 and report["images_bad_path"] == 1
    assert problems_about(report, "outside the image folder")[0]["line"] == 5
    assert problems_about(report, "empty caption")[0]["line"] == 3
    _, images = load_dataset(out)
    assert images[0]["tokens"] == [["một", "người", "đàn", "ông", "đang", "đi", "xe", "đạp"]]


def test_lines_malformed(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("1.jpg, Một con chó .\n\nno separator here\n", encoding="utf-8")
    with pytest.raises(DatasetError) as e:
        read_lines(path)
    assert_one_line_error(e, f"{path}:3:", "comma")
    path.write_bytes("1.jpg, Một con chó .\n".encode("utf-16"))
    with pytest.raises(DatasetError) as e:
        read_lines(path)
    assert_one_line_error(e, f"{path}:1:", "not UTF-8")
    with pytest.raises(DatasetError) as e:
        read_lines(tmp_path / "nope.txt")
    assert_one_line_error(e, "nope.txt", "no such file")


# ------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_flickr8k(shared_data, tmp_path):
    report = prepare(shared_data / "flickr8k", "flickr8k", tmp_path, progress=False)
    check_report(report, tmp_path)
    # 8,092 images in Flickr8k.token.txt (its "2258277193_586949ec62.jpg.1" typo merged): the 1,000 test
    # images are held back, and 2258277193_586949ec62.jpg (in no split) is absent too.
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (8092, 7091, 1001)
    assert report["images_unreadable"] == 0 and report["images_kept"] == 7091
    assert report["splits"] == {"train": 6000, "val": 1000, "test": 0} and report["images_no_split"] == 91
    assert (report["captions"], report["captions_empty"], report["captions_truncated"]) == (35455, 0, 8)
    assert report["vocab_size"] == 2540


@pytest.mark.realdata
def test_real_coco_val(shared_data, tmp_path):
    source = shared_data / "coco2017-mini" / "annotations" / "captions_val2017.json"
    report = prepare(source, "coco", tmp_path, progress=False)
    check_report(report, tmp_path)
    # ../shared may be a symlink or a copy: compare the folders, not how their paths are spelled
    assert Path(report["image_root"]).resolve() == (shared_data / "coco2017-mini" / "val2017").resolve()
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (5000, 159, 4841)
    assert report["captions"] == 795 and report["splits"] == {"train": 127, "val": 16, "test": 16}


@pytest.mark.realdata
def test_real_vi_photos(shared_data, tmp_path):
    report = prepare(shared_data / "vi-photos" / "captions.txt", "lines", tmp_path, language="vi", progress=False)
    check_report(report, tmp_path)
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (1200, 1200, 0)
    assert report["captions"] == 6008 and report["problems"] == []
    assert report["splits"] == {"train": 960, "val": 120, "test": 120}
    _, images = load_dataset(tmp_path)
    counts = sorted(len(r["captions"]) for r in images)
    assert counts[:1] + counts[-2:] == [4, 9, 10] and counts[1:-2] == [5] * 1197

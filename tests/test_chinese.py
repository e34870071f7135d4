"""Chinese data: the Flickr8K-CN and AI Challenger readers, the zh (jieba words) and zh-char tokenizers, and
the language carried from prepare to scoring."""

import json
from pathlib import Path

import pytest
from PIL import Image

from imcap.cli import build_parser
from imcap.datasets import DatasetError, load_dataset, load_vocab, prepare, read_aic, read_flickr8k_cn
from imcap.metrics import score_chinese
from imcap.text import get_tokenizer, join_cjk_spaces


def make_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(path)


# ------------------------------------------------------------------------------------------- flickr8k-cn

CN_LINES = [
    "1000_a.jpg#zhc#0 一个男人在骑自行车。",
    "1000_a.jpg#zhc#1  男人在路上骑车。",  # a stray second space after the key
    "2000_b.jpg#zhc#0 两只狗在草地上玩耍。",
    "2000_b.jpg#zhc#1 两只狗在 草地上。",  # a stray space inside
    "3000_c.jpg#zhc#0 一个穿着T恤的女孩。",
    "4000_d.jpg#zhc#0 一只猫。",
]


def make_flickr8k_cn(root: Path, photos=("1000_a", "2000_b", "4000_d")) -> Path:
    """root/flickr8k-cn (captions + split id lists, no photos) beside root/flickr8k/images."""
    cn = root / "flickr8k-cn"
    cn.mkdir(parents=True)
    (cn / "flickr8kzhc.caption.txt").write_text("\n".join(CN_LINES) + "\n", encoding="utf-8")
    (cn / "flickr8ktrain.txt").write_text("1000_a\n2000_b\n", encoding="utf-8")  # ids without .jpg
    (cn / "flickr8kval.txt").write_text("4000_d\n", encoding="utf-8")
    (cn / "flickr8ktest.txt").write_text("3000_c\n9999_z\n", encoding="utf-8")  # 9999_z: no captions
    for name in photos:
        make_image(root / "flickr8k" / "images" / f"{name}.jpg")
    return cn


def test_read_flickr8k_cn_lines_and_splits(tmp_path):
    records, problems = read_flickr8k_cn(make_flickr8k_cn(tmp_path))
    by_id = {r.id: r for r in records}
    assert sorted(by_id) == ["1000_a", "2000_b", "3000_c", "4000_d"]
    assert by_id["1000_a"].file == "1000_a.jpg" and by_id["1000_a"].captions == ["一个男人在骑自行车。", "男人在路上骑车。"]
    assert [by_id[i].split for i in ("1000_a", "2000_b", "4000_d", "3000_c")] == ["train", "train", "val", "test"]
    assert by_id["2000_b"].lines == [3, 4]
    assert any("9999_z has no captions" in p["problem"] for p in problems)
    assert [p["line"] for p in problems if "stray whitespace" in p["problem"]] == [4]


def test_flickr8k_cn_malformed_line_is_a_one_line_error(tmp_path):
    cn = make_flickr8k_cn(tmp_path)
    (cn / "flickr8kzhc.caption.txt").write_text("1000_a.jpg#zhc#0 好。\n1000_a.jpg 没有编号\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"flickr8kzhc.caption.txt:2: expected 'image.jpg#zhc#k caption'"):
        read_flickr8k_cn(cn)


def test_prepare_flickr8k_cn_finds_the_flickr8k_photos_and_reports_missing(tmp_path):
    cn = make_flickr8k_cn(tmp_path)
    report = prepare(cn, "flickr8k-cn", tmp_path / "data", min_count=1, progress=False)
    assert report["language"] == "zh" and report["split_source"] == "source"
    assert Path(report["image_root"]) == (tmp_path / "flickr8k" / "images").resolve()
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (4, 3, 1)
    assert report["images_missing_by_split"] == {"test": 1}
    assert report["splits"] == {"train": 2, "val": 1, "test": 0}
    meta, images = load_dataset(tmp_path / "data")
    assert meta["language"] == "zh" and load_vocab(tmp_path / "data").language == "zh"
    b = next(im for im in images if im["id"] == "2000_b")
    assert b["tokens"][0] == ["两只", "狗", "在", "草地", "上", "玩耍"]
    assert b["tokens"][1] == get_tokenizer("zh").tokenize("两只狗在草地上。")  # the stray space changes nothing


def test_prepare_flickr8k_cn_without_photos_names_what_to_pass(tmp_path):
    cn = make_flickr8k_cn(tmp_path, photos=())
    with pytest.raises(DatasetError, match="--images"):
        prepare(cn, "flickr8k-cn", tmp_path / "data", progress=False)
    make_image(tmp_path / "photos" / "1000_a.jpg")
    report = prepare(cn, "flickr8k-cn", tmp_path / "data", images=tmp_path / "photos", min_count=1, progress=False)
    assert report["images_present"] == 1


def test_prepare_flickr8k_cn_zh_char(tmp_path):
    cn = make_flickr8k_cn(tmp_path)
    make_image(tmp_path / "flickr8k" / "images" / "3000_c.jpg")
    report = prepare(cn, "flickr8k-cn", tmp_path / "data", language="zh-char", min_count=1, split="train",
                     progress=False)
    assert report["language"] == "zh-char"
    meta, images = load_dataset(tmp_path / "data")
    assert meta["language"] == "zh-char"
    c = next(im for im in images if im["id"] == "3000_c")
    assert c["tokens"] == [["一", "个", "穿", "着", "t", "恤", "的", "女", "孩"]]


def test_cli_prepare_takes_the_chinese_choices():
    a = build_parser().parse_args(["prepare", "x", "--format", "flickr8k-cn", "--language", "zh-char", "--out", "o"])
    assert (a.format, a.language) == ("flickr8k-cn", "zh-char")


# ------------------------------------------------------------------------------------------- aic

AIC_TRAIN = [
    {"url": "http://x/a.jpg", "image_id": "aa11.jpg",
     "caption": ["一个男人在骑自行车", "一个穿着短袖的女人挽着一个左手\n拿着手机的女人", "  男人 在路上骑车  "]},
    {"url": "http://x/b.jpg", "image_id": "bb22.jpg", "caption": ["两个女孩在草地上玩耍", "，"]},
]
AIC_VAL = [{"url": "u", "image_id": f"v{i}.jpg", "caption": [f"第{i}只狗在草地上"]} for i in range(6)]


def make_aic(root: Path) -> Path:
    """The genuine layout: ai_challenger_caption_<split>_<date>/ with its JSON and image folder."""
    for split, date, data in (("train", "20170902", AIC_TRAIN), ("validation", "20170910", AIC_VAL)):
        folder = root / f"ai_challenger_caption_{split}_{date}"
        folder.mkdir(parents=True)
        (folder / f"caption_{split}_annotations_{date}.json").write_text(json.dumps(data, ensure_ascii=False),
                                                                        encoding="utf-8")
        for entry in data:
            make_image(folder / f"caption_{split}_images_{date}" / entry["image_id"])
    return root


def test_read_aic_reports_a_line_break_and_stray_whitespace(tmp_path):
    source = make_aic(tmp_path) / "ai_challenger_caption_train_20170902" / "caption_train_annotations_20170902.json"
    records, problems = read_aic(source)
    assert records[0].id == "aa11" and records[0].split is None
    assert records[0].captions[2] == "男人 在路上骑车"  # trimmed; kept as written inside
    found = sorted(p["problem"] for p in problems)
    assert len(found) == 2 and all(p["file"] == str(source) for p in problems)
    assert "[0].caption[1]" in found[0] and "a line break inside" in found[0]
    assert "[0].caption[2]" in found[1] and "stray whitespace inside" in found[1]
    tok = get_tokenizer("zh")
    assert tok.tokenize(records[0].captions[1]) == tok.tokenize("一个穿着短袖的女人挽着一个左手拿着手机的女人")


def test_prepare_aic_file_uses_its_images_folder(tmp_path):
    source = make_aic(tmp_path) / "ai_challenger_caption_train_20170902" / "caption_train_annotations_20170902.json"
    report = prepare(source, "aic", tmp_path / "data", min_count=1, val_fraction=0, test_fraction=0, progress=False)
    assert Path(report["image_root"]).name == "caption_train_images_20170902"
    assert (report["images_present"], report["captions"], report["captions_empty"]) == (2, 4, 1)
    assert report["split_source"] == "seeded"


def test_prepare_aic_folder_train_and_validation_halved(tmp_path):
    root = make_aic(tmp_path)
    report = prepare(root, "aic", tmp_path / "data", min_count=1, seed=3, progress=False)
    assert report["split_source"] == "source" and report["language"] == "zh"
    assert report["splits"] == {"train": 2, "val": 3, "test": 3}
    assert len([p for p in report["problems"] if "inside: tokenized as if joined" in p["problem"]]) == 2
    meta, images = load_dataset(tmp_path / "data")
    assert Path(meta["image_root"]) == root.resolve()
    assert images[0]["file"] == "ai_challenger_caption_train_20170902/caption_train_images_20170902/aa11.jpg"
    val = {im["id"] for im in images if im["split"] == "val"}
    again = prepare(root, "aic", tmp_path / "again", min_count=1, seed=3, progress=False)
    assert again["splits"] == report["splits"]
    assert {im["id"] for im in load_dataset(tmp_path / "again")[1] if im["split"] == "val"} == val


def test_aic_folder_without_caption_files(tmp_path):
    with pytest.raises(DatasetError, match="no AI Challenger caption file"):
        read_aic(tmp_path)


# ------------------------------------------------------------------------------------------- tokenizers

def test_zh_round_trip():
    tok = get_tokenizer("zh")
    tokens = tok.tokenize("一个穿着红色上衣的男人在道路上行走。")
    assert tokens == ["一个", "穿着", "红色", "上衣", "的", "男人", "在", "道路", "上", "行走"]
    assert tok.detokenize(tokens) == "一个穿着红色上衣的男人在道路上行走"
    assert tok.tokenize(tok.detokenize(tokens)) == tokens


def test_zh_char_round_trip_and_latin_runs():
    tok = get_tokenizer("zh-char")
    assert tok.language == "zh-char" and get_tokenizer("zh_char").language == "zh-char"
    tokens = tok.tokenize("一个穿着T恤的男人，在 3号OK球场上。")
    assert tokens == ["一", "个", "穿", "着", "t", "恤", "的", "男", "人", "在", "3", "号", "ok", "球", "场", "上"]
    assert tok.tokenize("ＡＢ１２、蓝天！") == ["ab12", "蓝", "天"]  # full-width folded; punctuation dropped
    assert tok.detokenize(["两", "只", "狗"]) == "两只狗"
    assert tok.tokenize(tok.detokenize(tok.tokenize("两只狗在草地上玩耍。"))) == tok.tokenize("两只狗在草地上玩耍")


def test_join_cjk_spaces():
    assert join_cjk_spaces(" 女人站 在\n道路上 ") == "女人站在道路上"
    assert join_cjk_spaces("写着 OK 3 的牌子") == "写着OK 3的牌子"


def test_chinese_scores_cut_both_sides_into_jieba_words_whatever_the_model_cut():
    refs = {"a": ["两只狗在草地上玩耍。", "两只小狗在草地上跑"], "b": ["一个男人在骑自行车"]}
    words = get_tokenizer("zh").tokenize
    chars = get_tokenizer("zh-char").tokenize
    text = {"a": "两只狗在草地上玩耍", "b": "一个男人骑着自行车"}
    from_words = {k: get_tokenizer("zh").detokenize(words(v)) for k, v in text.items()}  # a word model's caption
    from_chars = {k: get_tokenizer("zh-char").detokenize(chars(v)) for k, v in text.items()}  # a character model's
    assert score_chinese(refs, from_words) == score_chinese(refs, from_chars)
    exact = score_chinese(refs, {"a": "两只狗在草地上玩耍。", "b": "一个男人在骑自行车"})
    assert exact["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and exact["METEOR"] is None
    # words, not characters: one wrong word costs one unigram of 5 words, not one of 9 characters
    scores = score_chinese(refs, {"a": "两只猫在草地上玩耍", "b": "一个男人在骑自行车"})
    by_char = score_chinese(refs, {"a": "两只猫在草地上玩耍", "b": "一个男人在骑自行车"}, unit="zh-char")
    assert scores["BLEU-1"] < by_char["BLEU-1"] < 1.0


# ------------------------------------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_flickr8k_cn(shared_data, tmp_path):
    report = prepare(shared_data / "flickr8k-cn", "flickr8k-cn", tmp_path, progress=False)
    assert Path(report["image_root"]).resolve() == (shared_data / "flickr8k" / "images").resolve()
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (8091, 7091, 1000)
    assert report["images_missing_by_split"] == {"test": 1000}
    assert report["splits"] == {"train": 6000, "val": 1000, "test": 0} and report["images_no_split"] == 91
    assert (report["captions"], report["captions_empty"]) == (35455, 0)
    assert report["language"] == "zh"


@pytest.mark.realdata
def test_real_aic_mini(shared_data, tmp_path):
    report = prepare(shared_data / "aic-mini", "aic", tmp_path, progress=False)
    assert (report["images_listed"], report["images_present"], report["images_missing"]) == (1600, 1600, 0)
    assert report["splits"] == {"train": 1000, "val": 300, "test": 300}
    assert (report["captions"], report["captions_empty"]) == (8000, 0)
    inside = [p for p in report["problems"] if "inside: tokenized as if joined" in p["problem"]]
    assert len(inside) == 6 and sum("a line break" in p["problem"] for p in inside) == 1
    _, images = load_dataset(tmp_path)
    assert all(t.strip() and "\n" not in t for im in images for caption in im["tokens"] for t in caption)


def test_chinese_scores_leave_out_meteor_and_skip_the_ptb_tokenizer(tiny_data, tmp_path):
    import json
    import shutil

    from imcap.decoding import DecodingOptions
    from imcap.evaluate import evaluate
    from imcap.train import TrainConfig, train

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    meta = json.loads((data / "dataset.json").read_text())
    meta["language"] = "zh"  # the scenes' tokens stand in for jieba's words
    (data / "dataset.json").write_text(json.dumps(meta))
    train(data, tmp_path / "run", model_config={"embed_dim": 8, "hidden_dim": 8, "attention_dim": 8},
          train_config=TrainConfig(epochs=1, batch_size=32), progress=False)
    report = evaluate(tmp_path / "run", data, split="val", options=DecodingOptions(beam_size=1, max_length=8))
    scores = report["scores"]
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["METEOR"] is None and all(isinstance(scores[k], float) for k in scores if k != "METEOR")
    assert list(report["character_scores"]) == list(scores) and report["character_scores"]["METEOR"] is None

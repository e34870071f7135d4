"""The photo captioner shipped in the package (imcap/models/flickr8k): its name works wherever a RUN_DIR does,
it captions real photos with plausible words, and never shows <unk>."""

import json
import re
import subprocess
import sys

import pytest
import torch

import imcap
from imcap import packaged
from imcap.checkpoint import find_checkpoint, load_checkpoint
from test_hardening import tiny_run

# words too common to say anything about a photo
STOP = set("a an the of in on at to with and is are for by its his her their near while two three one some "
           "other another front top back next side up down out over his it this that there".split())


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP and len(w) > 2}


def stems(words: set[str]) -> set[str]:
    return {w[:-1] if w.endswith("s") else w for w in words}  # dogs ~ dog, men != man (good enough here)


def test_the_flickr8k_model_is_packaged_and_its_name_resolves(tmp_path, monkeypatch):
    assert "flickr8k" in packaged.available()
    path = find_checkpoint("flickr8k")
    assert path == packaged.MODELS_DIR / "flickr8k" and (path / packaged.CARD).is_file()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flickr8k").mkdir()  # a path that exists wins over the packaged name
    with pytest.raises(imcap.checkpoint.CheckpointError, match="no checkpoint in this directory"):
        find_checkpoint("flickr8k")


def test_the_packaged_model_card_names_its_data_scores_and_limits():
    card = (packaged.MODELS_DIR / "flickr8k" / packaged.CARD).read_text()
    for words in ("Flickr8k", "Hodosh", "BLEU-4", "CIDEr", "dev", "bad at"):
        assert words in card, words
    meta = json.loads((packaged.MODELS_DIR / "flickr8k" / "checkpoint.json").read_text())
    assert "optimizer" not in meta and "/" not in (meta["data"].get("data_dir") or "")


@pytest.mark.realdata
def test_the_packaged_model_captions_real_photos_with_plausible_words(shared_data):
    coco = shared_data / "coco2017-mini"
    ann = json.loads((coco / "annotations" / "captions_val2017.json").read_text())
    present = {p.name for p in (coco / "val2017").iterdir()}
    images = [im for im in ann["images"] if im["file_name"] in present][:24]
    refs: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    captioner = imcap.load("flickr8k")
    results = captioner.caption([coco / "val2017" / im["file_name"] for im in images], beam_size=3)
    hits = 0
    for im, r in zip(images, results):
        assert r.error is None and r.caption and "<unk>" not in r.caption
        said = stems(content_words(r.caption))
        seen = stems(set().union(*(content_words(c) for c in refs[im["id"]])))
        hits += bool(said & seen)
    # a Flickr8k model on COCO photos: most captions share a content word with what people wrote
    assert hits >= 0.6 * len(images), f"{hits} of {len(images)} captions share a content word with the references"


def test_imcap_caption_takes_the_packaged_name(tmp_path):
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (90, 140, 60)).save(photo)
    out = subprocess.run([sys.executable, "-m", "imcap", "caption", "flickr8k", str(photo), "--json", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["caption"]


def test_package_writes_float16_weights_without_the_machines_paths(tmp_path):
    run = tiny_run(tmp_path / "run")
    out = packaged.package(run, "tiny", models_dir=tmp_path / "models")
    meta, weights = load_checkpoint(out)
    assert all(w.dtype == torch.float16 for w in weights.values() if w.is_floating_point())
    assert meta["data"]["data_dir"] == "run" and meta["packaged"] == "tiny" and "optimizer" not in meta
    _, original = load_checkpoint(run / "best")
    for k, w in weights.items():  # float16 rounding only
        assert torch.allclose(w.float(), original[k], rtol=1e-3, atol=1e-4), k
    images = list(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    a = imcap.load(run, device="cpu").caption(images, beam_size=2)
    b = imcap.load(out, device="cpu").caption(images, beam_size=2)
    assert [r.caption for r in a] == [r.caption for r in b]  # the same words from float16-rounded weights

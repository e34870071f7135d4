"""The MS-COCO path of docs/coco.md, rehearsed on ../shared/data/coco2017-mini's real photos and captions.

A user with the internet runs `imcap download coco2014` and `imcap download karpathy-splits`, then prepares
dataset_coco.json against the COCO folder. Here the Karpathy file is a stand-in in its exact shape (filepath,
filename, cocoid, split with restval, sentences with raw and tokens) over the photos that are present, and the
documented commands run through the CLI from there: prepare, features, train, evaluate, caption.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SPLITS = {"val": 40, "test": 40}  # of the val2017 photos, in id order; the rest of them are restval


def karpathy_stand_in(coco: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """out/dataset_coco.json over the photos of coco (COCO layout: annotations/, train2017/, val2017/)."""
    images, sentence = [], 0
    expected = {"train": 0, "val": 0, "test": 0}
    for folder in ("val2017", "train2017"):
        d = json.loads((coco / "annotations" / f"captions_{folder}.json").read_text(encoding="utf-8"))
        by_image: dict[int, list[str]] = {}
        for a in d["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        present = sorted((im for im in d["images"] if (coco / folder / im["file_name"]).is_file()), key=lambda im: im["id"])
        for k, im in enumerate(present):
            split = "train"
            if folder == "val2017":
                split = "val" if k < SPLITS["val"] else "test" if k < sum(SPLITS.values()) else "restval"
            expected["train" if split == "restval" else split] += 1
            raws = by_image[im["id"]]
            images.append({
                "filepath": folder, "filename": im["file_name"], "imgid": len(images), "cocoid": im["id"],
                "split": split, "sentids": list(range(sentence, sentence + len(raws))),
                "sentences": [{"raw": raw, "tokens": re.findall(r"[a-z0-9']+", raw.lower()), "imgid": len(images),
                               "sentid": sentence + i} for i, raw in enumerate(raws)],
            })
            sentence += len(raws)
    path = out / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return path, expected


def imcap(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "imcap", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.realdata
def test_the_documented_coco_commands_run_on_real_coco_photos(shared_data, tmp_path):
    coco = shared_data / "coco2017-mini"
    karpathy, expected = karpathy_stand_in(coco, tmp_path)
    assert expected == {"train": 80 + 159 - 80, "val": 40, "test": 40}  # train2017 + restval

    imcap("prepare", "--format", "karpathy", str(karpathy), "--images", str(coco), "--out", str(tmp_path / "data"),
          "--min-count", "2", "--quiet")
    report = json.loads((tmp_path / "data/report.json").read_text())
    assert report["splits"] == expected and (report["images_kept"], report["images_missing"]) == (239, 0)

    out = imcap("features", str(tmp_path / "data"), "--encoder", "efficientnet-lite0", "--image-size", "224",
                "--dtype", "uint8", "--quiet")
    assert "239 of 239 images" in out and "0 failed" in out

    imcap("train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "32",
          "--embed-dim", "64", "--hidden-dim", "128", "--attention-dim", "64", "--quiet")
    history = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history if "val" in h][-1:] == [2]

    scores = json.loads(imcap("evaluate", str(tmp_path / "run"), "--split", "test", "--beam", "3", "--json"))
    assert set(scores) >= {"BLEU-4", "METEOR", "ROUGE_L", "CIDEr"} and scores["BLEU-1"] > 0

    photo = next((coco / "val2017").glob("*.jpg"))
    assert photo.name in imcap("caption", str(tmp_path / "run"), str(photo))

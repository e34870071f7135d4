import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imcap.encoders import build_encoder
from imcap.features import FeatureStore, FeatureStoreError, extract_features
from imcap.images import load_image

SIZE = 64  # encoder input: grid 2 x 2, P = 4, D = 1280
REPO = Path(__file__).resolve().parents[1]


def make_data_dir(root: Path, n_good: int = 5, corrupt_at: int | None = 2) -> Path:
    """A DATA_DIR with a hand-written dataset.json: n_good small PNGs, plus one corrupt file at row corrupt_at."""
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n_good):
        h, w = 24 + 8 * (i % 3), 40 - 4 * (i % 4)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        files.append(f"img{i}.png")
    if corrupt_at is not None:
        (images / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        files.insert(corrupt_at, "bad.png")
    dataset = {
        "version": 1, "format": "lines", "source": "hand-written", "language": "en",
        "image_root": str(images), "max_length": 30,
        "images": [{"id": f, "file": f, "split": "train", "captions": ["x"], "tokens": [["x"]]} for f in files],
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet-lite0", SIZE)


def encode_directly(encoder, data_dir: Path, rows) -> torch.Tensor:
    d = json.loads((data_dir / "dataset.json").read_text())
    x = torch.stack([encoder.preprocess(load_image(Path(d["image_root"]) / d["images"][r]["file"])) for r in rows])
    with torch.inference_mode():
        return encoder(x)  # (len(rows), P, D)


def count_encoded(monkeypatch, encoder) -> list:
    """Record the batch size of every forward call of `encoder`."""
    sizes, forward = [], encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda x: (sizes.append(len(x)), forward(x))[1])
    return sizes


def test_store_rows_match_the_encoder(tmp_path, encoder, capsys):
    data = make_data_dir(tmp_path / "data")
    summary = extract_features(data, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    assert (summary["images"], summary["done"], summary["encoded"], summary["skipped"]) == (6, 5, 5, 0)
    assert [f["file"] for f in summary["failed"]] == ["bad.png"] and summary["failed"][0]["index"] == 2
    assert summary["bytes_per_image"] == 4 * 1280 * 2 and summary["images_per_s"] > 0
    assert "bad.png" in capsys.readouterr().err

    d = data / "features" / f"efficientnet-lite0-{SIZE}"
    assert sorted(p.name for p in d.iterdir()) == ["features.f16", "index.json", "status.u8"]
    index = json.loads((d / "index.json").read_text())
    assert (index["N"], index["P"], index["D"]) == (6, 4, 1280)
    assert index["encoder"] == encoder.spec.to_dict() and index["failures"][0]["file"] == "bad.png"
    assert np.fromfile(d / "status.u8", dtype=np.uint8).tolist() == [1, 1, 2, 1, 1, 1]
    assert (d / "features.f16").stat().st_size == 6 * 4 * 1280 * 2

    store = FeatureStore.open(data)
    assert len(store) == 6 and store.grid == (2, 2) and store.spec == encoder.spec
    assert store.ok.tolist() == [True, True, False, True, True, True]
    assert store.features.dtype == np.float16 and not store.features.flags.writeable
    rows = [5, 0, 3, 1]  # unsorted on purpose
    got = store.get(rows)
    assert got.dtype == torch.float32 and got.shape == (4, 4, 1280)
    torch.testing.assert_close(got, encode_directly(encoder, data, rows), atol=1e-2, rtol=2e-3)
    with pytest.raises(FeatureStoreError, match="no features"):
        store.get([2])
    assert store.get([]).shape == (0, 4, 1280)  # no rows asked, none read


def test_resume_after_interruption_recomputes_only_missing_rows(tmp_path, encoder, monkeypatch):
    full = make_data_dir(tmp_path / "full")
    extract_features(full, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    data = make_data_dir(tmp_path / "data")

    calls, forward = [], encoder.forward

    def dies_after_one_batch(x):
        if calls:
            raise RuntimeError("killed")
        calls.append(len(x))
        return forward(x)

    with monkeypatch.context() as m:
        m.setattr(encoder, "forward", dies_after_one_batch)
        with pytest.raises(RuntimeError, match="killed"):
            extract_features(data, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    d = data / "features" / f"efficientnet-lite0-{SIZE}"
    assert np.fromfile(d / "status.u8", dtype=np.uint8).tolist() == [1, 1, 0, 0, 0, 0]
    with pytest.raises(FeatureStoreError, match=r"incomplete \(4 of 6 images not done\).*imcap features"):
        FeatureStore.open(data)

    sizes = count_encoded(monkeypatch, encoder)
    summary = extract_features(data, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    assert sum(sizes) == 3 and summary["encoded"] == 3 and summary["skipped"] == 2 and summary["done"] == 5
    a, b = FeatureStore.open(data), FeatureStore.open(full)
    assert np.array_equal(a.status, b.status) and np.array_equal(a.features, b.features)


def test_rows_marked_not_done_are_recomputed_identically(tmp_path, encoder, monkeypatch):
    data = make_data_dir(tmp_path / "data", corrupt_at=None)
    extract_features(data, encoder=encoder, image_size=SIZE, batch_size=1, progress=False)
    d = data / "features" / f"efficientnet-lite0-{SIZE}"
    before = np.fromfile(d / "features.f16", dtype=np.float16).copy()
    status = np.fromfile(d / "status.u8", dtype=np.uint8)
    status[[1, 4]] = 0
    status.tofile(d / "status.u8")
    mm = np.memmap(d / "features.f16", dtype=np.float16, mode="r+", shape=(5, 4, 1280))
    mm[[1, 4]] = 0
    mm.flush()
    del mm

    sizes = count_encoded(monkeypatch, encoder)
    summary = extract_features(data, encoder=encoder, image_size=SIZE, batch_size=1, progress=False)
    assert sizes == [1, 1] and summary["encoded"] == 2 and summary["failed"] == []
    assert np.array_equal(np.fromfile(d / "features.f16", dtype=np.float16), before)


def test_a_fixed_image_is_retried_and_loses_its_failure(tmp_path, encoder):
    data = make_data_dir(tmp_path / "data")
    extract_features(data, encoder=encoder, image_size=SIZE, progress=False)
    Image.new("RGB", (20, 30), (0, 128, 255)).save(data / "images" / "bad.png")
    summary = extract_features(data, encoder=encoder, image_size=SIZE, progress=False)
    assert summary["encoded"] == 1 and summary["failed"] == [] and summary["done"] == 6
    store = FeatureStore.open(data)
    assert store.ok.all() and store.index["failures"] == []
    torch.testing.assert_close(store.get([2]), encode_directly(encoder, data, [2]), atol=1e-2, rtol=2e-3)


def test_store_for_other_images_or_encoder_is_refused(tmp_path, encoder):
    data = make_data_dir(tmp_path / "data")
    extract_features(data, encoder=encoder, image_size=SIZE, progress=False)
    dataset = json.loads((data / "dataset.json").read_text())
    dataset["images"].pop()
    (data / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(FeatureStoreError, match="another dataset.json"):
        FeatureStore.open(data)
    with pytest.raises(FeatureStoreError, match=r"N 6 != 5 images.*overwrite"):
        extract_features(data, encoder=encoder, image_size=SIZE, progress=False)

    random = build_encoder("efficientnet-lite0", SIZE, pretrained=False)
    with pytest.raises(FeatureStoreError, match="weights"):
        extract_features(data, encoder=random, image_size=SIZE, progress=False)
    summary = extract_features(data, encoder=random, image_size=SIZE, progress=False, overwrite=True)
    assert summary["images"] == 5 and summary["done"] == 4
    assert FeatureStore.open(data).spec.weights == "random"


def test_open_errors_and_choice(tmp_path, encoder):
    data = make_data_dir(tmp_path / "data")
    with pytest.raises(FeatureStoreError, match="run imcap features .* first"):
        FeatureStore.open(data)
    extract_features(data, encoder=encoder, image_size=SIZE, progress=False)
    extract_features(data, encoder=build_encoder("efficientnet-lite0", 32), image_size=32, progress=False)
    with pytest.raises(FeatureStoreError, match="several feature stores.*lite0-32, efficientnet-lite0-64"):
        FeatureStore.open(data)
    assert FeatureStore.open(data, image_size=32).grid == (1, 1)
    assert FeatureStore.open(data, "efficientnet-lite0", SIZE).grid == (2, 2)
    lite2 = "no feature store for efficientnet-lite2.*--encoder efficientnet-lite2"
    with pytest.raises(FeatureStoreError, match=lite2):
        FeatureStore.open(data, encoder="efficientnet-lite2")
    with pytest.raises(FeatureStoreError, match="imcap prepare"):
        extract_features(tmp_path / "empty", encoder=encoder, image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="built for 64"):
        extract_features(data, encoder=encoder, image_size=224, progress=False)


KILLED_RUN = """
import sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
from imcap.encoders import build_encoder
from imcap.features import extract_features
enc = build_encoder("efficientnet-lite0", {size})
forward = enc.forward
def slow(x):
    time.sleep(0.05)
    return forward(x)
enc.forward = slow
extract_features({data!r}, encoder=enc, image_size={size}, batch_size=2, progress=False)
"""


def test_kill_9_never_marks_a_row_done_without_its_features(tmp_path, encoder):
    data = make_data_dir(tmp_path / "data", n_good=30, corrupt_at=None)
    code = textwrap.dedent(KILLED_RUN.format(repo=str(REPO), size=SIZE, data=str(data)))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    status_file = data / "features" / f"efficientnet-lite0-{SIZE}" / "status.u8"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if status_file.exists() and np.fromfile(status_file, dtype=np.uint8).sum() >= 6:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        time.sleep(0.07)  # land somewhere inside a later batch
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()

    status = np.fromfile(status_file, dtype=np.uint8)
    done = np.flatnonzero(status == 1)
    assert 6 <= len(done) < 30
    features = np.fromfile(status_file.with_name("features.f16"), dtype=np.float16).reshape(30, 4, 1280)
    expected = encode_directly(encoder, data, range(30)).numpy()  # (30, P, D)
    np.testing.assert_allclose(features[done], expected[done], atol=1e-2, rtol=2e-3)

    summary = extract_features(data, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    assert summary["encoded"] == 30 - len(done) and summary["done"] == 30
    np.testing.assert_allclose(FeatureStore.open(data).get(range(30)).numpy(), expected, atol=1e-2, rtol=2e-3)


def test_reuse_copies_the_same_photos_from_another_data_dir_and_encodes_the_rest(tmp_path, encoder, monkeypatch):
    english = make_data_dir(tmp_path / "en", corrupt_at=None)
    extract_features(english, encoder=encoder, image_size=SIZE, batch_size=2, progress=False)
    # the same photos with other captions, listed in another order, plus one photo the English set lacks
    d = json.loads((english / "dataset.json").read_text())
    Image.new("RGB", (30, 30), (200, 10, 10)).save(Path(d["image_root"]) / "extra.png")
    d["images"] = [*reversed(d["images"]), {**d["images"][0], "id": "extra.png", "file": "extra.png"}]
    d["language"] = "zh"
    chinese = tmp_path / "zh"
    chinese.mkdir()
    (chinese / "dataset.json").write_text(json.dumps(d))
    sizes = count_encoded(monkeypatch, encoder)
    summary = extract_features(chinese, encoder=encoder, image_size=SIZE, batch_size=2, progress=False, reuse=english)
    assert (summary["copied"], summary["encoded"], sizes) == (5, 1, [1])  # only the new photo went through the CNN
    en, zh = FeatureStore.open(english), FeatureStore.open(chinese)
    for row in range(5):
        assert np.array_equal(zh.features[row], en.features[4 - row])
    torch.testing.assert_close(zh.get([5]), encode_directly(encoder, chinese, [5]).half().float())


def test_reuse_of_a_data_dir_without_that_store_is_one_line(tmp_path, encoder):
    data = make_data_dir(tmp_path / "a", corrupt_at=None)
    (tmp_path / "b").mkdir()
    with pytest.raises(FeatureStoreError, match=r"no feature store to reuse .*imcap features"):
        extract_features(data, encoder=encoder, image_size=SIZE, progress=False, reuse=tmp_path / "b")


def test_a_uint8_store_takes_half_the_bytes_and_reads_within_half_a_step(tmp_path, encoder):
    half, byte = make_data_dir(tmp_path / "f16"), make_data_dir(tmp_path / "u8")
    extract_features(half, encoder=encoder, image_size=SIZE, progress=False)
    summary = extract_features(byte, encoder=encoder, image_size=SIZE, progress=False, dtype="uint8")
    assert (summary["dtype"], summary["bytes_per_image"], summary["done"]) == ("uint8", 4 * 1280, 5)
    d = byte / "features" / f"efficientnet-lite0-{SIZE}"
    assert sorted(p.name for p in d.iterdir()) == ["features.u8", "index.json", "status.u8"]
    assert (d / "features.u8").stat().st_size == 6 * 4 * 1280
    a, b = FeatureStore.open(half), FeatureStore.open(byte)
    assert b.features.dtype == np.uint8 and b.scale == pytest.approx(6 / 255)
    rows = [5, 0, 3]
    want, got = a.get(rows), b.get(rows)
    assert got.dtype == torch.float32 and float(got.min()) >= 0 and float(got.max()) <= 6
    assert float((got - want).abs().max()) <= 6 / 255 / 2 + 2e-3  # half a step, and float16's own rounding
    assert float((got - want).abs().max()) > 0  # it is coarser than float16
    again = extract_features(byte, encoder=encoder, image_size=SIZE, progress=False)  # dtype None: the store's
    assert (again["dtype"], again["encoded"], again["skipped"]) == ("uint8", 0, 5)


def test_a_store_of_another_dtype_is_refused_and_reuse_converts(tmp_path, encoder, monkeypatch):
    half = make_data_dir(tmp_path / "f16", corrupt_at=None)
    extract_features(half, encoder=encoder, image_size=SIZE, progress=False)
    with pytest.raises(FeatureStoreError, match=r"dtype float16 != uint8.*overwrite"):
        extract_features(half, encoder=encoder, image_size=SIZE, progress=False, dtype="uint8")
    with pytest.raises(ValueError, match="dtype must be one of float16, uint8"):
        extract_features(half, encoder=encoder, image_size=SIZE, progress=False, dtype="int4", overwrite=True)
    assert FeatureStore.open(half).features.dtype == np.float16  # untouched by the refusals

    byte = tmp_path / "u8"
    byte.mkdir()
    (byte / "dataset.json").write_text((half / "dataset.json").read_text())
    sizes = count_encoded(monkeypatch, encoder)
    summary = extract_features(byte, encoder=encoder, image_size=SIZE, progress=False, dtype="uint8", reuse=half)
    assert (summary["copied"], summary["encoded"], sizes) == (5, 0, [])
    a, b = FeatureStore.open(half), FeatureStore.open(byte)
    assert float((a.get(range(5)) - b.get(range(5))).abs().max()) <= 6 / 255 / 2 + 1e-6  # rounded once, from float16

"""The HTTP API through the ASGI test client, on a tiny random-weight model (no files, no training)."""

import base64
import io
import shutil
import re
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from imcap import checkpoint as ckpt
from imcap.api import Captioner
from imcap.encoders import encoder_spec
from imcap.model import ModelConfig, ShowAttendTell
from imcap.server import WEB_DIR, create_app
from imcap.synth import draw_scene
from imcap.text import END, PAD, START, Vocabulary
from test_decoding import repeats_an_ngram

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "right"]


def tiny_run(path, image_size=64):
    """A checkpoint of a tiny random decoder over a random-weight encoder; it never says <end>, so captions
    have max_length words."""
    torch.manual_seed(0)
    vocab = Vocabulary.build([WORDS], min_count=1)
    spec = encoder_spec("efficientnet-lite0", image_size)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=8,
                                       hidden_dim=16, attention_dim=8)).eval()
    with torch.no_grad():
        model.out.bias[[PAD, START, END]] = -30.0
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(),
            "language": "en", "metrics": {"BLEU-4": 0.5, "CIDEr": 1.25}, "progress": {"epoch": 3},
            "data": {"data_dir": "/somewhere/private/scenes-data", "format": "karpathy", "features": "x"}}
    ckpt.save_checkpoint(path / "best", model, meta)
    return path


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return Captioner.load(tiny_run(tmp_path_factory.mktemp("server-run")))


@pytest.fixture(scope="module")
def client(captioner):
    with TestClient(create_app(captioner, max_upload_bytes=300_000)) as c:
        yield c


def png(seed=0, index=0, size=96) -> bytes:
    image, _, _ = draw_scene(seed, index, image_size=size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=20_000, height=20_000) -> bytes:
    """A PNG header claiming width x height pixels (over images.MAX_PIXELS), with almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def post(client, files, **options):
    return client.post("/v1/captions", files=[("images", f) for f in files], data={k: str(v) for k, v in options.items()})


def test_one_image_gets_a_caption_with_tokens_and_score(client):
    r = post(client, [("scene.png", png(), "image/png")], max_length=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["options"] == {"beam_size": 3, "n_best": 1, "max_length": 5, "length_penalty": 0.0,
                               "no_repeat_ngram": 0, "attention": False, "overlays": False}
    assert body["grid"] == [2, 2]
    [result] = body["results"]
    assert result["status"] == 200 and result["error"] is None and result["filename"] == "scene.png"
    assert (result["width"], result["height"]) == (96, 96)
    [best] = result["captions"]
    assert len(best["tokens"]) == 5 and set(best["tokens"]) <= set(WORDS) | {"<unk>"}
    assert result["caption"] == best["caption"] == " ".join(best["tokens"])
    assert isinstance(best["score"], float) and best["finished"] is False
    assert best["attention"] is None and best["overlays"] is None


def test_attention_grids_and_overlays_on_request(client):
    r = post(client, [("a.png", png(), "image/png")], beam_size=3, n_best=2, max_length=4, attention="true",
             overlays="true")
    assert r.status_code == 200, r.text
    captions = r.json()["results"][0]["captions"]
    assert len(captions) == 2 and captions[0]["score"] >= captions[1]["score"]
    for c in captions:
        att = np.array(c["attention"])
        assert att.shape == (len(c["tokens"]) + c["finished"], 2, 2)
        assert np.allclose(att.sum(axis=(1, 2)), 1, atol=1e-3)
        assert len(c["overlays"]) == len(att)
        head, data = c["overlays"][0].split(",", 1)
        assert head == "data:image/png;base64"
        overlay = Image.open(io.BytesIO(base64.b64decode(data)))
        assert overlay.format == "PNG" and max(overlay.size) <= 256


def test_matches_the_python_api(client, captioner):
    data = png(1, 3)
    r = post(client, [("x.png", data, "image/png")], beam_size=2, max_length=6)
    expected = captioner.caption([Image.open(io.BytesIO(data))], beam_size=2, max_length=6)[0]
    assert r.json()["results"][0]["caption"] == expected.caption


def test_a_bad_image_among_good_ones_gets_its_own_error(client):
    files = [("one.png", png(0, 1), "image/png"), ("notes.txt", b"hello, not an image", "text/plain"),
             ("bomb.png", bomb_png(), "image/png"), ("two.png", png(0, 2), "image/png")]
    r = post(client, files, max_length=3)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    assert [x["filename"] for x in results] == ["one.png", "notes.txt", "bomb.png", "two.png"]
    assert [x["status"] for x in results] == [200, 415, 422, 200]
    assert "notes.txt" in results[1]["error"] and "not a recognised image" in results[1]["error"]
    assert "bomb.png" in results[2]["error"] and "decompression bomb" in results[2]["error"]
    assert results[0]["caption"] and results[3]["caption"] and not results[1]["captions"]


@pytest.mark.parametrize("files, status, words", [
    ([("a.txt", b"plain text", "text/plain")], 415, "not a recognised image format"),
    ([("a.txt", b"plain text", "text/plain"), ("b.bin", bytes(range(256)), "image/jpeg")], 415, "no image could"),
    ([("bomb.png", bomb_png(), "image/png")], 422, "decompression bomb"),
    ([("cut.png", png()[:200], "image/png")], 422, "cut.png"),
    ([("empty.jpg", b"", "image/jpeg")], 415, "empty.jpg"),
    ([("bomb.png", bomb_png(), "image/png"), ("a.txt", b"text", "text/plain")], 422, "no image could"),
])
def test_a_request_where_every_image_is_bad_fails_with_415_or_422(client, files, status, words):
    r = post(client, files)
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"] and "\n" not in body["error"]
    assert [x["filename"] for x in body["results"]] == [f[0] for f in files]


@pytest.mark.parametrize("options, field", [
    ({"beam_size": 0}, "beam_size"),
    ({"beam_size": 11}, "beam_size"),
    ({"beam_size": "three"}, "beam_size"),
    ({"max_length": 0}, "max_length"),
    ({"max_length": 10_000}, "max_length"),
    ({"length_penalty": -1}, "length_penalty"),
    ({"n_best": 0}, "n_best"),
    ({"beam_size": 2, "n_best": 3}, "n_best"),
    ({"no_repeat_ngram": 1}, "no_repeat_ngram"),
    ({"no_repeat_ngram": 61}, "no_repeat_ngram"),
    ({"attention": "maybe"}, "attention"),
])
def test_options_out_of_range_are_422_with_a_message(client, options, field):
    r = post(client, [("a.png", png(), "image/png")], **options)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"{field}: ")


def test_no_repeat_ngram_reaches_the_search(client):
    r = post(client, [("scene.png", png(), "image/png")], beam_size=2, n_best=2, max_length=12, no_repeat_ngram=2)
    assert r.status_code == 200, r.text
    assert r.json()["options"]["no_repeat_ngram"] == 2
    assert not any(repeats_an_ngram(caption["tokens"], 2) for caption in r.json()["results"][0]["captions"])


def test_missing_or_too_many_images_are_422(client):
    r = client.post("/v1/captions", data={"beam_size": "2"})
    assert r.status_code == 422 and "images" in r.json()["error"]
    r = post(client, [("a.png", b"x", "image/png")] * 17)
    assert r.status_code == 422 and "at most 16" in r.json()["error"]


def test_upload_over_the_limit_is_413_by_header_and_while_reading(client):
    big = [("big.png", b"\0" * 400_000, "image/png")]
    r = post(client, big)
    assert r.status_code == 413 and "300,000 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        yield b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--xyz--\r\n"

    r = client.post("/v1/captions", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert post(client, [("small.png", png(), "image/png")], max_length=2).status_code == 200


@pytest.mark.parametrize("kwargs", [
    {"content": b"\x00garbage", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
    {"content": b"--zz\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nabc", "headers": {"Content-Type": "multipart/form-data; boundary=zz"}},
    {"json": {"images": ["/etc/passwd"]}},
    {"data": {"images": "/etc/passwd"}},
    {"content": b"", "headers": {"Content-Type": "image/png"}},
])
def test_garbage_requests_are_4xx_json_never_500(client, kwargs):
    r = client.post("/v1/captions", **kwargs)
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


def test_file_names_are_only_echoed_never_opened(client):
    r = post(client, [("../../etc/passwd", b"not an image", "text/plain"), ("C:\\x\\ok.png", png(), "image/png")],
             max_length=2)
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["passwd", "ok.png"]
    assert "root:" not in r.text


def occupy(app, requests: list[threading.Thread], started: threading.Event) -> None:
    """Start two requests: the first runs (its caption call sets `started`), the second waits in the queue."""
    requests[0].start()
    assert started.wait(10)
    requests[1].start()
    deadline = time.time() + 10
    while app.state.queue.waiting < 1 and time.time() < deadline:
        time.sleep(0.01)


def test_busy_server_answers_503_with_retry_after(captioner):
    release, started = threading.Event(), threading.Event()
    real_caption = captioner.caption

    def slow_caption(*args, **kwargs):
        started.set()
        release.wait(10)
        return real_caption(*args, **kwargs)

    app = create_app(captioner, max_concurrency=1, max_queue=1)
    statuses = []
    with TestClient(app) as client:
        captioner.caption = slow_caption
        try:
            def send():
                statuses.append(post(client, [("a.png", png(), "image/png")], max_length=2).status_code)

            workers = [threading.Thread(target=send) for _ in range(2)]
            occupy(app, workers, started)
            assert client.get("/healthz").json() == {"status": "ok", "running": 1, "waiting": 1}
            r = post(client, [("a.png", png(), "image/png")], max_length=2)
            assert r.status_code == 503
            assert int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["error"]
        finally:
            release.set()
            for w in workers:
                w.join(20)
            captioner.caption = real_caption
    assert statuses == [200, 200]


def test_healthz_and_model_metadata(client, captioner):
    assert client.get("/healthz").json() == {"status": "ok", "running": 0, "waiting": 0}
    info = client.get("/v1/model").json()
    assert info["vocab_size"] == len(captioner.vocab)
    assert info["encoder"] == {"name": "efficientnet-lite0", "image_size": 64, "grid": [2, 2], "feature_dim": 1280,
                               "pretrained": False}
    assert info["training_data"] == {"format": "karpathy", "features": "x", "name": "scenes-data"}  # no full path
    assert info["metrics"] == {"BLEU-4": 0.5, "CIDEr": 1.25} and info["epochs"] == 3
    assert info["limits"]["max_upload_bytes"] == 300_000 and info["limits"]["max_images"] == 16


def test_openapi_schema_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    post_op = schema["paths"]["/v1/captions"]["post"]
    assert "multipart/form-data" in post_op["requestBody"]["content"]
    assert {"200", "413", "415", "422", "503"} <= set(post_op["responses"])
    assert {"/v1/model", "/healthz"} <= set(schema["paths"])
    form = schema["components"]["schemas"][post_op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]]
    assert {"images", "beam_size", "n_best", "max_length", "attention", "overlays"} <= set(form["properties"])
    assert form["properties"]["beam_size"]["maximum"] == 10


def test_unknown_paths_and_methods_are_json(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"] == "not found: /v1/nope"
    r = client.get("/v1/captions")
    assert r.status_code == 405 and r.json()["error"]


def test_page_and_its_files_are_served_and_load_nothing_from_the_internet(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(ref.startswith("/") for ref in refs), refs
    for ref in {ref for ref in refs if ref.startswith("/static/")}:
        assert client.get(ref).status_code == 200, ref
    for f in WEB_DIR.iterdir():
        text = f.read_text(encoding="utf-8").replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"{f.name} refers to another host"
    assert client.get("/static/../server.py").status_code == 404


def test_an_ensemble_run_dir_serves_captions_and_names_its_members(tmp_path):
    run = tiny_run(tmp_path / "ens")
    for member in ("m1", "m2"):
        shutil.copytree(run / "best", tmp_path / "ens-dir" / member / "best")
    (tmp_path / "ens-dir" / "ensemble.json").write_text('{"members": ["m1", "m2"]}')
    ensemble = Captioner.load(tmp_path / "ens-dir")
    with TestClient(create_app(ensemble)) as c:
        assert c.get("/v1/model").json()["name"] == "m1 + m2"
        r = c.post("/v1/captions", files=[("images", ("a.png", png(), "image/png"))])
        assert r.status_code == 200 and r.json()["results"][0]["caption"]

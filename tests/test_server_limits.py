"""What one HTTP request may ask for, one image's failure among others, and the start-up self-check (issue 13)."""

import asyncio
import base64
import io
import math
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file, save_file

from imcap import server
from imcap.api import Captioner
from imcap.checkpoint import CheckpointError
from imcap.server import OVERLAY_SIDE, CaptionOptions, CaptionQueue, QueueFull, create_app, reply_bytes
from test_hardening import _encode, cli_env, imcap_cmd
from test_server import captioner, occupy, png, post, tiny_run  # noqa: F401 - captioner is a fixture

OLD_WORST = {"beam_size": 10, "n_best": 10, "max_length": 60, "attention": "true", "overlays": "true"}


@pytest.fixture(scope="module")
def client(captioner):  # noqa: F811
    with TestClient(create_app(captioner)) as c:  # the default limits
        yield c


def scenes(n: int, size: int = 96) -> list[tuple[str, bytes, str]]:
    return [(f"{i}.png", png(0, i, size=size), "image/png") for i in range(n)]


# ------------------------------------------------------------------------------------------ request limits


@pytest.mark.parametrize("attention, overlays", [("true", "true"), ("false", "false")],
                         ids=["with-overlays", "without"])
def test_the_old_worst_request_is_refused_in_one_line_before_any_work(client, captioner, monkeypatch,  # noqa: F811
                                                                      attention, overlays):
    monkeypatch.setattr(captioner, "caption", lambda *a, **k: pytest.fail("captioned a refused request"))
    r = post(client, scenes(16), **{**OLD_WORST, "attention": attention, "overlays": overlays})
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert message == ("request too costly: 16 images x beam_size 10 x max_length 60 = 9,600, over the budget of "
                       "2,400; send fewer images or lower beam_size or max_length")


@pytest.mark.parametrize("n, beam_size, max_length, status", [
    (16, 3, 30, 200),  # the default options
    (16, 5, 30, 200),  # = the budget
    (4, 10, 60, 200),  # = the budget
    (16, 5, 31, 422),
    (5, 10, 60, 422),
])
def test_a_request_within_the_budget_passes_and_one_over_it_does_not(client, n, beam_size, max_length, status):
    r = post(client, scenes(n), beam_size=beam_size, n_best=beam_size, max_length=max_length, attention="true")
    assert r.status_code == status, r.text
    if status == 200:
        assert all(len(x["captions"]) == beam_size for x in r.json()["results"])
    else:
        assert r.json()["error"].startswith("request too costly: ") and "over the budget of 2,400" in r.json()["error"]


@pytest.mark.parametrize("n, n_best, max_length, words", [
    (5, 1, 5, "overlays: at most 4 images per request with overlays=true, got 5; send fewer images or set "
              "overlays=false"),
    (1, 3, 60, "overlays: up to 1 images x n_best 3 x (max_length 60 + 1) = 183 overlay images, over the limit of 128"),
    (4, 1, 32, "= 132 overlay images, over the limit of 128"),
], ids=["images", "n-best", "length"])
def test_overlays_beyond_the_caps_are_refused(client, n, n_best, max_length, words):
    r = post(client, scenes(n), beam_size=3, n_best=n_best, max_length=max_length, overlays="true")
    assert r.status_code == 422, r.text
    assert words in r.json()["error"] and "\n" not in r.json()["error"]


def test_overlays_up_to_the_caps_are_drawn_small(client):
    r = post(client, scenes(4), beam_size=2, n_best=1, max_length=31, overlays="true")  # 4 x 1 x 32 = 128 overlays
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sum(len(c["overlays"]) for x in results for c in x["captions"]) == 4 * 31  # the model never says <end>
    overlay = results[0]["captions"][0]["overlays"][0].split(",", 1)[1]
    assert max(Image.open(io.BytesIO(base64.b64decode(overlay))).size) == OVERLAY_SIDE


@pytest.mark.parametrize("options", [
    {"beam_size": 1, "n_best": 1, "max_length": 1},
    {"beam_size": 3, "n_best": 3, "max_length": 10, "attention": "true", "overlays": "true"},
], ids=["smallest", "attention-and-overlays"])
def test_the_reply_estimate_is_an_upper_bound_and_is_enforced(captioner, options):  # noqa: F811
    """Noise images: their overlays compress worst. The estimate holds; one byte less of limit refuses."""
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (200, 300, 3), np.uint8)) for _ in range(2)]
    files = [(f"noise-{i}.png", _encode(image, "PNG"), "image/png") for i, image in enumerate(noise)]
    parsed = CaptionOptions(length_penalty=0.0, **{"attention": False, "overlays": False, **options})
    estimate = reply_bytes(2, parsed, captioner.encoder_spec.grid)
    with TestClient(create_app(captioner)) as c:
        r = post(c, files, **options)
        assert r.status_code == 200 and len(r.content) <= estimate, (len(r.content), estimate)
    with TestClient(create_app(captioner, max_reply_bytes=estimate - 1)) as c:
        r = post(c, files, **options)
        assert r.status_code == 422 and r.json()["error"].startswith(f"reply too large: up to {estimate:,} bytes")


def test_the_limits_are_in_the_model_info_and_the_schema(client):
    limits = client.get("/v1/model").json()["limits"]
    assert {k: limits[k] for k in ("max_cost", "max_overlay_images", "max_overlays", "overlay_side", "max_reply_bytes",
                                   "max_retry_after")} == {
        "max_cost": 2_400, "max_overlay_images": 4, "max_overlays": 128, "overlay_side": OVERLAY_SIDE,
        "max_reply_bytes": 16_000_000, "max_retry_after": 60}
    schema = client.get("/openapi.json").json()
    assert "images x beam_size x max_length" in schema["info"]["description"]
    max_cost = schema["components"]["schemas"]["Limits"]["properties"]["max_cost"]
    assert "images x beam_size x max_length" in max_cost["description"]


# ------------------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize("waiting_cost", [200_000, 600_000, 10_000_000])
def test_retry_after_is_the_queued_cost_at_the_measured_rate_and_capped(waiting_cost):
    """A costly job measures about 5e-5 s per cost unit (0.5 s for 10,000); then a job of 200,000 runs and one
    waits: Retry-After is their cost at that rate (about 20 s, 40 s), capped at 60 s however much waits."""
    async def scenario() -> tuple[int, float]:
        queue = CaptionQueue(max_concurrency=1, max_queue=1, max_retry_after=60)
        await queue.run(10_000, time.sleep, 0.5)
        release = threading.Event()
        running = asyncio.ensure_future(queue.run(200_000, release.wait, 10))
        waiting = asyncio.ensure_future(queue.run(waiting_cost, time.sleep, 0))
        await asyncio.sleep(0.1)
        try:
            with pytest.raises(QueueFull) as refused:
                await queue.run(1, time.sleep, 0)
            return refused.value.retry_after, queue.seconds_per_cost
        finally:
            release.set()
            await asyncio.gather(running, waiting)
            queue.shutdown()

    retry_after, seconds_per_cost = asyncio.run(scenario())
    assert 5e-5 <= seconds_per_cost <= 1.5e-4  # the costly job's 0.5 s (a loaded machine adds a little)
    assert retry_after == min(60, math.ceil((200_000 + waiting_cost) * seconds_per_cost))


def test_a_costly_request_does_not_inflate_retry_after_for_small_ones(captioner, monkeypatch):  # noqa: F811
    """A request at the budget that takes 2 s, then small requests queued: Retry-After is a second, not the
    costly request's duration times the queue."""
    release, started = threading.Event(), threading.Event()
    real_caption = captioner.caption

    def costly_caption(images, **kwargs):
        time.sleep(2.0)
        return real_caption(images, **kwargs)

    def blocked_caption(images, **kwargs):
        started.set()
        release.wait(10)
        return real_caption(images, **kwargs)

    app = create_app(captioner, max_concurrency=1, max_queue=1)
    with TestClient(app) as c:
        monkeypatch.setattr(captioner, "caption", costly_caption)
        assert post(c, scenes(16), beam_size=5, max_length=30).status_code == 200  # cost 2,400
        monkeypatch.setattr(captioner, "caption", blocked_caption)
        small = [threading.Thread(target=post, args=(c, scenes(1)), kwargs={"max_length": 5}) for _ in range(2)]
        try:
            occupy(app, small, started)
            r = post(c, scenes(1), max_length=5)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.headers
            assert r.json()["error"] == "server busy: too many requests waiting; retry in 1 s"
        finally:
            release.set()
            for t in small:
                t.join(20)


# -------------------------------------------------------------------------------- one image's failure


def _fail_for(image: Image.Image) -> bool:
    return image.size[0] != image.size[1]  # the odd one out: the only image that is not square


def _raise(error: Exception):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize("stage, words", [("decode", "cannot decode it"), ("caption", "cannot caption it"),
                                          ("overlays", "cannot draw its attention overlays")],
                         ids=["decode", "caption", "overlays"])
def test_one_images_failure_at_any_stage_never_loses_the_others(client, captioner, monkeypatch,  # noqa: F811
                                                                 stage, words):
    if stage == "decode":
        real_open = server.open_image
        monkeypatch.setattr(server, "open_image", lambda f, name: _raise(RuntimeError("broken decoder"))()
                            if name == "odd.png" else real_open(f, name))
    elif stage == "caption":
        real_caption = captioner.caption

        def caption(images, **kwargs):
            if any(_fail_for(im) for im in images):
                raise RuntimeError("broken model")
            return real_caption(images, **kwargs)

        monkeypatch.setattr(captioner, "caption", caption)
    else:
        real_overlay = server.heatmap_overlay

        def overlay(image, alpha, **kwargs):
            if _fail_for(image):
                raise ValueError("broken drawing")
            return real_overlay(image, alpha, **kwargs)

        monkeypatch.setattr(server, "heatmap_overlay", overlay)
    odd = ("odd.png", _encode(Image.new("RGB", (60, 30), (200, 30, 30)), "PNG"), "image/png")
    r = post(client, [scenes(1)[0], odd, scenes(2)[1]], max_length=4, overlays="true")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [200, 422, 200]
    assert results[1]["error"].startswith(f"odd.png: {words} (") and "\n" not in results[1]["error"]
    assert results[0]["caption"] and results[2]["caption"] and not results[1]["captions"]
    r = post(client, [odd], max_length=4, overlays="true")  # alone: the request fails with its error
    assert r.status_code == 422 and r.json()["error"].startswith(f"odd.png: {words}")


def test_a_100000_by_1_png_with_overlays_keeps_the_good_image(client):
    line = ("line.png", _encode(Image.new("RGB", (100_000, 1), (10, 200, 10)), "PNG"), "image/png")
    r = post(client, [line, scenes(1)[0]], max_length=4, overlays="true")
    assert r.status_code == 200, r.text
    odd, good = r.json()["results"]
    assert good["status"] == 200 and good["caption"] and len(good["captions"][0]["overlays"]) == 4
    assert odd["status"] == 200 or (odd["status"] == 422 and "\n" not in odd["error"]), odd
    assert (odd["width"], odd["height"]) == (100_000, 1) or odd["error"]


# ---------------------------------------------------------------------------------------------- self-check


def test_create_app_refuses_a_model_that_cannot_caption(tmp_path, monkeypatch):
    broken = Captioner.load(tiny_run(tmp_path / "run"))
    monkeypatch.setattr(broken.model, "step", _raise(RuntimeError("no step today")))
    with pytest.raises(CheckpointError) as e:
        create_app(broken)
    assert str(e.value) == (f"{tmp_path / 'run' / 'best'}: self-check on a blank image failed: cannot caption it "
                            "(RuntimeError: no step today)")


def test_imcap_serve_refuses_a_run_that_cannot_caption_before_listening(tmp_path):
    """NaN output weights load (they fit the config) but cannot caption: one line, exit 1, never listens."""
    run = tiny_run(tmp_path / "run")
    weights = load_file(run / "best" / "model.safetensors")
    weights["out.bias"] = torch.full_like(weights["out.bias"], float("nan"))
    save_file(weights, run / "best" / "model.safetensors")
    r = subprocess.run(imcap_cmd("serve", run, "--port", "0", "--threads", "1"), capture_output=True, text=True,
                       env=cli_env(), timeout=60, check=False)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert r.stderr.startswith("imcap serve: error: ") and str(run) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

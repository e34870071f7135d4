"""The web page end to end: `imcap serve` on 127.0.0.1, Debian's Chromium (headless) driven by Playwright.

Needs /usr/bin/chromium (apt-get install chromium chromium-driver; `make test` installs it) and the
playwright Python package (the dev extra); Playwright's own browser download is not used. Without them
the tests are skipped, except in CI, where they fail.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from imcap.synth import draw_scene
from test_server import tiny_run  # a tiny random decoder that never says <end>

CHROMIUM = Path(os.environ.get("IMCAP_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Sum of the heat canvas's alpha channel: 0 while no map is drawn.
CANVAS_INK = """() => {
  const c = document.getElementById("heat");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let ink = 0;
  for (let i = 3; i < d.length; i += 4) ink += d[i];
  return ink;
}"""


def _missing_browser() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: apt-get install chromium chromium-driver (make test does it as root)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is missing: pip install -e '.[dev]'"
    return None


@pytest.fixture(scope="module")
def browser():
    problem = _missing_browser()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser, tmp_path_factory):
    """Base URL of `python -m imcap serve` on a free loopback port; stopped after the module."""
    root = tmp_path_factory.mktemp("browser")
    run = tiny_run(root / "run")
    port = free_port()
    log = open(root / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "imcap", "serve", str(run), "--host", "127.0.0.1", "--port", str(port),
                             "--threads", "1", "--quiet"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"imcap serve did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()  # imcap serve stops on SIGTERM at once: a server that does not is a failure here
        proc.wait(30)
        log.close()


@pytest.fixture
def scene(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    draw_scene(0, 5, image_size=160)[0].save(path)
    return path


def wait_until(page, js: str, timeout: float = 10.0):
    """Poll the JS function `js` until it returns a truthy value (wait_for_function would need eval, which
    the page's Content-Security-Policy forbids)."""
    deadline = time.time() + timeout
    while not (value := page.evaluate(js)):
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {js}")
        time.sleep(0.05)
    return value


def open_page(browser, base, **context):
    ctx = browser.new_context(**context)
    page = ctx.new_page()
    page.problems = []
    page.requests = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(base + "/")
    page.wait_for_selector("#model li:nth-child(2)")  # /v1/model answered
    return page


def upload(page, path: Path, max_words: int = 6) -> None:
    page.click(".options summary")
    page.fill("#maxlen", str(max_words))
    page.set_input_files("#file", str(path))
    page.wait_for_selector(".word")


def test_caption_then_hover_a_word_draws_its_heat_map(browser, server, scene, tmp_path):
    page = open_page(browser, server, viewport={"width": 1100, "height": 760})
    upload(page, scene)
    words = page.locator(".word")
    assert words.count() == 6  # this model never ends a caption: max words
    assert "scene.png" in page.text_content("#status")
    assert page.evaluate(CANVAS_INK) == 0  # no word chosen yet: no map

    words.nth(1).hover()
    wait_until(page, f"() => ({CANVAS_INK})() > 0")
    assert "active" in words.nth(1).get_attribute("class")
    assert page.input_value("#step") == "2"
    assert page.text_content("#step-label").startswith("2/6 · " + words.nth(1).text_content())

    page.mouse.move(1, 1)  # leaving the words goes back to no map
    wait_until(page, f"() => ({CANVAS_INK})() === 0")

    page.click("#play")  # the slider steps through the words by itself
    wait_until(page, "() => Number(document.getElementById('step').value) >= 2")
    assert page.evaluate(CANVAS_INK) > 0

    candidates = page.locator(".cand")
    assert candidates.count() == 3  # the page asks for beam 3, 3 candidates
    second = candidates.nth(1).locator(".text").text_content()
    candidates.nth(1).click()
    assert candidates.nth(1).get_attribute("aria-pressed") == "true"
    assert " ".join(page.locator(".word").all_text_contents()) == second

    shot = tmp_path / "web-page.png"
    words.nth(2).hover()
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
    assert not page.problems, page.problems
    foreign = [u for u in page.requests if not u.startswith((server, "data:", "blob:"))]
    assert not foreign, f"the page fetched from elsewhere: {foreign}"
    page.context.close()


def test_phone_width_tap_a_word_and_no_sideways_scrolling(browser, server, scene, tmp_path):
    page = open_page(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=2)
    upload(page, scene)
    page.locator(".word").nth(0).tap()
    wait_until(page, f"() => ({CANVAS_INK})() > 0")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#photo").bounding_box()
    assert box["width"] > 300  # the picture fills the phone's width
    page.screenshot(path=str(tmp_path / "web-page-phone.png"), full_page=True)
    assert not page.problems, page.problems
    page.context.close()


def test_a_file_that_is_not_an_image_shows_the_server_message(browser, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not really a picture")
    page = open_page(browser, server, viewport={"width": 900, "height": 700})
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "notes.png: not a recognised image format" in page.text_content("#status")
    assert page.locator(".word").count() == 0
    page.context.close()

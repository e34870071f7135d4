"""Hardening (issue #6): bad images through every entry point, bad datasets through `imcap prepare`, kill -9
of `imcap features` and `imcap train` for real, crafted checkpoints. docs/reliability.md maps each case to
its test; the cases already covered elsewhere (tests/test_images.py, test_datasets.py, ...) are not redone."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image, ImageFile, ImageOps
from safetensors.torch import load_file

from imcap import checkpoint as ckpt
from imcap.api import Captioner
from imcap.cli import main
from imcap.datasets import COMMIT_DIR, load_dataset, load_vocab
from imcap.encoders import encoder_spec
from imcap.model import ModelConfig, ShowAttendTell
from imcap.server import create_app
from imcap.text import END, PAD, START, Vocabulary

REPO = Path(__file__).resolve().parents[1]
WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "right"]
# a random kill moment, reproducible; IMCAP_KILL_SEED=<n> tries other moments (e.g. in a loop, to soak)
KILL_SEED = int(os.environ.get("IMCAP_KILL_SEED", "6"))


def run_main(args: list[str]) -> tuple[int, str, list[str]]:
    """`imcap ARGS` in this process: (exit status, stdout, stderr lines)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue().splitlines()


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def imcap_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "imcap", *map(str, args)]


def tiny_run(path: Path) -> Path:
    """A checkpoint of a tiny random decoder over a random-weight encoder (64 px -> 2x2 grid), as in test_server."""
    torch.manual_seed(0)
    vocab = Vocabulary.build([WORDS], min_count=1)
    spec = encoder_spec("efficientnet-lite0", 64)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=8,
                                       hidden_dim=16, attention_dim=8)).eval()
    with torch.no_grad():  # never <end>: every caption has max_length words
        model.out.bias[[PAD, START, END]] = -30.0
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(),
            "language": "en", "metrics": {}, "progress": {"epoch": 1},
            "data": {"data_dir": str(path), "format": "karpathy", "features": "efficientnet-lite0-64"}}
    ckpt.save_checkpoint(path / "best", model, meta)
    return path


# =============================================================================================== bad images


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A 70-byte PNG whose header declares width x height 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def real_bomb() -> bytes:
    """A genuine, fully decodable 9000 x 9000 1-bit PNG (81 M pixels, over images.MAX_PIXELS) of ~10 kB."""
    return _encode(Image.new("1", (9000, 9000)), "PNG")


def body_truncated_jpeg() -> bytes:
    """A JPEG cut in the middle of its entropy-coded data: the header still reads fine."""
    data = _encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG", quality=95)
    return data[: len(data) // 2]


def exif_rotated() -> bytes:
    """40x20 stored, left half red, right half blue, EXIF orientation 6: shown 20x40 with red on top."""
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(img, "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("P", (30, 20), i) for i in (10, 80, 160)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


@dataclass(frozen=True)
class Kind:
    """One kind of image file; `error` is what load_image says (caption, features), None when it is usable."""

    file: str
    content: object = None  # bytes, or a function returning them; None: made by make_kind
    error: str | None = None
    prepare: str | None = "same"  # what prepare does: "same" as error, "missing", or None (kept: header reads)
    http: int | None = 200  # the server's status for an upload of it; None: not a file content (a path case)


KINDS = {
    "zero-byte": Kind("zero.jpg", b"", "empty file (0 bytes)", http=415),
    "truncated-jpeg": Kind("truncated.jpg", body_truncated_jpeg, "corrupt or truncated image", prepare=None, http=422),
    "text-as-jpeg": Kind("text.jpg", b"this is a text file, not a JPEG\n", "not a recognised image format", http=415),
    "header-bomb-png": Kind("bomb.png", header_bomb, "possible decompression bomb", http=422),
    "real-bomb-png": Kind("bomb-real.png", real_bomb, "possible decompression bomb", http=422),
    "cmyk-jpeg": Kind("cmyk.jpg", lambda: _encode(Image.new("RGB", (40, 30), (20, 160, 60)).convert("CMYK"), "JPEG")),
    "16-bit-png": Kind("gray16.png", lambda: _encode(
        Image.fromarray(np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))), "PNG")),
    "palette-png": Kind("palette.png", lambda: _encode(Image.effect_noise((40, 30), 80).convert("RGB").convert("P"), "PNG")),
    "rgba-png": Kind("rgba.png", lambda: _encode(Image.new("RGBA", (40, 30), (200, 20, 20, 100)), "PNG")),
    "grayscale-jpeg": Kind("gray.jpg", lambda: _encode(Image.new("L", (40, 30), 90), "JPEG")),
    "animated-gif": Kind("animated.gif", animated_gif),
    "exif-rotated-jpeg": Kind("exif.jpg", exif_rotated),
    "directory": Kind("folder.jpg", None, "is a directory, not an image", http=None),
    "missing-file": Kind("absent.jpg", None, "no such file", prepare="missing", http=None),
    "path-through-a-file": Kind("zero.jpg/inside.jpg", None, "no such file", prepare="missing", http=None),
    "name-too-long": Kind("n" * 300 + ".jpg", None, "File name too long", prepare="missing", http=None),
    "permission-denied": Kind("locked.png", None, "permission denied", http=None),
}
USABLE = [k for k, kind in KINDS.items() if kind.error is None]


def make_images(folder: Path) -> Path:
    """Every kind in `folder`, plus upright.png / unrotated.png: the EXIF image's pixels as shown / as stored."""
    folder.mkdir(parents=True)
    for kind in KINDS.values():
        if kind.content is not None:
            (folder / kind.file).write_bytes(kind.content() if callable(kind.content) else kind.content)
    (folder / "folder.jpg").mkdir()
    Image.new("RGB", (30, 30), (9, 9, 9)).save(folder / "locked.png")
    os.chmod(folder / "locked.png", 0)  # what denies it when not root; see locked_open() for root
    stored = Image.open(folder / "exif.jpg")
    stored.load()
    ImageOps.exif_transpose(stored).convert("RGB").save(folder / "upright.png")
    stored.convert("RGB").save(folder / "unrotated.png")
    return folder


@contextlib.contextmanager
def locked_open():
    """Opening a file named locked.png raises PermissionError, as chmod 000 does for anyone but root."""
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(builtins, "open", fake_open)
        yield


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = make_images(tmp_path_factory.mktemp("bad-images") / "images")
    yield folder
    os.chmod(folder / "locked.png", 0o644)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("hardening-run"))


@dataclass
class Outcome:
    status: int  # exit status of the command
    ok: dict[str, bool]  # file -> processed (captioned / encoded / kept)
    errors: dict[str, list[str]]  # file -> its error lines
    other_lines: list[str]  # stderr lines naming no file of the batch


def _errors_by_file(lines: list[str], prefix: str, files: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    errors: dict[str, list[str]] = {f: [] for f in files}
    other = []
    for line in lines:
        named = [f for f in files if line.startswith(f"{prefix}{f}: ")]
        if named:
            errors[max(named, key=len)].append(line)
        else:
            other.append(line)
    return errors, other


@pytest.fixture(scope="module")
def caption_outcome(images, run_dir) -> Outcome:
    files = [str(images / k.file) for k in KINDS.values()] + [str(images / "upright.png"), str(images / "unrotated.png")]
    with locked_open():
        status, out, err = run_main(["caption", str(run_dir), *files, "--beam", "1", "--max-length", "4",
                                     "--threads", "1", "--batch-size", "5"])
    captioned = {line.split("\t")[0] for line in out.splitlines()}
    errors, other = _errors_by_file(err, "imcap caption: error: ", files)
    return Outcome(status, {f: f in captioned for f in files}, errors, other)


@pytest.fixture(scope="module")
def features_outcome(images, tmp_path_factory) -> Outcome:
    data = tmp_path_factory.mktemp("bad-images-data")
    files = [k.file for k in KINDS.values()] + ["upright.png", "unrotated.png"]
    dataset = {"version": 1, "format": "lines", "source": "hand-written", "language": "en",
               "image_root": str(images), "max_length": 30,
               "images": [{"id": f, "file": f, "split": "train", "captions": ["x"], "tokens": [["x"]]} for f in files]}
    (data / "dataset.json").write_text(json.dumps(dataset))
    with locked_open():
        status, _, err = run_main(["features", str(data), "--image-size", "64", "--batch-size", "3",
                                   "--threads", "1", "--quiet"])
    store = data / "features" / "efficientnet-lite0-64"
    done = np.fromfile(store / "status.u8", dtype=np.uint8)
    paths = [str(images / f) for f in files]
    errors, other = _errors_by_file(err, "imcap features: error: ", paths)
    outcome = Outcome(status, {p: d == 1 for p, d in zip(paths, done)}, errors, other)
    outcome.status_codes = dict(zip(paths, done.tolist()))
    outcome.rows = np.fromfile(store / "features.f16", dtype=np.float16).reshape(len(files), 4, 1280)
    outcome.row_of = {p: i for i, p in enumerate(paths)}
    return outcome


@pytest.fixture(scope="module")
def prepare_outcome(images, tmp_path_factory) -> Outcome:
    root = tmp_path_factory.mktemp("bad-images-prepare")
    entries = [{"filename": k.file, "split": "train", "sentences": [{"raw": f"a red circle number {i}"}]}
               for i, k in enumerate(KINDS.values())]
    source = root / "captions.json"
    source.write_text(json.dumps({"images": entries}))
    with locked_open():
        status, out, err = run_main(["prepare", "--format", "karpathy", str(source), "--images", str(images),
                                     "--out", str(root / "data"), "--min-count", "1", "--quiet"])
    kept = {im["file"] for im in load_dataset(root / "data")[1]}
    report = json.loads((root / "data" / "report.json").read_text())
    paths = [str(images / k.file) for k in KINDS.values()]
    errors, other = _errors_by_file(err, "imcap prepare: error: ", paths)
    outcome = Outcome(status, {str(images / f): True for f in kept}, errors, other)
    outcome.missing = {p["file"] for p in report["problems"] if "listed but not found" in p["problem"]}
    outcome.summary = out
    return outcome


ENTRY_OUTCOMES = {"caption": "caption_outcome", "features": "features_outcome", "prepare": "prepare_outcome"}


@pytest.mark.parametrize("entry", list(ENTRY_OUTCOMES))
def test_a_batch_with_bad_images_goes_on_and_exits_1(request, entry, images):
    """Every good image is processed, every bad one gets its line, nothing else is printed, exit status 1."""
    outcome: Outcome = request.getfixturevalue(ENTRY_OUTCOMES[entry])
    assert outcome.status == 1
    assert outcome.other_lines == []  # no traceback, no stray lines
    for name in USABLE:
        assert outcome.ok.get(str(images / KINDS[name].file)), name


@pytest.mark.parametrize("entry, kind", [(e, k) for e in ENTRY_OUTCOMES for k in KINDS])
def test_bad_image(request, images, entry, kind):
    """Each kind of file through caption, features and prepare: usable -> processed; else one line
    'imcap ENTRY: error: <file>: <problem>' and the file is not processed."""
    outcome: Outcome = request.getfixturevalue(ENTRY_OUTCOMES[entry])
    k = KINDS[kind]
    path = str(images / k.file)
    expected = k.error if entry != "prepare" or k.prepare == "same" else k.prepare
    if expected is None:
        assert outcome.ok.get(path), f"{kind} was not processed by {entry}"
        assert outcome.errors.get(path) == [], outcome.errors.get(path)
    elif expected == "missing":  # prepare counts listed-but-absent images in its summary, as documented
        assert path in outcome.missing and not outcome.ok.get(path)
        assert outcome.errors[path] == []
    else:
        [line] = outcome.errors[path]
        assert expected in line, line
        assert not outcome.ok.get(path)
        if entry == "features":
            assert outcome.status_codes[path] == 2  # failed, retried by the next run


def test_exif_rotated_image_is_used_upright(images, features_outcome):
    """The CNN sees the EXIF-rotated JPEG exactly as the upright PNG of its pixels, not as stored (caption
    and features both read files with images.load_image; the server's upright size is checked below)."""
    upright, unrotated, exif = (str(images / f) for f in ("upright.png", "unrotated.png", "exif.jpg"))
    shown = Image.open(images / "upright.png")
    assert shown.size == (20, 40) and shown.getpixel((10, 5))[0] > 200 and shown.getpixel((10, 35))[2] > 200
    rows, row = features_outcome.rows, features_outcome.row_of
    np.testing.assert_array_equal(rows[row[exif]], rows[row[upright]])
    assert not np.array_equal(rows[row[exif]], rows[row[unrotated]])  # the check can tell


def _odd_path(tmp_path: Path, kind: str) -> Path:
    if kind == "dangling-symlink":
        (tmp_path / "link.jpg").symlink_to(tmp_path / "nowhere.jpg")
        return tmp_path / "link.jpg"
    if kind == "symlink-loop":
        (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
        return tmp_path / "loop.jpg"
    if kind == "fifo":  # opening it would block until someone writes
        os.mkfifo(tmp_path / "pipe.jpg")
        return tmp_path / "pipe.jpg"
    return tmp_path / "nul\0.jpg"


@pytest.mark.parametrize("kind, words", [("dangling-symlink", "no such file"), ("symlink-loop", "cannot read image"),
                                         ("fifo", "not a regular file"), ("nul-in-name", "cannot read image")])
def test_odd_paths_are_one_line_and_never_block(tmp_path, kind, words):
    from imcap.images import ImageError, load_image, probe_image

    path = _odd_path(tmp_path, kind)
    for read in (load_image, probe_image):
        with pytest.raises(ImageError) as e:
            read(path)
        assert str(e.value).startswith(f"{path}: ") and words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("mode, values, pixel", [("F", 0.5, 128), ("I", 40000, 156), ("F", 300.0, 1)])
def test_float_and_32_bit_tiffs_become_8_bit_rgb(tmp_path, mode, values, pixel):
    from imcap.images import load_image

    array = np.full((6, 8), values, dtype=np.float32 if mode == "F" else np.int32)
    array[0, 0] = 0 if values != 300.0 else 65535  # the range decides the scale: 0-1, 0-255 or 0-65535
    Image.fromarray(array, mode).save(tmp_path / "x.tif")
    out = load_image(tmp_path / "x.tif")
    assert out.mode == "RGB" and out.size == (8, 6) and abs(out.getpixel((3, 3))[0] - pixel) <= 1


@pytest.mark.parametrize("error", [EOFError("ran off the end"), struct.error("unpack requires 4 bytes"),
                                   IndexError("list index out of range"), MemoryError()])
def test_any_decoder_failure_is_an_image_error(monkeypatch, error):
    """Corrupt files can make PIL plugins raise more than OSError; an upload must never become a 500."""
    from imcap.images import ImageError, open_image

    def broken_load(self):
        raise error

    data = _encode(Image.new("RGB", (4, 4)), "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(ImageError) as e:
        open_image(io.BytesIO(data), "up.png")
    assert str(e.value).startswith("up.png: ") and ("corrupt image" in str(e.value) or "memory" in str(e.value))


def test_features_refuses_a_hand_edited_path_outside_the_image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    dataset = {"version": 1, "format": "lines", "source": "x", "language": "en", "image_root": "images", "max_length": 30,
               "images": [{"id": "a", "file": "../../etc/passwd", "split": "train", "captions": ["x"], "tokens": [["x"]]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    status, _, err = run_main(["features", str(tmp_path), "--image-size", "64", "--quiet"])
    assert status == 1 and len(err) == 1 and "images[0].file '../../etc/passwd'" in err[0], err
    assert not (tmp_path / "features").exists()


@pytest.fixture(scope="module")
def client(run_dir):
    with TestClient(create_app(Captioner.load(run_dir))) as c:
        yield c


def _post(client, files, **options):
    return client.post("/v1/captions", files=[("images", f) for f in files],
                       data={"max_length": "3", "beam_size": "1", **{k: str(v) for k, v in options.items()}})


@pytest.mark.parametrize("kind", [k for k, v in KINDS.items() if v.http is not None])
def test_bad_image_http(client, images, kind):
    """Each kind of upload alone: 200 with its size (after EXIF rotation), else 415/422 naming the file."""
    k = KINDS[kind]
    r = _post(client, [(k.file, (images / k.file).read_bytes(), "application/octet-stream")])
    assert r.status_code == k.http, r.text
    body = r.json()
    if k.http == 200:
        [result] = body["results"]
        assert result["caption"] and result["error"] is None
        stored = Image.open(images / k.file)
        expected = (20, 40) if kind == "exif-rotated-jpeg" else stored.size
        assert (result["width"], result["height"]) == expected
    else:  # an empty upload is no image format at all (a file on disk is reported as empty)
        expected = "not a recognised image format" if kind == "zero-byte" else k.error
        assert body["error"].startswith(f"{k.file}: ") and expected in body["error"], body["error"]
        assert "\n" not in body["error"] and body["results"][0]["status"] == k.http


def test_http_batch_of_every_kind_answers_each(client, images):
    kinds = [k for k in KINDS.values() if k.http is not None]
    r = _post(client, [(k.file, (images / k.file).read_bytes(), "image/png") for k in kinds])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [k.http for k in kinds]
    assert all((x["caption"] is not None) == (k.http == 200) for x, k in zip(results, kinds))


# =============================================================================================== bad datasets


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_prepare(tmp_path_factory):
    """A DATA_DIR from a good prepare (lines format, 3 images); tests run bad prepares into the same --out."""
    root = tmp_path_factory.mktemp("datasets")
    for name, colour in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        Image.new("RGB", (16, 12), colour).save(root / f"{name}.jpg")
    source = root / "good.txt"
    source.write_text("a.jpg, a red picture\nb.jpg, a green picture\nc.jpg, a blue picture\n", encoding="utf-8")
    status, _, err = run_main(["prepare", "--format", "lines", str(source), "--out", str(root / "data"),
                               "--min-count", "1", "--val-fraction", "0", "--test-fraction", "0", "--quiet"])
    assert status == 0, err
    return root


def _karpathy(*entries) -> bytes:
    return json.dumps({"images": list(entries)}).encode()


MALFORMED = {  # case: (format, file name, content, words the one error line must hold besides the file)
    "non-utf8-lines": ("lines", "captions.txt", b"a.jpg, a red picture\nb.jpg, caf\xe9 au lait\n", [":2:", "not UTF-8"]),
    "non-utf8-json": ("coco", "captions.json", b'{"images": [],\n\n"annotations": "\xff"}', [":3:", "not UTF-8"]),
    "utf16-lines": ("lines", "captions.txt", "a.jpg, a red picture\n".encode("utf-16"), [":1:", "not UTF-8"]),
    "lines-missing-column": ("lines", "captions.txt", b"a.jpg, a red picture\nb.jpg\n", [":2:", "expected 'image, caption'"]),
    "lines-no-image-name": ("lines", "captions.txt", b"a.jpg, a red picture\n, a caption\n", [":2:", "no image name"]),
    "coco-missing-caption": ("coco", "captions.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}).encode(),
        ["annotations[0]", "missing 'caption'"]),
    "coco-id-wrong-type": ("coco", "captions.json", json.dumps(
        {"images": [{"id": [1], "file_name": "a.jpg"}], "annotations": []}).encode(), ["images[0].id", "unexpected list"]),
    "coco-given-a-karpathy-file": ("coco", "captions.json", _karpathy({"filename": "a.jpg", "sentences": []}),
                                   ["not a COCO caption JSON"]),
    "karpathy-given-a-coco-file": ("karpathy", "captions.json", json.dumps(
        {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}).encode(), ["images[0]", "missing 'filename'"]),
    "karpathy-top-level-list": ("karpathy", "captions.json", b"[1, 2]", ["not a Karpathy split JSON"]),
    "karpathy-entry-not-object": ("karpathy", "captions.json", _karpathy("a.jpg"), ["images[0]", "expected an object"]),
    "karpathy-sentences-not-list": ("karpathy", "captions.json", _karpathy({"filename": "a.jpg", "sentences": "a cat"}),
                                    ["images[0].sentences", "unexpected str"]),
    "karpathy-raw-not-text": ("karpathy", "captions.json", _karpathy({"filename": "a.jpg", "sentences": [{"raw": 5}]}),
                              ["images[0].sentences[0].raw", "unexpected int"]),
    "karpathy-id-wrong-type": ("karpathy", "captions.json",
                               _karpathy({"filename": "a.jpg", "id": {"x": 1}, "sentences": [{"raw": "a cat"}]}),
                               ["images[0].id", "unexpected dict"]),
    "aic-not-a-list": ("aic", "captions.json", b'{"image_id": "a.jpg"}', ["not an AI Challenger caption JSON"]),
    "json-syntax-error": ("coco", "captions.json", b'{"images": [\n  {"id": 1,,}\n]}', [":2:", "not valid JSON"]),
    "json-nested-too-deeply": ("coco", "captions.json", b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    "no-usable-caption": ("lines", "captions.txt", b"a.jpg,   \nb.jpg, \"\"\n", ["none of the 2 listed images",
                                                                              "2 without a usable caption"]),
    "every-path-outside-the-root": ("lines", "captions.txt", b"../a.jpg, a cat\n/etc/passwd, a dog\n",
                                    ["none of the 2 listed images", "2 skipped"]),
    "empty-file": ("lines", "captions.txt", b"", ["none of the 0 listed images"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_source_is_one_line_and_leaves_the_previous_output(good_prepare, tmp_path, case):
    fmt, name, content, words = MALFORMED[case]
    source = tmp_path / name
    source.write_bytes(content)
    before = _snapshot(good_prepare / "data")
    status, out, err = run_main(["prepare", "--format", fmt, str(source), "--images", str(good_prepare),
                                 "--out", str(good_prepare / "data"), "--min-count", "1", "--quiet"])
    assert status == 1 and out == ""
    [line] = err
    assert line.startswith(f"imcap prepare: error: {source}"), line
    assert all(w in line for w in words), line
    assert _snapshot(good_prepare / "data") == before  # nothing half-written over the good DATA_DIR


@pytest.mark.parametrize("args, words", [
    (["--format", "flickr8k", "{tmp}"], "no Flickr8k.token.txt"),
    (["--format", "lines", "{tmp}"], "is a directory, expected a file"),
    (["--format", "lines", "{tmp}/absent.txt"], "no such file"),
    (["--format", "lines", "{good}/good.txt", "--images", "{tmp}/absent"], "image folder not found"),
    (["--format", "lines", "{good}/good.txt", "--vocab", "{tmp}/absent.json"], "no such vocabulary file"),
], ids=["flickr8k-folder-without-captions", "source-is-a-directory", "source-missing", "image-folder-missing",
        "vocabulary-missing"])
def test_bad_paths_given_to_prepare(good_prepare, tmp_path, args, words):
    args = [a.format(tmp=tmp_path, good=good_prepare) for a in args]
    before = _snapshot(good_prepare / "data")
    status, _, err = run_main(["prepare", *args, "--out", str(good_prepare / "data"), "--quiet"])
    assert status == 1 and len(err) == 1 and err[0].startswith("imcap prepare: error: ") and words in err[0], err
    assert _snapshot(good_prepare / "data") == before


def test_non_fatal_entries_are_counted_with_their_key_or_line(tmp_path):
    """Repeated ids, empty and whitespace captions, over-long captions, paths out of the root: kept going,
    counted, each problem names its JSON key or line; a.jpg and a.png are two images, not a repeat."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "a.png", "b.jpg", "c.jpg"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(images / name)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.jpg")
    long = " ".join(["word"] * 40)
    source = tmp_path / "captions.json"
    source.write_bytes(_karpathy(
        {"filename": "a.jpg", "id": 1, "split": "train", "sentences": [{"raw": "a red cat"}, {"raw": " \t "}, {"raw": long}]},
        {"filename": "b.jpg", "id": 1, "split": "train", "sentences": [{"raw": "same id again"}]},
        {"filename": "secret.jpg", "filepath": "..", "split": "train", "sentences": [{"raw": "escapes"}]},
        {"filename": "c.jpg", "split": ["train"], "sentences": [{"raw": "odd split"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": ""}]},
    ))
    status, _, err = run_main(["prepare", "--format", "karpathy", str(source), "--images", str(images),
                               "--out", str(tmp_path / "k"), "--min-count", "1", "--max-length", "10", "--quiet"])
    assert status == 0 and err == [], err
    report = json.loads((tmp_path / "k/report.json").read_text())
    problems = [p["problem"] for p in report["problems"]]
    assert "images[1]: image id '1' (b.jpg) listed again: skipped" in problems
    assert "images[2]: image path '../secret.jpg' is outside the image folder: skipped" in problems
    assert "images[0].sentences[1]: image 1: empty caption: dropped" in problems
    assert "images[4]: image b: no usable caption: skipped" in problems
    assert any(p.startswith("images[3]: split \"['train']\"") for p in problems)
    assert (report["images_duplicate"], report["images_bad_path"], report["captions_empty"]) == (1, 1, 2)
    assert report["captions_truncated"] == 1
    by_file = {im["file"]: im for im in load_dataset(tmp_path / "k")[1]}
    assert sorted(by_file) == ["a.jpg", "c.jpg"] and by_file["a.jpg"]["tokens"][1] == ["word"] * 10

    lines = tmp_path / "captions.txt"
    lines.write_text("a.jpg, a jpeg picture\na.png, a png picture\nb.jpg,   \n../secret.jpg, escapes\n", encoding="utf-8")
    status, _, err = run_main(["prepare", "--format", "lines", str(lines), "--images", str(images),
                               "--out", str(tmp_path / "l"), "--min-count", "1", "--quiet"])
    assert status == 0 and err == []
    report = json.loads((tmp_path / "l/report.json").read_text())
    assert sorted(im["id"] for im in load_dataset(tmp_path / "l")[1]) == ["a.jpg", "a.png"]
    assert report["images_duplicate"] == 0
    assert {(p.get("line"), p["problem"].split(": ")[-1]) for p in report["problems"]} == {
        (3, "dropped"), (3, "skipped"), (4, "skipped")}


def test_prepare_that_fails_while_writing_leaves_the_previous_output(good_prepare, monkeypatch):
    before = _snapshot(good_prepare / "data")

    def disk_full(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Vocabulary, "save", disk_full)
    status, _, err = run_main(["prepare", "--format", "lines", str(good_prepare / "good.txt"), "--out",
                               str(good_prepare / "data"), "--min-count", "1", "--seed", "5", "--quiet"])
    assert status == 1 and len(err) == 1 and "No space left on device" in err[0] and "vocab.json" in err[0]
    assert _snapshot(good_prepare / "data") == before
    assert sorted(p.name for p in (good_prepare / "data").iterdir()) == ["dataset.json", "report.json", "vocab.json"]


def test_prepare_killed_after_its_commit_is_completed_by_the_next_reader(good_prepare, tmp_path):
    """A prepare killed while moving its committed files into DATA_DIR: the next reader finishes the move,
    so dataset.json and vocab.json never come from different runs."""
    data = tmp_path / "data"
    shutil.copytree(good_prepare / "data", data)
    status, _, _ = run_main(["prepare", "--format", "lines", str(good_prepare / "good.txt"), "--out",
                             str(tmp_path / "new"), "--min-count", "2", "--val-fraction", "0", "--test-fraction", "0", "--quiet"])
    assert status == 0
    new = tmp_path / "new"
    assert load_vocab(new) != load_vocab(data)  # min count 2: another vocabulary
    commit = data / COMMIT_DIR
    commit.mkdir()
    for name in ("vocab.json", "report.json"):  # dataset.json was already moved in when the kill came
        shutil.copy(new / name, commit / name)
    shutil.copy(new / "dataset.json", data / "dataset.json")
    assert load_vocab(data) == load_vocab(new)
    assert load_dataset(data) == load_dataset(new)
    assert sorted(p.name for p in data.iterdir()) == ["dataset.json", "report.json", "vocab.json"]


# =============================================================================================== kill -9


def _kill_when(proc: subprocess.Popen, ready, delay: float, what: str, timeout: float = 90) -> str:
    """Wait until ready() (polling), sleep `delay`, SIGKILL the process; its stdout."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{what} ended (status {proc.returncode}) before it could be killed: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: timed out")
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        pytest.fail(f"{what} ended before the kill; choose an earlier moment")
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return out


def _noise_dataset(root: Path, n: int) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        files.append(f"{i:03d}.png")
    dataset = {"version": 1, "format": "lines", "source": "noise", "language": "en", "image_root": "images",
               "max_length": 30, "images": [{"id": f, "file": f, "split": "train", "captions": ["x"], "tokens": [["x"]]}
                                            for f in files]}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root


def test_kill_9_of_imcap_features_then_rerun_equals_an_uninterrupted_run(tmp_path):
    n = 48
    straight, killed = _noise_dataset(tmp_path / "straight", n), tmp_path / "killed"
    shutil.copytree(straight, killed)
    args = ["--image-size", "128", "--batch-size", "1", "--threads", "1", "--quiet"]  # ~25 images/s
    status, _, err = run_main(["features", str(straight), *args])  # the uninterrupted run, in this process
    assert status == 0, err
    store = killed / "features" / "efficientnet-lite0-128"

    def rows_done() -> int:
        try:
            return int((np.fromfile(store / "status.u8", dtype=np.uint8) == 1).sum())
        except FileNotFoundError:
            return 0

    rng = random.Random(KILL_SEED)
    at, delay = rng.randint(2, 20), rng.uniform(0, 0.2)
    proc = subprocess.Popen(imcap_cmd("features", killed, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env())
    _kill_when(proc, lambda: rows_done() >= at, delay, "imcap features")

    index = json.loads((store / "index.json").read_text())  # whole, never half-written
    status = np.fromfile(store / "status.u8", dtype=np.uint8)
    assert len(status) == n and set(status.tolist()) <= {0, 1} and index["N"] == n
    finished = np.flatnonzero(status == 1)
    assert at <= len(finished) < n
    ref = straight / "features" / "efficientnet-lite0-128"
    ref_rows = np.fromfile(ref / "features.f16", dtype=np.float16).reshape(n, -1)
    rows = np.fromfile(store / "features.f16", dtype=np.float16).reshape(n, -1)
    np.testing.assert_array_equal(rows[finished], ref_rows[finished])  # a row marked done holds its features

    rerun = subprocess.run(imcap_cmd("features", killed, *args), capture_output=True, text=True, env=cli_env(),
                           check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({n - len(finished)} encoded now" in rerun.stdout  # finished rows are not redone
    for name in ("features.f16", "status.u8", "index.json"):
        assert (store / name).read_bytes() == (ref / name).read_bytes(), name
    assert sorted(p.name for p in store.iterdir()) == ["features.f16", "index.json", "status.u8"]


TRAIN_ARGS = ["--epochs", "2", "--batch-size", "4", "--checkpoint-every", "3", "--embed-dim", "16", "--hidden-dim", "24",
              "--attention-dim", "16", "--dropout", "0.3", "--lr", "3e-3", "--warmup-steps", "3", "--patience", "0",
              "--seed", "3"]  # tiny_data: 160 train captions -> 40 steps an epoch
QUIET = ["--threads", "1", "--quiet"]


def _checkpoint_step(run: Path) -> int | None:
    for name in ("checkpoint", "checkpoint.old"):
        try:
            return json.loads((run / name / "checkpoint.json").read_text())["progress"]["global_step"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def _all_tensors(run: Path) -> dict[str, torch.Tensor]:
    files = ["checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "best/model.safetensors"]
    return {f"{f}:{k}": v for f in files for k, v in load_file(run / f).items()}


def test_kill_9_of_imcap_train_then_rerun_equals_an_uninterrupted_run(tiny_data, tmp_path):
    """Two kills at seeded random moments after the first checkpoint, each followed by the same command:
    every checkpoint left behind loads, each re-run resumes at the last checkpoint, and the final weights,
    optimizer state, best checkpoint and validation history equal those of an uninterrupted run."""
    status, _, err = run_main(["train", str(tiny_data), "--out", str(tmp_path / "straight"), *TRAIN_ARGS, *QUIET])
    assert status == 0, err  # the uninterrupted run, in this process
    run = tmp_path / "killed"
    cmd = imcap_cmd("train", tiny_data, "--out", run, *TRAIN_ARGS, *QUIET)
    rng = random.Random(KILL_SEED)
    kills = [(rng.randint(3, 33), rng.uniform(0, 0.3)), (rng.randint(42, 66), rng.uniform(0, 0.3))]  # of 80 steps
    resumed_at = None
    for at, delay in kills:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
        out = _kill_when(proc, lambda at=at: (_checkpoint_step(run) or 0) >= at, delay, "imcap train")
        if resumed_at is not None:
            assert f"step {resumed_at}\n" in out.split("resuming", 1)[1], out
        meta, weights = ckpt.load_checkpoint(run / "checkpoint")  # never corrupt (falls back to .old)
        assert weights and load_file(ckpt._existing(run / "checkpoint") / "optimizer.safetensors")
        resumed_at = meta["progress"]["global_step"]
        assert resumed_at >= at
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), check=False)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run} at epoch {resumed_at // 40 + 1}, step {resumed_at}\n" in done.stdout

    a, b = _all_tensors(tmp_path / "straight"), _all_tensors(run)
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    history = [json.loads((r / "checkpoint/checkpoint.json").read_text())["progress"]["history"]
               for r in (tmp_path / "straight", run)]
    assert [(h["epoch"], h["step"], h["val"]) for h in history[0]] == [(h["epoch"], h["step"], h["val"]) for h in history[1]]
    assert len(history[0]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoint", "metrics.jsonl", "tb"]  # no .tmp / .old


# =============================================================================================== crafted checkpoints


class Payload:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def _craft(run: Path, case: str, marker: Path) -> None:
    import pickle

    best = run / "best"
    meta = json.loads((best / "checkpoint.json").read_text())
    if case == "pickle-as-safetensors":
        (best / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    elif case == "torch-save-as-safetensors":
        torch.save({"w": torch.zeros(2), "x": Payload(marker)}, best / "model.safetensors")
    elif case == "truncated-safetensors":
        data = (best / "model.safetensors").read_bytes()
        (best / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "malformed-json":
        (best / "checkpoint.json").write_text('{"format": "imcap-checkpoint", ')
    elif case == "json-nested-too-deeply":
        (best / "checkpoint.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "json-wrong-types":
        (best / "checkpoint.json").write_text(json.dumps({**meta, "version": "1"}))
    elif case == "json-config-not-object":
        (best / "checkpoint.json").write_text(json.dumps({**meta, "model_config": "big"}))
    elif case == "json-unknown-encoder":
        (best / "checkpoint.json").write_text(json.dumps({**meta, "encoder": {**meta["encoder"], "name": "resnet"}}))
    elif case == "json-shapes-do-not-fit":
        (best / "checkpoint.json").write_text(json.dumps({**meta, "model_config": {**meta["model_config"], "hidden_dim": 7}}))


CRAFTED = {
    "pickle-as-safetensors": "not a valid safetensors file",
    "torch-save-as-safetensors": "not a valid safetensors file",
    "truncated-safetensors": "not a valid safetensors file",
    "malformed-json": "malformed JSON",
    "json-nested-too-deeply": "malformed JSON",
    "json-wrong-types": "'version' must be a positive integer",
    "json-config-not-object": "'model_config' must be an object",
    "json-unknown-encoder": "unknown encoder 'resnet'",
    "json-shapes-do-not-fit": "inconsistent checkpoint",
}


@pytest.mark.parametrize("command", ["caption", "evaluate"])
@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoint_is_refused_in_one_line_without_unpickling(tmp_path, images, case, command):
    run = tiny_run(tmp_path / "run")
    marker = tmp_path / "UNPICKLED"
    _craft(run, case, marker)
    args = [str(images / "upright.png")] if command == "caption" else ["--data", str(tmp_path)]
    status, out, err = run_main([command, str(run), *args, "--threads", "1"])
    assert status == 1 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"imcap {command}: error: {run}") and CRAFTED[case] in err[0], err[0]
    assert not marker.exists()


def test_serve_refuses_a_crafted_checkpoint_before_listening(tmp_path):
    run = tiny_run(tmp_path / "run")
    marker = tmp_path / "UNPICKLED"
    _craft(run, "pickle-as-safetensors", marker)
    r = subprocess.run(imcap_cmd("serve", run, "--port", "0", "--threads", "1"), capture_output=True, text=True,
                       env=cli_env(), timeout=60, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().startswith("imcap serve: error: ") and "not a valid safetensors" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not marker.exists()


@pytest.mark.parametrize("case", ["pickle-in-optimizer", "missing-rng-state", "bad-progress"])
def test_train_refuses_a_crafted_training_checkpoint(tiny_data, tmp_path, case):
    run = tmp_path / "run"
    status, _, err = run_main(["train", str(tiny_data), "--out", str(run), *TRAIN_ARGS, "--epochs", "1", *QUIET])
    assert status == 0, err
    marker = tmp_path / "UNPICKLED"
    point = run / "checkpoint"
    if case == "pickle-in-optimizer":
        import pickle

        (point / "optimizer.safetensors").write_bytes(pickle.dumps(Payload(marker)))
        words = "not a valid safetensors file"
    elif case == "missing-rng-state":
        tensors = load_file(point / "optimizer.safetensors")
        del tensors["rng.torch"]
        from safetensors.torch import save_file

        save_file(tensors, point / "optimizer.safetensors")
        words = "not a training checkpoint"
    else:
        meta = json.loads((point / "checkpoint.json").read_text())
        meta["progress"]["global_step"] = "many"
        (point / "checkpoint.json").write_text(json.dumps(meta))
        words = "'progress.global_step' must be an integer"
    status, _, err = run_main(["train", str(tiny_data), "--out", str(run), "--epochs", "2", *QUIET])
    assert status == 1 and len(err) == 1 and err[0].startswith("imcap train: error: ") and words in err[0], err
    assert not marker.exists()


# ======================================================================================= records of a resumed run
# Weights, optimizer state, RNG and validation history resume exactly (test above); so do the epoch's
# running loss and metrics.jsonl, and a checkpoint.json that cannot be resumed from is refused in one line.

def _api_train(data, out, **kw):
    from imcap.train import TrainConfig, train

    cfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    return train(data, out, model_config={"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16}, train_config=cfg,
                 progress=False, log=lambda *a: None, **kw)


def test_train_loss_of_an_epoch_resumed_mid_way_is_the_whole_epochs(tiny_data, tmp_path):
    _api_train(tiny_data, tmp_path / "straight")
    _api_train(tiny_data, tmp_path / "resumed", stop_after_steps=4)  # 10 steps an epoch: stop mid-epoch 1
    _api_train(tiny_data, tmp_path / "resumed")
    losses = [[h["train_loss"] for h in json.loads((tmp_path / r / "checkpoint/checkpoint.json").read_text())
               ["progress"]["history"]] for r in ("straight", "resumed")]
    assert losses[0] == losses[1]


def test_metrics_jsonl_is_complete_after_a_kill_between_the_last_checkpoint_and_it(tiny_data, tmp_path):
    _api_train(tiny_data, tmp_path / "run")
    metrics = tmp_path / "run/metrics.jsonl"
    complete = metrics.read_text().splitlines()
    metrics.write_text(complete[0] + "\n")  # the state such a kill leaves: checkpoint at epoch 2, metrics at 1
    _api_train(tiny_data, tmp_path / "run")
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("damage", ["no data", "no train_config", "unknown progress key"])
def test_a_checkpoint_that_cannot_be_resumed_is_a_one_line_error(tiny_data, tmp_path, damage, capsys):
    _api_train(tiny_data, tmp_path / "run")
    meta_file = tmp_path / "run/checkpoint/checkpoint.json"
    meta = json.loads(meta_file.read_text())
    if damage == "no data":
        del meta["data"]
    elif damage == "no train_config":
        del meta["train_config"]
    else:
        meta["progress"]["surprise"] = 1
    meta_file.write_text(json.dumps(meta))
    before = meta_file.read_bytes()
    code = main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and ("cannot resume" in err[0] or "unknown progress keys" in err[0])
    assert "checkpoint.json" in err[0]
    assert meta_file.read_bytes() == before  # nothing rewritten


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    from imcap.fileio import remove_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".status.u8.{int(dead.stdout)}.bbfafc35.tmp"
    live = tmp_path / f".index.json.{os.getpid()}.0123abcd.tmp"
    other = tmp_path / ".notes.tmp"
    for p in (stale, live, other):
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and other.exists() and not stale.exists()

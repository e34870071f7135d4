"""Hardening (issue #13, items 1, 4 and 7 in part): PostScript under an image's name never reaches Ghostscript,
extreme aspect ratios still get their attention figure, a failed figure is one line and the batch goes on,
and symlinks inside an image folder are followed while `..` names stay refused. docs/reliability.md maps
each case to its test."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image
from test_hardening import cli_env, imcap_cmd, run_main, tiny_run

from imcap import visualize
from imcap.datasets import prepare
from imcap.encoders import build_encoder
from imcap.features import extract_features
from imcap.images import FORMATS, ImageError, load_image, open_image, probe_image

# A minimal EPS: Pillow's EpsImagePlugin reads its header, and decoding it means running Ghostscript (`gs`).
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
NOT_SUPPORTED = f"not a recognised image format (supported: {', '.join(FORMATS)})"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("hardening-images-run"))


@pytest.fixture
def fake_gs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A `gs` first on PATH that only creates a marker file: (its bin folder, the marker)."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch '{marker}'\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is: look again
    return bin_dir, marker


def _eps_named_jpg(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "photo.jpg").write_bytes(EPS)
    return folder / "photo.jpg"


# ================================================================================ PostScript never reaches gs


@pytest.mark.parametrize("entry", ["load_image", "open_image", "probe_image"])
def test_eps_named_jpg_is_refused_without_running_ghostscript(tmp_path, fake_gs, entry):
    _, marker = fake_gs
    path = _eps_named_jpg(tmp_path / "images")
    with pytest.raises(ImageError) as e:
        if entry == "open_image":
            open_image(io.BytesIO(path.read_bytes()), "photo.jpg")
        else:
            {"load_image": load_image, "probe_image": probe_image}[entry](path)
    assert not marker.exists(), "Ghostscript was run"
    assert str(e.value) == f"{'photo.jpg' if entry == 'open_image' else path}: {NOT_SUPPORTED}"


def test_imcap_caption_of_eps_named_jpg_is_one_line_and_never_runs_ghostscript(run_dir, tmp_path, fake_gs):
    bin_dir, marker = fake_gs
    eps = _eps_named_jpg(tmp_path / "images")
    good = tmp_path / "images" / "good.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(good)
    env = {**cli_env(), "PATH": f"{bin_dir}:{cli_env()['PATH']}"}
    proc = subprocess.run(imcap_cmd("caption", run_dir, eps, good), env=env, capture_output=True, text=True,
                          timeout=300)
    assert not marker.exists(), "Ghostscript was run"
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"imcap caption: error: {eps}: {NOT_SUPPORTED}"]
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [str(good)]


def test_prepare_refuses_eps_named_jpg_from_its_header(tmp_path, fake_gs):
    _, marker = fake_gs
    eps = _eps_named_jpg(tmp_path / "images")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "good.png")
    (tmp_path / "captions.txt").write_text("photo.jpg, a red square\ngood.png, a red square\n")
    status, _, err = run_main(["prepare", "--format", "lines", str(tmp_path / "captions.txt"), "--out",
                               str(tmp_path / "data"), "--min-count", "1", "--quiet"])
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert status == 1 and report["images_unreadable"] == 1 and report["images_present"] == 1, report
    assert len(err) == 1 and err[0].startswith(f"imcap prepare: error: {eps}: ") and NOT_SUPPORTED in err[0], err
    assert not marker.exists(), "Ghostscript was run"


def test_features_refuses_eps_named_jpg_without_running_ghostscript(tmp_path, fake_gs):
    """A dataset.json made by hand (or by an older prepare) that lists it anyway."""
    _, marker = fake_gs
    eps = _eps_named_jpg(tmp_path / "images")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "images" / "good.png")
    dataset = {"version": 1, "format": "lines", "source": "x", "language": "en", "image_root": str(tmp_path / "images"),
               "max_length": 30, "images": [{"id": f, "file": f, "split": "train", "captions": ["x"], "tokens": [["x"]]}
                                            for f in ("photo.jpg", "good.png")]}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(dataset))
    status, _, err = run_main(["features", str(tmp_path / "data"), "--image-size", "64", "--quiet"])
    assert not marker.exists(), "Ghostscript was run"
    assert status == 1 and err == [f"imcap features: error: {eps}: {NOT_SUPPORTED}"], err


# ============================================================================== attention figures of any shape

SHAPES = [(100000, 1), (1, 100000), (1, 1), (3, 40000)]


@pytest.mark.parametrize("size", [*SHAPES, (0, 0), (7, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("upscale", ["smooth", "nearest"])
def test_heatmap_overlay_accepts_any_image_size(size, upscale):
    image = Image.new("RGB", size, (128, 128, 128))
    alpha = np.arange(4, dtype=np.float64).reshape(2, 2)
    out = visualize.heatmap_overlay(image, alpha, upscale=upscale)
    assert out.size == size and out.mode == "RGB"
    if 0 not in size:
        assert np.asarray(out).std() > 0 or size == (1, 1)  # the attention shows


@pytest.mark.parametrize("size", [*SHAPES, (0, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_save_attention_figure_accepts_any_image_size(tmp_path, size):
    image = Image.new("RGB", size, (128, 128, 128))
    alphas = np.random.default_rng(0).random((3, 2, 2))
    normal = visualize.attention_figure(Image.new("RGB", (64, 48)), ["a", "b", "<end>"], alphas)
    path = visualize.save_attention_figure(tmp_path / "fig.png", image, ["a", "b", "<end>"], alphas)
    with Image.open(path) as fig:
        assert fig.size == normal.size  # the layout does not depend on the image's shape


@pytest.mark.parametrize("size, fitted", [((64, 48), (160, 120)), ((48, 64), (120, 160)), ((4000, 600), (160, 24)),
                                          ((33, 7), (160, 34)), ((100000, 1), (160, 20)), ((1, 1), (160, 160))])
def test_fit_square_keeps_the_aspect_but_never_draws_thinner_than_an_eighth(size, fitted):
    assert visualize.fit_square(Image.new("RGB", size), 160).size == fitted


def test_caption_with_attention_of_extreme_aspect_ratios(run_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    files = []
    for w, h in [(64, 48), *SHAPES]:
        files.append(folder / f"{w}x{h}.png")
        Image.new("RGB", (w, h), (200, 30, 30)).save(files[-1])
    status, out, err = run_main(["caption", str(run_dir), *map(str, files), "--attention", str(tmp_path / "att")])
    assert status == 0 and err == [], err
    assert [line.split("\t")[0] for line in out.splitlines()] == list(map(str, files))
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == sorted(f"{f.stem}.attention.png" for f in files)


@pytest.mark.parametrize("failure", ["write", "draw"])
def test_a_failed_attention_figure_is_one_line_and_the_batch_goes_on(run_dir, tmp_path, monkeypatch, failure):
    folder, att = tmp_path / "images", tmp_path / "att"
    folder.mkdir()
    files = [folder / f"{name}.png" for name in ("bad", "good1", "good2")]
    for f in files:
        Image.new("RGB", (40, 30), (30, 30, 200)).save(f)
    figure = att / "bad.attention.png"
    if failure == "write":
        figure.mkdir(parents=True)  # a folder where the figure should go: os.replace fails
        problem = "cannot write it (Is a directory)"
    else:
        drawn = visualize.attention_figure

        def attention_figure(image, *args, **kwargs):
            if image.size == (40, 30) and not hasattr(attention_figure, "failed"):
                attention_figure.failed = True
                raise ValueError("height and width must be > 0")
            return drawn(image, *args, **kwargs)

        monkeypatch.setattr(visualize, "attention_figure", attention_figure)
        problem = "cannot draw it (height and width must be > 0)"
    status, out, err = run_main(["caption", str(run_dir), *map(str, files), "--attention", str(att)])
    assert status == 1
    assert err == [f"imcap caption: error: {files[0]}: attention figure {figure}: {problem}"]
    assert [line.split("\t")[0] for line in out.splitlines()] == list(map(str, files))  # every caption written
    assert (att / "good1.attention.png").is_file() and (att / "good2.attention.png").is_file()


# ============================================================================ symlinks inside the image folder


def test_symlinks_in_the_image_folder_are_followed_but_dotdot_names_refused(tmp_path):
    """A symlink inside the image folder to an image elsewhere (a photo collection linked in) is used by
    prepare and features; a name in the caption file that leaves the folder itself (`..`, absolute) is not."""
    images, elsewhere = tmp_path / "images", tmp_path / "collection"
    images.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(images / "own.png")
    Image.new("RGB", (40, 30), (30, 200, 30)).save(elsewhere / "linked.png")
    (images / "linked.png").symlink_to(elsewhere / "linked.png")
    (images / "album").symlink_to(elsewhere, target_is_directory=True)
    Image.new("RGB", (40, 30), (30, 30, 200)).save(tmp_path / "secret.png")
    source = tmp_path / "captions.txt"
    source.write_text("own.png, a red square\nlinked.png, a green square\nalbum/linked.png, a green square\n"
                      f"../secret.png, a blue square\n{tmp_path / 'secret.png'}, a blue square\n")
    report = prepare(source, "lines", tmp_path / "data", images=images, min_count=1, val_fraction=0,
                     test_fraction=0, progress=False)
    assert report["images_present"] == 3 and report["images_bad_path"] == 2, report
    encoder = build_encoder("efficientnet-lite0", 64, pretrained=False)
    summary = extract_features(tmp_path / "data", encoder=encoder, image_size=64, progress=False)
    assert summary["done"] == 3 and summary["failed"] == [], summary

"""Inference on an accelerator (the `accelerator` fixture of conftest.py) against the CPU: the Python API's
captions, the feature store, the server. benchmarks/gpu.py runs these on the GPU; IMCAP_TEST_DEVICE=cpu runs
them here, the CPU against itself."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from imcap import checkpoint as ckpt
from imcap.api import Captioner
from imcap.datasets import prepare
from imcap.encoders import build_encoder, encoder_spec
from imcap.features import FeatureStore, extract_features
from imcap.model import ModelConfig, ShowAttendTell
from imcap.server import create_app
from imcap.synth import draw_scene, make_scenes
from imcap.text import PAD, START, Vocabulary

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "right", "small", "large"]


def tiny_run(path: Path) -> Path:
    """A random decoder with peaky word distributions (few near ties), which depend on the image, for Lite0 at 64 px."""
    torch.manual_seed(0)
    vocab = Vocabulary.build([WORDS], min_count=1)
    spec = encoder_spec("efficientnet-lite0", 64)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=16,
                                       hidden_dim=24, attention_dim=16, dropout=0.0)).eval()
    with torch.no_grad():
        model.embedding.weight *= 10
        model.out.weight *= 5
        for layer in (model.init_h, model.init_c, model.gates_z):  # the image's say in the words
            layer.weight *= 4
        model.out.bias[[PAD, START]] = -30.0
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(),
            "language": "en"}
    ckpt.save_checkpoint(path / "best", model, meta)
    return path


def encoder():
    return build_encoder("efficientnet-lite0", 64, pretrained=True)  # random weights give grids of ~1e-9


def scenes(n: int = 6):
    return [draw_scene(5, i, image_size=96)[0] for i in range(n)]


@pytest.mark.parametrize("beam", [1, 3])
def test_the_captioner_on_the_accelerator_gives_the_cpus_captions(accelerator, tmp_path, beam):
    run = tiny_run(tmp_path)
    cpu = Captioner.load(run, device="cpu", precision="fp32", encoder=encoder())
    dev = Captioner.load(run, device=accelerator, precision="fp32", encoder=encoder())
    assert all(p.device.type == accelerator.type for p in dev.model.parameters())
    assert dev.encoder.device.type == accelerator.type
    want = cpu.caption(scenes(), beam_size=beam, n_best=beam, max_length=12)
    got = dev.caption(scenes(), beam_size=beam, n_best=beam, max_length=12)
    for w, g in zip(want, got):
        for a, b in zip([w, *w.alternatives], [g, *g.alternatives]):
            assert a.tokens == b.tokens and abs(a.log_prob - b.log_prob) < 1e-2
            assert isinstance(b.alphas, np.ndarray) and b.alphas.shape == a.alphas.shape
            assert np.abs(a.alphas - b.alphas).max() < 1e-2


def test_bf16_on_the_accelerator_captions(accelerator, tmp_path):
    if accelerator.type == "cpu":
        pytest.skip("bf16 on the CPU: tests/test_api_device.py")
    run = tiny_run(tmp_path)
    got = Captioner.load(run, device=accelerator, precision="bf16", encoder=encoder()).caption(scenes(), beam_size=3)
    assert all(np.isfinite(r.score) and r.tokens for r in got)


def test_extraction_on_the_accelerator_gives_the_cpus_grid(accelerator, tmp_path):
    made = make_scenes(tmp_path / "scenes", n_images=10, seed=4, image_size=64, progress=False)
    prepare(made, "karpathy", tmp_path / "cpu", min_count=1, progress=False)
    shutil.copytree(tmp_path / "cpu", tmp_path / "dev")
    net = build_encoder("efficientnet-lite0", 64, pretrained=True)  # bounded grid (ReLU6): up to 6
    summary = {}
    for name, device in (("cpu", "cpu"), ("dev", accelerator)):
        summary[name] = extract_features(tmp_path / name, encoder=net, image_size=64, progress=False, device=device)
    assert summary["dev"]["device"].startswith(accelerator.type) and summary["dev"]["precision"] == "fp32"
    assert summary["dev"]["batch_size"] == (4 if accelerator.type == "cpu" else 64)
    grids = [np.array(FeatureStore.open(tmp_path / name).features, dtype=np.float32) for name in ("cpu", "dev")]
    assert grids[0].shape == (10, 4, 1280)
    assert np.abs(grids[0] - grids[1]).max() <= 1e-2  # float16 store: its rounding is up to 0.004 near 6
    assert FeatureStore.open(tmp_path / "dev").features.dtype == np.float16


def test_the_server_on_the_accelerator_answers(accelerator, tmp_path):
    captioner = Captioner.load(tiny_run(tmp_path), device=accelerator, encoder=encoder())
    buffer = io.BytesIO()
    scenes(1)[0].save(buffer, format="PNG")
    with TestClient(create_app(captioner)) as client:  # its self-check ran on the accelerator
        info = client.get("/v1/model").json()
        r = client.post("/v1/captions", files=[("images", ("scene.png", buffer.getvalue(), "image/png"))],
                        data={"beam_size": "3", "n_best": "2", "max_length": "8", "attention": "true"})
    assert info["device"].startswith(accelerator.type) and info["precision"] == captioner.precision
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["caption"] and len(result["captions"]) == 2
    assert np.allclose(np.sum(result["captions"][0]["attention"], axis=(1, 2)), 1.0, atol=1e-2)

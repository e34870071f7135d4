"""Training on an accelerator (the `accelerator` fixture of conftest.py) against the CPU: the same losses, checkpoints
that resume and caption on the CPU, mixed precision. benchmarks/gpu.py runs these on the GPU; with
IMCAP_TEST_DEVICE=cpu they run on the CPU against the CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from imcap.train import TrainConfig, train

MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.0}  # no dropout: no random stream


def run(data_dir, out, device, **kw):
    cfg = dict(epochs=1, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    cfg.update(kw.pop("cfg", {}))
    return train(data_dir, out, model_config=MODEL, train_config=TrainConfig(**cfg), progress=False,
                 log=lambda *a: None, device=device, **kw)


def losses(run_dir):
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_steps_on_the_device_equal_the_cpus(tiny_data, tmp_path, accelerator):
    run(tiny_data, tmp_path / "cpu", "cpu", precision="fp32")
    summary = run(tiny_data, tmp_path / "dev", accelerator, precision="fp32")
    assert summary["device"].split(":")[0] == accelerator.type
    want, got = losses(tmp_path / "cpu"), losses(tmp_path / "dev")
    assert len(want) == len(got) == 1 and abs(want[0] - got[0]) < 1e-3  # the epoch's mean loss over 10 steps
    a, b = load_file(tmp_path / "cpu/checkpoint/model.safetensors"), load_file(tmp_path / "dev/checkpoint/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05  # Adam amplifies rounding; still one model


def test_a_checkpoint_from_the_device_resumes_and_captions_on_the_cpu(tiny_data, tmp_path, accelerator):
    from imcap.api import Captioner
    from imcap.encoders import build_encoder
    from imcap.features import FeatureStore

    run(tiny_data, tmp_path / "run", accelerator, cfg={"epochs": 2}, stop_after_steps=4, prefetch=True)
    meta = json.loads((tmp_path / "run/checkpoint/checkpoint.json").read_text())
    assert meta["trained_on"]["device"].split(":")[0] == accelerator.type
    state = load_file(tmp_path / "run/checkpoint/optimizer.safetensors")
    assert ("rng.cuda" in state) == (accelerator.type == "cuda")
    summary = run(tiny_data, tmp_path / "run", "cpu", cfg={"epochs": 2})  # goes on on the CPU
    assert summary["steps"] == 20 and summary["device"] == "cpu"
    captioner = Captioner.load(tmp_path / "run", device="cpu", encoder=build_encoder("efficientnet-lite0", 64, pretrained=False))
    store = FeatureStore.open(tiny_data)
    captions = captioner.caption_features(store.get([0, 1]))
    assert len(captions) == 2 and all(c.error is None and isinstance(c.caption, str) for c in captions)


def test_a_cpu_checkpoint_resumes_on_the_device(tiny_data, tmp_path, accelerator):
    run(tiny_data, tmp_path / "run", "cpu", cfg={"epochs": 2}, stop_after_steps=4)
    summary = run(tiny_data, tmp_path / "run", accelerator, cfg={"epochs": 2})
    assert summary["steps"] == 20 and summary["device"].split(":")[0] == accelerator.type
    assert all(w.device.type == "cpu" for w in load_file(tmp_path / "run/checkpoint/model.safetensors").values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_runs_on_the_device(tiny_data, tmp_path, accelerator, precision):
    if precision == "fp16" and accelerator.type == "cpu":
        pytest.skip("fp16 needs a GPU (the CPU refuses it: tests/test_train_device.py)")
    if precision == "bf16" and accelerator.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run(tiny_data, tmp_path / "fp32", accelerator, precision="fp32")
    summary = run(tiny_data, tmp_path / "mixed", accelerator, precision=precision, cfg={"micro_batches": 2})
    assert summary["precision"] == precision
    want, got = losses(tmp_path / "fp32"), losses(tmp_path / "mixed")
    assert got[0] == pytest.approx(want[0], rel=1e-2)
    meta = json.loads((tmp_path / "mixed/checkpoint/checkpoint.json").read_text())
    assert meta["trained_on"]["precision"] == precision and ("grad_scaler" in meta["trained_on"]) == (precision == "fp16")

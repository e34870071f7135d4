"""Training's device, precision, feeding thread and micro-batches, on the CPU (tests/test_cuda_train.py runs the
device side on a GPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from imcap.decoding import DecodingOptions
from imcap.train import Trainer, TrainConfig, train, validate

MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.3}


def config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    return TrainConfig(**{**base, **kw})


def run(data_dir, out, log=lambda *a: None, **kw):
    return train(data_dir, out, model_config=MODEL, train_config=config(**kw.pop("cfg", {})), progress=False,
                 log=log, device=kw.pop("device", "cpu"), **kw)


def history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b, name="checkpoint"):
    a, b = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_feeding_thread_changes_nothing(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "here", prefetch=False)
    summary = run(tiny_data, tmp_path / "thread", prefetch=True)
    assert same_weights(tmp_path / "here", tmp_path / "thread")
    for record in history(tmp_path / "thread"):
        assert 0 <= record["data_wait_share"] < 1
    assert 0 <= summary["data_wait_share"] < 1 and summary["device"] == "cpu" and summary["precision"] == "fp32"


@pytest.mark.parametrize("stop_at", [4, 10])
def test_resume_is_exact_with_the_feeding_thread(tiny_data, tmp_path, stop_at):
    run(tiny_data, tmp_path / "straight", prefetch=False)
    run(tiny_data, tmp_path / "resumed", prefetch=True, stop_after_steps=stop_at)
    run(tiny_data, tmp_path / "resumed", prefetch=True)
    assert same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_bf16_autocast_trains_like_fp32(tiny_data, tmp_path):
    """Measured on this set: the epochs' losses of bf16 autocast within 4e-6 relative of fp32 after 10 and 20
    steps (the loss is a mean over ~1,500 words, whose bf16 errors average out); the bound is 1e-3."""
    run(tiny_data, tmp_path / "fp32", precision="fp32")
    run(tiny_data, tmp_path / "bf16", precision="bf16")
    for a, b in zip(history(tmp_path / "fp32"), history(tmp_path / "bf16"), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["train_parts"]["xent"] == pytest.approx(a["train_parts"]["xent"], rel=1e-3)
    meta = json.loads((tmp_path / "bf16/checkpoint/checkpoint.json").read_text())
    assert meta["trained_on"]["precision"] == "bf16" and meta["trained_on"]["device"] == "cpu"


def test_bf16_validation_decoding_mostly_finds_the_fp32_captions(tiny_data, tmp_path):
    """Measured: 85-95% identical captions over 40 images for 3 seeds, greedy and beam 3 (the rest differ where
    two words are near ties). Random features: the tiny set's all look alike to a random encoder."""
    trainer = Trainer(tiny_data, tmp_path / "run", MODEL, config(), log=lambda *a: None, device="cpu")
    model = trainer.model
    with torch.no_grad():
        model.embedding.weight *= 10  # peaky, varied captions
        model.out.weight *= 5
    images = [{**im, "split": "val"} for im in trainer.images]
    table = torch.randn(len(images), *trainer.store.features.shape[1:], generator=torch.Generator().manual_seed(0)) * 2
    for beam in (1, 3):
        options = DecodingOptions(beam_size=beam, max_length=12)
        _, fp32 = validate(model, images, trainer.store, trainer.vocab, options, features=lambda r: table[r])
        _, bf16 = validate(model, images, trainer.store, trainer.vocab, options, features=lambda r: table[r],
                           precision="bf16")
        assert len(set(map(tuple, fp32.values()))) > 10  # captions that depend on the image
        assert sum(fp32[k] == bf16[k] for k in fp32) / len(fp32) >= 0.75


def test_fp16_on_the_cpu_is_refused_in_one_line(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a GPU") as e:
        run(tiny_data, tmp_path / "run", precision="fp16")
    assert "\n" not in str(e.value)


def test_micro_batches_are_validated():
    with pytest.raises(ValueError, match="micro_batches"):
        TrainConfig(micro_batches=0).validate()


def test_a_resume_may_change_the_micro_batches_and_the_precision(tiny_data, tmp_path):
    run(tiny_data, tmp_path / "run", stop_after_steps=4)
    lines = []
    summary = run(tiny_data, tmp_path / "run", cfg={"micro_batches": 2}, precision="bf16", log=lines.append)
    assert summary["steps"] == 20
    assert any("micro-batches 1 -> 2" in line for line in lines)
    assert any("trained on cpu in fp32; going on on cpu in bf16" in line for line in lines)
    meta = json.loads((tmp_path / "run/checkpoint/checkpoint.json").read_text())
    assert meta["train_config"]["micro_batches"] == 2 and meta["trained_on"]["precision"] == "bf16"


def test_micro_batches_with_hard_attention_and_scst(tiny_data, tmp_path):
    """The other objectives go through micro-batches too: 2 micro-batches train, and SCST's run does."""
    hard = dict(MODEL, attention="hard")
    train(tiny_data, tmp_path / "hard", model_config=hard, train_config=config(epochs=1, micro_batches=2),
          progress=False, log=lambda *a: None, device="cpu")
    summary = train(tiny_data, tmp_path / "scst", train_config=config(epochs=1, objective="scst", batch_size=8,
                    scst_samples=2, scst_max_length=6, init_from=str(tmp_path / "hard"), micro_batches=2),
                    progress=False, log=lambda *a: None, device="cpu", precision="bf16")
    assert summary["steps"] == 4 and history(tmp_path / "scst")[0]["train_parts"]["sample_reward"] >= 0

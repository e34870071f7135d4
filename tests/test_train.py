"""Training on a tiny synthetic set with a random-weight encoder (64 px -> 2x2 grid): fast and hermetic."""

import json

import pytest
import torch
from safetensors.torch import load_file

from imcap.train import TrainConfig, learning_rate, train

MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.3}


@pytest.fixture(scope="module")
def data_dir(tiny_data):
    return tiny_data


def config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    return TrainConfig(**{**base, **kw})


def weights(run_dir, name="checkpoint"):
    return load_file(run_dir / name / "model.safetensors")


def run(data_dir, out, **kw):
    return train(data_dir, out, model_config=MODEL, train_config=config(**kw.pop("cfg", {})), progress=False,
                 log=lambda *a: None, **kw)


@pytest.mark.parametrize("stop_at", [4, 10])  # mid-epoch and exactly at the end of epoch 1
def test_resume_ends_with_the_same_weights(data_dir, tmp_path, stop_at):
    run(data_dir, tmp_path / "straight")
    run(data_dir, tmp_path / "resumed", stop_after_steps=stop_at)
    assert json.loads((tmp_path / "resumed/checkpoint/checkpoint.json").read_text())["progress"]["global_step"] == stop_at
    summary = run(data_dir, tmp_path / "resumed")
    assert summary["steps"] == 20 and summary["epochs"] == 2  # 32 train images x 5 captions / 16 = 10 steps an epoch
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]


def test_best_checkpoint_follows_validation_cider(data_dir, tmp_path):
    summary = run(data_dir, tmp_path / "run", cfg={"epochs": 3})
    history = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    ciders = [h["val"]["CIDEr"] for h in history]
    best_epoch = ciders.index(max(ciders)) + 1
    assert summary["best_epoch"] == best_epoch
    best = json.loads((tmp_path / "run/best/checkpoint.json").read_text())
    assert best["progress"]["epoch"] == best_epoch and best["metrics"]["CIDEr"] == max(ciders)
    assert not (tmp_path / "run/best/optimizer.safetensors").exists()  # inference checkpoints stay small
    assert any((tmp_path / "run/tb").iterdir())


def test_early_stopping_when_validation_stops_improving(data_dir, tmp_path):
    summary = run(data_dir, tmp_path / "run", cfg={"epochs": 10, "lr": 1e-12, "warmup_steps": 0, "patience": 2})
    assert summary["stopped"] == "early stopping" and summary["epochs"] == 3


def test_training_lowers_the_loss(data_dir, tmp_path):
    run(data_dir, tmp_path / "run", cfg={"epochs": 4})
    history = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_learning_rate_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0, 100) == pytest.approx(0.1)
    assert learning_rate(cfg, 9, 100) == pytest.approx(1.0)
    assert learning_rate(cfg, 100, 100) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(lr=2.0, warmup_steps=0, lr_schedule="constant"), 50, 100) == 2.0


def test_grouped_epoch_order_keeps_each_images_captions_together(data_dir):
    from imcap.datasets import load_dataset, load_vocab
    from imcap.features import FeatureStore
    from imcap.objectives import CaptionPairs

    _, images = load_dataset(data_dir)
    pairs = CaptionPairs(images, load_vocab(data_dir), FeatureStore.open(data_dir), "train", 30)
    order = pairs.epoch_order(torch.Generator().manual_seed(0), group_by_image=True)
    assert sorted(order.tolist()) == list(range(len(pairs)))
    rows = pairs.rows[order].tolist()
    runs = [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]
    assert len(runs) == len(set(rows))  # one contiguous run per image
    features, captions, lengths, index = pairs.batch(order[:12])
    assert features.size(0) == len(set(rows[:12])) and torch.equal(pairs.rows[order[:12]], torch.unique(pairs.rows[order[:12]])[index])

"""End-to-end fine-tuning (finetune.py) on the tiny synthetic set with its random-weight encoder (64 px, 2x2 grid)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import imcap.evaluate
from imcap.api import Captioner
from imcap.cli import main
from imcap.datasets import load_dataset
from imcap.decoding import DecodingOptions, decode
from imcap.encoders import build_encoder
from imcap.features import FeatureStore, read_image_list
from imcap.finetune import EncoderTuner
from imcap.images import load_image
from imcap.train import Trainer, TrainConfig, train

MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.3}
BLOCKS = 2


def base_encoder():
    """The encoder that made the tiny_data store (conftest: seed 0, random weights)."""
    torch.manual_seed(0)
    return build_encoder("efficientnet-lite0", 64, pretrained=False)


def config(**kw) -> TrainConfig:
    base = dict(epochs=1, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    return TrainConfig(**{**base, **kw})


def finetune_config(init_from, **kw) -> TrainConfig:
    return config(init_from=str(init_from), finetune_blocks=BLOCKS, encoder_lr=1e-3, **kw)


@pytest.fixture(scope="module")
def xe_run(tiny_data, tmp_path_factory):
    """A decoder trained one epoch on the cached features: what fine-tuning starts from."""
    out = tmp_path_factory.mktemp("xe") / "run"
    train(tiny_data, out, model_config=MODEL, train_config=config(), progress=False, log=lambda *a: None)
    return out


def tuned(tiny_data, out, xe_run, **kw) -> dict:
    return train(tiny_data, out, train_config=finetune_config(xe_run, **kw.pop("cfg", {})), progress=False,
                 log=lambda *a: None, encoder=base_encoder(), **kw)


def test_bottom_then_top_is_the_encoder_and_matches_the_store(tiny_data):
    encoder = base_encoder()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for n in (0, 5, 16):
            assert torch.equal(encoder.top(encoder.bottom(x, n), n), encoder(x))
    store = FeatureStore.open(tiny_data)
    tuner = EncoderTuner(tiny_data, store.spec, BLOCKS, encoder=encoder)
    with torch.no_grad():
        a = tuner.encode(tuner.load(np.arange(3)))  # (3, P, D) decoded and encoded now
    torch.testing.assert_close(a, store.get(np.arange(3)), atol=2e-2, rtol=1e-2)  # the store is float16


def test_a_few_steps_train_the_top_blocks_only(tiny_data, tmp_path, xe_run):
    trainer = Trainer(tiny_data, tmp_path / "ft", train_config=finetune_config(xe_run), log=lambda *a: None,
                      encoder=base_encoder())
    net = trainer.tuner.encoder.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer.train(progress_bar=False, stop_after_steps=3)
    after = net.state_dict()
    top = {k for k in after if k.startswith(("_conv_head.", "_bn1.", *(f"_blocks.{i}." for i in (14, 15))))}
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and changed <= top  # some top weights moved (BatchNorm statistics are frozen), nothing below
    assert any(k.startswith("_blocks.14.") for k in changed) and "_conv_head.weight" in changed
    assert not any(before[k].ne(after[k]).any() for k in after if k.endswith(("running_mean", "running_var")))
    assert not trainer.tuner.encoder.training  # BatchNorm in eval mode throughout
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * 1e-3 / 3e-3)  # its own LR, on the decoder's schedule


def test_checkpoint_round_trip_gives_the_finetuned_encoder(tiny_data, tmp_path, xe_run, monkeypatch):
    trainer = Trainer(tiny_data, tmp_path / "ft", train_config=finetune_config(xe_run), log=lambda *a: None,
                      encoder=base_encoder())
    trainer.train(progress_bar=False)
    meta = json.loads((tmp_path / "ft/best/checkpoint.json").read_text())
    assert meta["version"] == 2 and meta["encoder_weights"] == "encoder.safetensors"
    saved = load_file(tmp_path / "ft/best/encoder.safetensors")
    assert {".".join(k.split(".")[:2]) for k in saved if k.startswith("_blocks")} == {"_blocks.14", "_blocks.15"}

    captioner = Captioner.load(tmp_path / "ft", encoder=base_encoder())
    tuned_state = trainer.tuner.encoder.net.state_dict()
    assert all(torch.equal(v, tuned_state[k]) for k, v in captioner.encoder.net.state_dict().items())
    _, images = load_dataset(tiny_data)
    root, names = read_image_list(tiny_data)
    paths = [root / n for n in names[:4]]
    with torch.no_grad():
        pixels = torch.stack([trainer.tuner.encoder.preprocess(load_image(p)) for p in paths])
        want = decode(trainer.model.eval(), trainer.tuner.encoder(pixels), DecodingOptions(beam_size=2, max_length=12))
    got = captioner.caption([str(p) for p in paths], beam_size=2, max_length=12)
    assert [r.tokens for r in got] == [trainer.vocab.decode(h[0].tokens) for h in want]

    # imcap evaluate encodes the images with the fine-tuned encoder (the cached features are stale)
    seen = {}
    monkeypatch.setattr(imcap.evaluate, "score_captions",
                        lambda refs, hyps, tokenize: seen.update(hyps) or {"CIDEr": 0.0})  # no Java
    report = imcap.evaluate.evaluate(tmp_path / "ft", tiny_data, split="val", options=DecodingOptions(beam_size=1),
                                     captioner=captioner)
    val = [(i, im) for i, im in enumerate(images) if im["split"] == "val"]
    assert report["images"] == len(val) == len(seen)
    direct = captioner.caption([str(root / im["file"]) for _, im in val], beam_size=1)
    assert [seen[im["id"]] for _, im in val] == [r.caption for r in direct]


def test_resume_equals_uninterrupted(tiny_data, tmp_path, xe_run):
    tuned(tiny_data, tmp_path / "straight", xe_run)
    tuned(tiny_data, tmp_path / "resumed", xe_run, stop_after_steps=4)
    summary = tuned(tiny_data, tmp_path / "resumed", xe_run)
    assert summary["steps"] == 10  # 32 train images x 5 captions / 16
    for name in ("model.safetensors", "encoder.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoint" / name) for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message, status", [
    (["--finetune-blocks", "2"], "--finetune-blocks needs --init-from", 2),  # from the flags alone: a usage error
    (["--finetune-blocks", "17", "--init-from", "XE"], "--finetune-blocks must be 1..16", 1),
    (["--encoder-lr", "1e-5"], "--encoder-lr needs --finetune-blocks", 2),  # a usage error, caught by the CLI
    (["--init-from", "FT"], "its encoder was fine-tuned", 1),
])
def test_bad_flag_combinations_are_one_line_errors(tiny_data, tmp_path, xe_run, capsys, flags, message, status):
    if "FT" in flags:  # a fine-tuned run's decoder does not fit the cached features
        tuned(tiny_data, tmp_path / "ft", xe_run, stop_after_steps=1)
    flags = [{"XE": str(xe_run), "FT": str(tmp_path / "ft")}.get(f, f) for f in flags]
    assert main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--quiet", *flags]) == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imcap train: error: ") and message in err

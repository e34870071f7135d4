"""Self-critical training: the CIDEr-D on ids, sampling, the direction of an update, and the CLI path."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer
from safetensors.torch import load_file

from imcap.api import Captioner
from imcap.cli import main
from imcap.decoding import sample_captions
from imcap.encoders import build_encoder
from imcap.ensemble import Ensemble
from imcap.features import extract_features
from imcap.model import ModelConfig, ShowAttendTell
from imcap.scst import CiderD, reward_references, scst_loss, words_of
from imcap.text import END, PAD, START, UNK
from imcap.train import TrainConfig, train

MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.0}


def test_cider_d_equals_pycocoevalcap():
    rng = random.Random(0)
    refs = [[[rng.randrange(4, 30) for _ in range(rng.randrange(3, 12))] for _ in range(rng.randrange(1, 6))]
            for _ in range(25)]
    hyps = [[rng.randrange(4, 30) for _ in range(rng.randrange(0, 12))] for _ in refs]
    hyps[3] = list(refs[3][0])  # one hypothesis equal to a reference
    scorer = CiderScorer(n=4, sigma=6.0)
    for h, r in zip(hyps, refs):
        scorer += (" ".join(map(str, h)), [" ".join(map(str, x)) for x in r])
    _, expected = scorer.compute_score()
    got = CiderD(refs).scores(hyps, range(len(refs)))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert got[3] > got.mean()


def test_a_known_better_caption_earns_more():
    words: dict[str, int] = {}
    ids = lambda text: [words.setdefault(w, len(words) + 4) for w in text.split()]  # noqa: E731
    refs = [[ids(r) for r in ("a brown dog runs through the grass", "a dog is running on the grass",
                              "the dog runs across a green field", "a dog running in the grass")],
            [ids(r) for r in ("a man is standing in the water", "a man stands in a lake")],
            [ids(r) for r in ("two children play in the snow", "kids playing in the snow")]]
    cider = reward_references(refs)
    right, vague, wrong, stutter, cut = (ids(c) + [END] for c in (
        "a brown dog runs through the grass", "a dog is in the grass", "a man is standing in the water",
        "a dog a dog a dog a dog", "a dog runs through the"))
    scores = cider.scores([right, vague, wrong, stutter, cut], [0] * 5)
    assert scores[0] > scores[1] > max(scores[2], scores[3])  # the right caption, then a vaguer one, then wrong ones
    assert scores[0] > scores[4]  # stopping mid-phrase costs the n-grams that end the references
    assert cider.score(wrong, 1) > cider.score(right, 1)  # against the man's references the ranking turns round


def test_words_of_stops_at_end():
    tokens = torch.tensor([[5, 6, END, PAD], [7, 8, 9, 10], [END, PAD, PAD, PAD]])
    assert words_of(tokens) == [[5, 6], [7, 8, 9, 10], []]
    assert words_of(tokens, keep_end=True) == [[5, 6, END], [7, 8, 9, 10], [END]]


def test_the_reward_punishes_a_caption_that_stops_mid_phrase():
    # references "a dog runs" / "a dog runs fast": stopping after "a dog" shares unigrams and a bigram with
    # them either way, but only with <end> counted does it lose the n-grams ending the references
    cider = reward_references([[[4, 5, 6], [4, 5, 6, 7]], [[8, 9, 10]], [[11, 8, 12, 4]]])  # idf needs a corpus
    whole, cut = cider.scores([[4, 5, 6, END], [4, 5, END]], [0, 0])
    assert whole > cut
    assert cider.score([4, 5, 6], 0) < whole  # not finishing costs too


def test_a_sampled_unk_earns_no_reward_from_a_references_unk():
    refs = [[[4, UNK, 6]], [[8, 9, 10]], [[11, 8, 12, 4]]]
    cider = reward_references(refs)
    assert cider.score([4, UNK, 6, END], 0) == cider.score([4, 7, 6, END], 0)  # <unk> matches like a wrong word


def _model(vocab=12, seed=0):
    torch.manual_seed(seed)
    return ShowAttendTell(ModelConfig(vocab_size=vocab, feature_dim=8, **MODEL))


def test_samples_are_grouped_by_image_and_masked_after_end():
    model = _model()
    features = torch.rand(3, 4, 8)
    tokens, log_probs = sample_captions(model, features, samples=4, max_length=6)
    assert tokens.shape[0] == 12 and log_probs.shape == tokens.shape and tokens.shape[1] <= 7
    for row, lp in zip(tokens.tolist(), log_probs):
        if END in row:
            end = row.index(END)
            assert all(t == PAD for t in row[end + 1 :]) and torch.all(lp[end + 1 :] == 0)
            assert torch.all(lp[: end + 1] < 0)
        assert START not in row
    # the log probabilities are those of the model for the sampled words
    memory = model.attend_memory(features.repeat_interleave(4, 0))
    lp0, _, _ = model.step(torch.full((12,), START), model.init_state(memory), memory)
    lp0 = lp0 - lp0[:, 2:].logsumexp(1, keepdim=True)  # renormalised without <pad> and <start>
    torch.testing.assert_close(log_probs[:, 0], lp0.gather(1, tokens[:, :1]).squeeze(1))


def test_a_lower_temperature_samples_nearer_the_greedy_caption_with_the_tempered_log_probabilities():
    model = _model()
    features = torch.rand(3, 4, 8)
    torch.manual_seed(0)
    tokens, log_probs = sample_captions(model, features, samples=40, max_length=6, temperature=0.3)
    torch.manual_seed(0)
    hot, _ = sample_captions(model, features, samples=40, max_length=6)
    memory = model.attend_memory(features)
    lp0, _, _ = model.step(torch.full((120,), START), tuple(s.repeat_interleave(40, 0) for s in model.init_state(memory)),
                           memory)
    best = lp0[:, 2:].argmax(1) + 2  # the most likely first word (not <pad> or <start>)
    assert (tokens[:, 0] == best).float().mean() > (hot[:, 0] == best).float().mean()
    tempered = lp0[:, 2:] / 0.3  # without <pad> and <start>, sharpened
    tempered = torch.cat([torch.full((120, 2), float("-inf")), tempered - tempered.logsumexp(1, keepdim=True)], 1)
    torch.testing.assert_close(log_probs[:, 0], tempered.gather(1, tokens[:, :1]).squeeze(1))


@pytest.mark.parametrize("baseline", ["greedy", "mean"])
def test_one_scst_step_raises_the_log_probability_of_better_than_baseline_samples(baseline):
    model = _model()
    features = torch.rand(4, 4, 8)
    refs = [[[4, 5, 6, 7], [4, 5, 6]], [[8, 9, 10]], [[4, 9, 11, 5]], [[6, 6, 7]]]
    cider = reward_references(refs)
    torch.manual_seed(1)
    loss, parts = scst_loss(model, features, [0, 1, 2, 3], cider, samples=6, max_length=5, baseline=baseline)
    torch.manual_seed(1)  # the same samples again, to read their log probabilities before and after
    tokens, before = sample_captions(model, features, 6, 5)
    reward = cider.scores(words_of(tokens, keep_end=True), [i for i in range(4) for _ in range(6)])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = _sequence_log_probs(model, features.repeat_interleave(6, 0), tokens)
    if baseline == "mean":
        base = reward.reshape(4, 6)
        base = ((base.sum(1, keepdims=True) - base) / 5).reshape(-1)
    else:
        base = np.repeat(cider.scores(words_of(_greedy(model, features), keep_end=True), range(4)), 6)
    advantage = torch.as_tensor(reward - base, dtype=torch.float32)
    change = after - before.sum(1).detach()
    assert float((advantage * change).sum()) > 0  # better-than-baseline captions became more likely
    assert parts["sample_reward"] == pytest.approx(float(reward.mean()))


def _sequence_log_probs(model, features, tokens):
    memory = model.attend_memory(features)
    state = model.init_state(memory)
    prev = torch.full((tokens.size(0),), START)
    total = torch.zeros(tokens.size(0))
    with torch.no_grad():
        for t in range(tokens.size(1)):
            lp, state, _ = model.step(prev, state, memory)
            lp = lp - lp[:, 2:].logsumexp(1, keepdim=True)
            word = tokens[:, t]
            total += torch.where(word != PAD, lp.gather(1, word.unsqueeze(1)).squeeze(1), 0.0)
            prev = torch.where(word != PAD, word, END)
    return total


def _greedy(model, features):
    from imcap.decoding import greedy_search

    return [h.tokens for h in greedy_search(model, features, 5)]


def test_scst_fine_tuning_from_a_cross_entropy_run(tiny_data, tmp_path):
    base = dict(batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    quiet = dict(progress=False, log=lambda *a: None)
    train(tiny_data, tmp_path / "xe", model_config=MODEL, train_config=TrainConfig(epochs=3, **base), **quiet)
    xe = load_file(tmp_path / "xe/best/model.safetensors")
    cfg = TrainConfig(**{**base, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0}, epochs=2, objective="scst",
                      init_from=str(tmp_path / "xe"), scst_samples=3, scst_max_length=8)
    summary = train(tiny_data, tmp_path / "scst", train_config=cfg, **quiet)
    assert summary["steps"] == 8  # 32 train images / 8 per batch x 2 epochs
    meta = json.loads((tmp_path / "scst/checkpoint/checkpoint.json").read_text())
    assert meta["model_config"]["hidden_dim"] == 24 and meta["train_config"]["objective"] == "scst"
    tuned = load_file(tmp_path / "scst/checkpoint/model.safetensors")
    assert any(not torch.equal(xe[k], tuned[k]) for k in xe)  # started from xe's weights and moved
    assert sum(float((xe[k] - tuned[k]).abs().max()) for k in xe) < 5  # ... but not from scratch


def test_init_from_trains_on_the_store_of_the_run_it_starts_from(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    torch.manual_seed(0)
    extract_features(data, encoder=build_encoder("efficientnet-lite0", 32, pretrained=False), image_size=32,
                     progress=False)  # a second store: without --features a run must say which
    tiny = ["--embed-dim", "16", "--hidden-dim", "24", "--attention-dim", "16", "--epochs", "1", "--quiet"]
    assert main(["train", str(data), "--out", str(tmp_path / "new"), *tiny]) != 0
    assert "several feature stores" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "xe"), "--features", "efficientnet-lite0-32", *tiny]) == 0
    assert main(["train", str(data), "--out", str(tmp_path / "scst"), "--init-from", str(tmp_path / "xe"),
                 "--objective", "scst", "--scst-samples", "2", "--epochs", "1", "--quiet"]) == 0
    meta = json.loads((tmp_path / "scst/checkpoint/checkpoint.json").read_text())
    assert meta["data"]["features"] == "efficientnet-lite0-32"


def test_cli_init_from_a_folder_without_checkpoint_is_a_one_line_error(tiny_data, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    code = main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--objective", "scst",
                 "--init-from", str(other), "--quiet"])
    assert code != 0 and "no checkpoint" in capsys.readouterr().err


def test_preset_runs_cross_entropy_then_scst_and_resumes(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", str(tiny_data), "--out", str(run), "--preset", "flickr8k-scst", "--features", "efficientnet-lite0-64",
            "--epochs", "1", "--scst-epochs", "1", "--embed-dim", "16", "--hidden-dim", "24", "--attention-dim", "16",
            "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "xe stage" in out and "scst stage" in out
    xe = json.loads((run / "xe/best/checkpoint.json").read_text())
    final = json.loads((run / "best/checkpoint.json").read_text())
    assert xe["train_config"]["warmup_steps"] == 200 and xe["model_config"]["hidden_dim"] == 24  # preset + flags
    assert final["train_config"]["objective"] == "scst" and final["train_config"]["init_from"] == str(run / "xe")
    assert final["train_config"]["scst_temperature"] == 0.5 and final["train_config"]["batch_size"] == 10
    assert final["decoder"] == xe["decoder"] == "show-attend-tell"  # the class that reads model_config
    assert final["model_config"] == xe["model_config"]
    before = (run / "checkpoint/model.safetensors").read_bytes()
    assert main(argv) == 0  # both stages finished: a re-run changes nothing
    assert (run / "checkpoint/model.safetensors").read_bytes() == before


def test_the_flickr8k_preset_is_one_cross_entropy_stage_in_run_dir(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--out", str(run), "--preset", "flickr8k", "--features", "efficientnet-lite0-64",
                 "--epochs", "1", "--embed-dim", "16", "--hidden-dim", "24", "--attention-dim", "16", "--quiet"]) == 0
    meta = json.loads((run / "best/checkpoint.json").read_text())
    assert meta["train_config"]["objective"] == "xe" and meta["train_config"]["lr"] == 1e-3
    assert not (run / "xe").exists() and "stage" not in capsys.readouterr().out


def test_preset_without_its_feature_store_says_how_to_make_it(tiny_data, tmp_path, capsys):
    code = main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--preset", "flickr8k", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "imcap features" in err and "efficientnet-lite2" in err and len(err.splitlines()) == 1


def test_an_ensemble_preset_trains_its_members_and_decodes_them_as_one(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(tiny_data), "--out", str(run), "--preset", "flickr8k-ensemble", "--features",
                 "efficientnet-lite0-64", "--epochs", "1", "--embed-dim", "16", "--hidden-dim", "24",
                 "--attention-dim", "16", "--quiet"]) == 0
    assert "member m1" in capsys.readouterr().out
    seeds = [json.loads((run / m / "best/checkpoint.json").read_text())["train_config"]["seed"] for m in ("m1", "m2")]
    assert seeds == [0, 1]
    assert json.loads((run / "ensemble.json").read_text()) == {"members": ["m1", "m2"]}
    captioner = Captioner.load(run)
    assert isinstance(captioner.model, Ensemble) and len(captioner.model.members) == 2
    assert main(["evaluate", str(run), "--split", "val", "--beam", "2", "--quiet"]) == 0
    report = json.loads((run / "eval/val-beam2.scores.json").read_text())
    assert report["checkpoint"] == f"{run / 'm1/best'} + {run / 'm2/best'}"
    (run / "ensemble.json").write_text('{"members": ["m1"]}')
    assert main(["evaluate", str(run), "--split", "val", "--quiet"]) == 1
    assert "at least 2 run directories" in capsys.readouterr().err

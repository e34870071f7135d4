import json
import pickle

import pytest
import torch

from imcap import checkpoint as ckpt
from imcap.api import Captioner
from imcap.decoding import DecodingOptions, decode
from imcap.encoders import encoder_spec
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import Vocabulary

WORDS = ["a", "red", "circle", "blue", "square", "on", "the", "left", "right"]


def make(tmp_path, name="best"):
    torch.manual_seed(0)
    vocab = Vocabulary.build([WORDS], min_count=1)
    spec = encoder_spec("efficientnet-lite0", 64)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=spec.feature_dim, embed_dim=8,
                                       hidden_dim=16, attention_dim=8)).eval()
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(), "language": "en"}
    opt = torch.optim.Adam(model.parameters())
    ckpt.save_checkpoint(tmp_path / name, model, meta, opt)
    return model, tmp_path / name


def test_round_trip_gives_identical_outputs(tmp_path):
    model, path = make(tmp_path)
    captioner = Captioner.load(tmp_path)
    f = torch.randn(3, 4, 1280)
    a = decode(model, f, DecodingOptions(beam_size=3, n_best=2))
    b = decode(captioner.model, f, DecodingOptions(beam_size=3, n_best=2))
    for x, y in zip(a, b):
        assert [h.tokens for h in x] == [h.tokens for h in y]
        assert all(abs(h.score - g.score) < 1e-5 for h, g in zip(x, y))
    for (k, v), (k2, v2) in zip(model.state_dict().items(), captioner.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in path.iterdir())


def test_optimizer_and_rng_state_round_trip(tmp_path):
    model, path = make(tmp_path, "checkpoint")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, 1280), torch.tensor([[1, 4, 2], [1, 5, 2]]), torch.tensor([3, 3]))[0].sum().backward()
    opt.step()
    state = torch.get_rng_state()
    ckpt.save_checkpoint(path, model, {"model_config": {}, "vocab": {}, "encoder": {}}, opt)
    torch.rand(5)
    meta, _ = ckpt.load_checkpoint(path)
    opt2 = torch.optim.Adam(model.parameters(), lr=5.0)
    ckpt.load_training_state(path, opt2, meta)
    assert torch.equal(torch.get_rng_state(), state)
    assert opt2.param_groups[0]["lr"] == 1e-3
    for param in model.parameters():
        s1, s2 = opt.state[param], opt2.state[param]
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["step"], s2["step"])


def test_malformed_json_is_refused(tmp_path):
    _, path = make(tmp_path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="malformed JSON"):
        Captioner.load(tmp_path)


def test_pickle_payload_is_refused_without_unpickling(tmp_path):
    _, path = make(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (path / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ckpt.CheckpointError, match="not a valid safetensors"):
        Captioner.load(tmp_path)


def test_wrong_shapes_and_foreign_json_are_refused(tmp_path):
    _, path = make(tmp_path)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["model_config"]["hidden_dim"] = 32
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="inconsistent"):
        Captioner.load(tmp_path)
    (path / "checkpoint.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ckpt.CheckpointError, match="not an imcap checkpoint"):
        Captioner.load(tmp_path)


def test_interrupted_swap_falls_back_to_old(tmp_path):
    _, path = make(tmp_path)
    path.rename(path.with_name("best.old"))  # as if killed between the two renames
    assert Captioner.load(tmp_path).model is not None


def test_missing_run_dir_message(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such run directory"):
        ckpt.find_checkpoint(tmp_path / "nope")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.find_checkpoint(tmp_path)

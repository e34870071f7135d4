import pytest
import torch

from imcap.decoding import DecodingOptions, decode
from imcap.ensemble import Ensemble
from imcap.model import ModelConfig, ShowAttendTell
from imcap.text import START

from test_decoding import D, V, features, tiny


def gru(seed=2) -> ShowAttendTell:
    torch.manual_seed(seed)
    return ShowAttendTell(ModelConfig(vocab_size=V, feature_dim=D, embed_dim=6, hidden_dim=7, attention_dim=5,
                                      rnn="gru")).eval()


def test_ensemble_of_copies_decodes_like_the_model():
    model, f = tiny(), features(6)
    options = DecodingOptions(beam_size=3, max_length=10, n_best=2)
    alone, together = decode(model, f, options), decode(Ensemble([model, model]), f, options)
    for a, b in zip(alone, together):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-5)
        assert torch.allclose(a[0].alphas, b[0].alphas, atol=1e-6)


def test_step_averages_the_members_probabilities_and_attention():
    members, f = [tiny(0), tiny(1), gru()], features(4)
    ensemble = Ensemble(members)
    tokens = torch.full((4,), START)
    memory = ensemble.attend_memory(f)
    lp, state, alpha = ensemble.step(tokens, ensemble.init_state(memory), memory)
    probs, alphas = [], []
    for m in members:
        mem = m.attend_memory(f)
        lp_m, _, alpha_m = m.step(tokens, m.init_state(mem), mem)
        probs.append(lp_m.exp())
        alphas.append(alpha_m)
    assert torch.allclose(lp.exp(), torch.stack(probs).mean(0), atol=1e-6)
    assert torch.allclose(alpha, torch.stack(alphas).mean(0), atol=1e-6)
    assert len(state) == 2 + 2 + 1  # two LSTMs (h, c) and a GRU (h)


@pytest.mark.parametrize("beam", [1, 4])
def test_ensemble_batch_equals_one_by_one(beam):
    ensemble, f = Ensemble([tiny(0), tiny(1), gru()]), features(7, seed=5)
    options = DecodingOptions(beam_size=beam, max_length=9)
    batched = decode(ensemble, f, options)
    for i in range(f.size(0)):
        assert decode(ensemble, f[i : i + 1], options)[0][0].tokens == batched[i][0].tokens


def test_members_must_share_the_vocabulary():
    other = ShowAttendTell(ModelConfig(vocab_size=V + 1, feature_dim=D, embed_dim=8, hidden_dim=12))
    with pytest.raises(ValueError, match="vocabulary"):
        Ensemble([tiny(), other])
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([tiny()])

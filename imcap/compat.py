"""Decoder weights saved by earlier versions of model.py, converted to today's layout on load.

ShowAttendTell.load_state_dict calls upgrade_state_dict, so old checkpoints load with the same results:
- the recurrent cell was one nn.LSTMCell / nn.GRUCell `rnn` on [E y; z]; its gates are now split into
  gates_e (W_e, with the input bias), gates_z (W_z) and gates_h (W_h; with a bias only for a GRU, whose b_hn
  sits inside r * (.)). An LSTM's two biases add into one.
- the attention score w had a bias, which adds the same constant at every location and so never changed alpha:
  it is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def upgrade_state_dict(state_dict: Mapping[str, torch.Tensor], embed_dim: int, rnn: str) -> Mapping[str, torch.Tensor]:
    """state_dict in today's layout (the same object when it already is). embed_dim, rnn: the model's config."""
    if "attention.score.bias" in state_dict:
        state_dict = {k: v for k, v in state_dict.items() if k != "attention.score.bias"}
    if "rnn.weight_ih" in state_dict:
        state_dict = dict(state_dict)
        w_ih, w_hh = state_dict.pop("rnn.weight_ih"), state_dict.pop("rnn.weight_hh")  # (G, m + D), (G, n)
        b_ih, b_hh = state_dict.pop("rnn.bias_ih"), state_dict.pop("rnn.bias_hh")  # (G,), (G,)
        state_dict["gates_e.weight"], state_dict["gates_z.weight"] = w_ih[:, :embed_dim], w_ih[:, embed_dim:]
        state_dict["gates_h.weight"] = w_hh
        if rnn == "lstm":
            state_dict["gates_e.bias"] = b_ih + b_hh
        else:
            state_dict["gates_e.bias"], state_dict["gates_h.bias"] = b_ih, b_hh
    return state_dict

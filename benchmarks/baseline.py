"""A straightforward Show-Attend-Tell decoder, written the way the well-known public tutorial writes it
(sgrvinod, "a-PyTorch-Tutorial-to-Image-Captioning", `DecoderWithAttention.forward`): the benchmark's baseline.

It computes the SAME equations as imcap.model.ShowAttendTell with the SAME parameter values (copied from a
given model), so the benchmark compares two implementations of one function. What makes it the tutorial's:

- the image projection W_a a is recomputed at every step, for every caption row still writing;
- the deep output layer (L_h, L_z, L_o) runs per step inside the time loop;
- an nn.LSTMCell (or nn.GRUCell) is called on cat([E y_{t-1}; z_t]) at every step;
- one feature row per caption: captions of the same image each carry a copy of its features;
- rows sorted by length and the batch shrunk at each step to the captions still writing
  (`batch_size_t = sum(l > t)`), exactly as the tutorial does. This is the tutorial's one saving; it is kept
  so that the ratio against imcap's fast path is not inflated by work on padding.

Where the tutorial's model differs from the paper (ReLU in the attention MLP, a per-channel gate, output from
h alone), this file follows imcap's equations (tanh, a scalar gate beta, the deep output of eq. 7).
The module names are the tutorial's (encoder_att, decoder_att, full_att, decode_step, fc).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imcap.model import ShowAttendTell


def cell_parameters(model: ShowAttendTell, get: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.detach):
    """The model's recurrent cell as nn.LSTMCell / nn.GRUCell parameters: (weight_ih (G, m + D), weight_hh (G, n),
    bias_ih (G,), bias_hh (G,)), each passed through `get` (e.g. `lambda p: p.grad` for the gradients).

    Knows both layouts imcap has used: one `rnn` cell module on [E y; z], or the cell's gates split into
    `gates_e` (W_e, with the input bias), `gates_z` (W_z) and `gates_h` (W_h, bias only for a GRU).
    """
    if isinstance(getattr(model, "rnn", None), (nn.LSTMCell, nn.GRUCell)):
        r = model.rnn
        return get(r.weight_ih), get(r.weight_hh), get(r.bias_ih), get(r.bias_hh)
    if all(hasattr(model, k) for k in ("gates_e", "gates_z", "gates_h")):
        e, z, h = model.gates_e, model.gates_z, model.gates_h
        weight_ih = torch.cat([get(e.weight), get(z.weight)], dim=1)  # (G, m + D): input [E y; z]
        bias_hh = get(h.bias) if h.bias is not None else torch.zeros(h.out_features)
        return weight_ih, get(h.weight), get(e.bias), bias_hh
    raise TypeError("benchmarks/baseline.py does not know this model's recurrent cell layout: update cell_parameters")


class TutorialDecoder(nn.Module):
    """ShowAttendTell's teacher-forced forward, the tutorial's way, on a copy of `model`'s parameters."""

    def __init__(self, model: ShowAttendTell):
        super().__init__()
        c = self.config = model.config
        own = copy.deepcopy  # the baseline trains its own copy: the fast model is left untouched
        self.embedding = own(model.embedding)  # E
        self.encoder_att = own(model.attention.feature_proj)  # W_a, b
        self.decoder_att = own(model.attention.hidden_proj)  # W_h
        self.full_att = own(model.attention.score)  # w
        self.init_h, self.init_c = own(model.init_h), own(model.init_c)
        self.f_beta = own(model.f_beta)  # beta = sigmoid(f_beta(h))
        cell = nn.LSTMCell if c.rnn == "lstm" else nn.GRUCell
        self.decode_step = cell(c.embed_dim + c.feature_dim, c.hidden_dim)
        with torch.no_grad():
            for p, value in zip(
                (self.decode_step.weight_ih, self.decode_step.weight_hh, self.decode_step.bias_ih, self.decode_step.bias_hh),
                cell_parameters(model),
            ):
                p.copy_(value)
        if c.deep_output:
            self.out_h, self.out_z = own(model.out_h), own(model.out_z)  # L_h, L_z
        self.dropout = own(model.dropout)
        self.fc = own(model.out)  # L_o
        self.train(model.training)

    def forward(
        self, features: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ShowAttendTell.forward: features (I, P, D), captions (B, L), lengths (B,),
        image_index (B,) -> logits (B, L-1, V), alphas (B, L-1, P), zero past each caption's end."""
        if image_index is not None:
            features = features[image_index]  # (B, P, D): a copy of the image for each caption
        B, L = captions.shape
        P = features.size(1)
        decode_lengths, order = (lengths - 1).sort(descending=True, stable=True)  # (B,)
        features, captions = features[order], captions[order]  # (B, P, D), (B, L)
        embeddings = self.embedding(captions)  # (B, L, m)

        mean = features.mean(dim=1)  # (B, D)
        h = torch.tanh(self.init_h(mean))  # (B, n)
        c = torch.tanh(self.init_c(mean)) if self.init_c is not None else None  # (B, n)

        predictions = features.new_zeros(B, L - 1, self.config.vocab_size)  # (B, L-1, V)
        alphas = features.new_zeros(B, L - 1, P)  # (B, L-1, P)
        for t in range(int(decode_lengths.max())):
            bt = int((decode_lengths > t).sum())  # batch_size_t: captions still writing
            h = h[:bt]  # (bt, n)
            context, alpha = self.attention(features[:bt], h)  # (bt, D), (bt, P)
            if self.f_beta is not None:
                context = torch.sigmoid(self.f_beta(h)) * context  # beta: (bt, 1)
            emb = embeddings[:bt, t]  # (bt, m)
            x = torch.cat([emb, context], dim=1)  # (bt, m + D)
            if c is not None:
                h, c = self.decode_step(x, (h, c[:bt]))  # (bt, n), (bt, n)
            else:
                h = self.decode_step(x, h)  # (bt, n)
            predictions[:bt, t] = self.output(emb, h, context)  # (bt, V)
            alphas[:bt, t] = alpha
        inverse = torch.argsort(order)
        return predictions[inverse], alphas[inverse]

    def attention(self, features: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e = w^T tanh(W_a a + b + W_h h) with W_a a recomputed at each call. features (b, P, D), h (b, n)."""
        att1 = self.encoder_att(features)  # (b, P, A)
        att2 = self.decoder_att(h)  # (b, A)
        e = self.full_att(torch.tanh(att1 + att2.unsqueeze(1))).squeeze(2)  # (b, P)
        alpha = F.softmax(e, dim=1)  # (b, P)
        context = (features * alpha.unsqueeze(2)).sum(dim=1)  # (b, D)
        return context, alpha

    def output(self, emb: torch.Tensor, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The deep output layer for one step: (b, m), (b, n), (b, D) -> logits (b, V)."""
        if self.config.deep_output:
            x = torch.tanh(emb + self.out_h(h) + self.out_z(context))  # (b, m)
        else:
            x = h
        return self.fc(self.dropout(x))  # (b, V)

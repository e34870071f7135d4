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

`tutorial_beam_search` is the beam search baseline: one image at a time, the tutorial's caption.py loop
(W_a a per step and beam, the output layer per step, Python lists of hypotheses) on the same parameters,
with imcap.decoding's search rules so that it finds the same captions.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imcap.model import ShowAttendTell
from imcap.text import END, START, UNK


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

        h, c = self.init_hidden_state(features)  # (B, n), (B, n) or None

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

    def init_hidden_state(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h0, c0 from the mean annotation vector: features (b, P, D) -> (b, n), (b, n) (c0 None for a GRU)."""
        mean = features.mean(dim=1)  # (b, D)
        h = torch.tanh(self.init_h(mean))  # (b, n)
        c = torch.tanh(self.init_c(mean)) if self.init_c is not None else None  # (b, n)
        return h, c

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


@torch.no_grad()
def tutorial_beam_search(
    decoder: TutorialDecoder, features: torch.Tensor, beam_size: int = 3, max_length: int = 30
) -> tuple[list[int], float, torch.Tensor]:
    """Beam search over ONE image's features (P, D), the tutorial's way (its caption.py,
    `caption_image_beam_search`), with the search rules of imcap.decoding.decode without length penalty, so
    that the best caption is the same. Returns the best caption's words (ending with <end> if it finished),
    its log probability and its attention (words, P). `decoder` must be in eval mode (no dropout).

    What makes it the tutorial's:
    - the image's features expanded to one row per beam, and reindexed with the beams at every step;
    - at every step, for every beam: W_a a recomputed (decoder.attention), the gate, nn.LSTMCell on
      cat([E y, z]), the deep output and a log-softmax over the full vocabulary, added to the running scores;
    - top-k over the flattened (beams x V) scores, the words of each beam and the finished hypotheses in
      Python lists, each beam's attention maps concatenated step by step.

    imcap's rules (imcap.decoding.beam_search), where they differ from the tutorial's:
    - the 2k best extensions are ranked: an <end> among the first k finishes a hypothesis, the k best other
      extensions go on. So k beams stay open after a hypothesis finishes: the tutorial's shrinking beam
      (`k -= len(complete_inds)`) is a different search and would give other captions;
    - the search stops once k hypotheses have finished, or after max_length words and one last step in
      which only <end> can finish; then the beams still open (max_length words, no <end>) join the
      finished hypotheses, so a caption is always returned;
    - the best is the highest log probability among them (no length penalty).
    - <unk> is never chosen (DecodingOptions.allow_unk False, the default).
    k = 1 is greedy search.
    """
    if decoder.training:
        raise ValueError("tutorial_beam_search needs the decoder in eval mode (dropout off)")
    k, V = beam_size, decoder.config.vocab_size
    features = features.unsqueeze(0).expand(k, *features.shape)  # (k, P, D): the image once per beam
    h, c = decoder.init_hidden_state(features)  # (k, n), (k, n) or None
    prev_words = torch.full((k,), START, dtype=torch.long)  # (k,) the last word of each beam
    top_k_scores = torch.zeros(k)  # (k,) log p of each beam
    seqs: list[list[int]] = [[] for _ in range(k)]  # the words of each beam, without <start>
    seqs_alpha = features.new_zeros(k, 0, features.size(1))  # (k, 0, P) the attention of each beam's words
    complete_seqs: list[list[int]] = []  # finished hypotheses (ending with <end>), their log p and attention
    complete_scores: list[float] = []
    complete_alphas: list[torch.Tensor] = []

    for step in range(max_length + 1):  # max_length words, then one last chance for <end>
        embeddings = decoder.embedding(prev_words)  # (s, m), s beams
        context, alpha = decoder.attention(features, h)  # (s, D), (s, P): W_a a recomputed for every beam
        if decoder.f_beta is not None:
            context = torch.sigmoid(decoder.f_beta(h)) * context  # beta: (s, 1)
        x = torch.cat([embeddings, context], dim=1)  # (s, m + D)
        if c is not None:
            h, c = decoder.decode_step(x, (h, c))  # (s, n), (s, n)
        else:
            h = decoder.decode_step(x, h)  # (s, n)
        scores = F.log_softmax(decoder.output(embeddings, h, context), dim=1)  # (s, V)
        scores[:, UNK] = float("-inf")  # imcap's rule: <unk> is never chosen
        scores = top_k_scores.unsqueeze(1) + scores  # (s, V) log p of every extension
        if step == 0:
            scores = scores[:1]  # (1, V): all beams are the same <start>
        top_scores, top_words = scores.view(-1).topk(min(2 * k, scores.numel()))  # (2k,) best first
        prev_word_inds, next_word_inds = top_words // V, top_words % V  # (2k,) beam extended, word

        beams = []  # (beam extended, word, log p) of the extensions that go on, best first
        candidates = zip(prev_word_inds.tolist(), next_word_inds.tolist(), top_scores.tolist())
        for rank, (beam, word, score) in enumerate(candidates):
            if word == END:
                if rank < k:  # an <end> among the k best finishes a hypothesis
                    complete_seqs.append(seqs[beam] + [END])
                    complete_scores.append(score)
                    complete_alphas.append(torch.cat([seqs_alpha[beam], alpha[beam : beam + 1]]))  # (step + 1, P)
            elif len(beams) < k:
                beams.append((beam, word, score))
        if len(complete_seqs) >= k or step == max_length:
            break

        rows = torch.tensor([beam for beam, _, _ in beams])  # (s',)
        seqs = [seqs[beam] + [word] for beam, word, _ in beams]
        seqs_alpha = torch.cat([seqs_alpha[rows], alpha[rows].unsqueeze(1)], dim=1)  # (s', step + 1, P)
        features, h = features[rows], h[rows]  # (s', P, D), (s', n)
        c = c[rows] if c is not None else None  # (s', n)
        prev_words = torch.tensor([word for _, word, _ in beams])  # (s',)
        top_k_scores = torch.tensor([score for _, _, score in beams])  # (s',)

    if len(complete_seqs) < k:  # max_length reached: the open beams are candidates too, unfinished
        complete_seqs += seqs
        complete_scores += top_k_scores.tolist()
        complete_alphas += list(seqs_alpha)
    best = complete_scores.index(max(complete_scores))
    return complete_seqs[best], complete_scores[best], complete_alphas[best]

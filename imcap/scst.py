"""Self-critical sequence training (Rennie et al. 2017): fine-tune on the CIDEr-D reward of sampled captions.

For each image, `samples` captions are drawn from the model; each one's reward is its CIDEr-D against the
image's references, minus a baseline: the reward of the greedy caption (the paper's "self-critical"
baseline) or the mean reward of the image's other samples. The loss is REINFORCE:

    loss = - sum_rows (r_row - b_row) * sum_t log p(w_t | w_<t, image)      / rows

CIDEr-D is computed here on word ids, in Python, with document frequencies from the training references
(fixed for the whole run), so a reward costs no Java and no re-tokenising. It follows pycocoevalcap's
`CiderScorer` exactly (n = 1..4, sigma = 6, clipped tf-idf vectors, length penalty, x10), which a test checks.
The reward counts `<end>` as a word of both the references and the captions that finished, as the widely
used self-critical implementations do: otherwise a caption that stops mid-phrase ("a dog in the") loses
nothing for it, and SCST learns such endings.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from .decoding import greedy_search, sample_captions
from .text import END, PAD, START, UNK

NO_MATCH = -1  # stands for a reference's <unk> in rewards

def ngram_counts(words: Sequence[int], n: int = 4) -> Counter:
    """Counts of every 1..n-gram of `words`."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D of hypotheses against a fixed corpus of references, on word ids.

    references[i] holds image i's reference captions (lists of word ids, without <start>/<end>). Document
    frequency and the corpus size come from all of them, as pycocoevalcap does for the scored corpus.
    The references are kept as flat arrays of n-gram ids and counts, 8 bytes per n-gram of a reference (COCO's
    113,287 training images: about 0.2 GB, against 4.3 GB as one dictionary per n and reference); a
    reference's tf-idf vector is rebuilt when an image is scored, with the same float operations.
    """

    def __init__(self, references: Sequence[Sequence[Sequence[int]]], n: int = 4, sigma: float = 6.0):
        self.n, self.sigma = n, sigma
        self.ids: dict[tuple[int, ...], int] = {}  # n-gram -> id, in order of first appearance
        doc_freq = array("i")  # by n-gram id: images whose references contain it
        gram_ids, gram_tf = array("i"), array("i")  # every reference's n-grams, one reference after another
        ref_start, image_start = array("q", [0]), array("q", [0])
        for refs in references:
            seen: set[int] = set()
            for ref in refs:
                for gram, tf in ngram_counts(ref, n).items():
                    i = self.ids.setdefault(gram, len(self.ids))
                    if i == len(doc_freq):
                        doc_freq.append(0)
                    gram_ids.append(i)
                    gram_tf.append(tf)
                    seen.add(i)
                ref_start.append(len(gram_ids))
            for i in seen:
                doc_freq[i] += 1
            image_start.append(len(ref_start) - 1)
        self.document_frequency = np.frombuffer(doc_freq, dtype=np.int32)
        self.log_docs = math.log(float(max(len(references), 1)))
        self.idf = np.array([self.log_docs - math.log(max(1.0, d)) for d in doc_freq], dtype=np.float64)
        self.order = np.fromiter((len(g) - 1 for g in self.ids), dtype=np.int8, count=len(self.ids))  # n - 1
        self.gram_ids, self.gram_tf = np.frombuffer(gram_ids, dtype=np.int32), np.frombuffer(gram_tf, dtype=np.int32)
        self.ref_start, self.image_start = np.frombuffer(ref_start, dtype=np.int64), np.frombuffer(image_start, dtype=np.int64)
        refs = len(self.ref_start) - 1
        squares = np.zeros(refs * n)  # per reference and n: the squared norm of its tf-idf vector
        length = np.zeros(refs)  # pycocoevalcap measures length in bigrams
        for lo in range(0, len(self.gram_ids), 1 << 20):  # in chunks: a few MB at a time
            ids, tf = self.gram_ids[lo : lo + (1 << 20)], self.gram_tf[lo : lo + (1 << 20)]
            owner = np.searchsorted(self.ref_start, np.arange(lo, lo + len(ids)), side="right") - 1
            v = tf * self.idf[ids]
            squares += np.bincount(owner * n + self.order[ids], weights=v * v, minlength=refs * n)
            length += np.bincount(owner, weights=tf * (self.order[ids] == 1), minlength=refs)
        self.ref_norms = np.sqrt(squares).reshape(refs, n)
        self.ref_length = length.astype(np.int64)

    def _reference(self, r: int) -> dict[int, float]:
        ids = self.gram_ids[self.ref_start[r] : self.ref_start[r + 1]]
        tf = self.gram_tf[self.ref_start[r] : self.ref_start[r + 1]]
        return dict(zip(ids.tolist(), (tf * self.idf[ids]).tolist()))

    def score(self, words: Sequence[int], image: int) -> float:
        """CIDEr-D of one hypothesis (word ids) for reference set `image`."""
        first, last = int(self.image_start[image]), int(self.image_start[image + 1])
        if first == last:
            return 0.0
        vec: list[list[tuple[int, float]]] = [[] for _ in range(self.n)]  # per n: (n-gram id or -1, tf-idf)
        length = 0
        for gram, tf in ngram_counts(words, self.n).items():
            i = self.ids.get(gram, -1)
            k = len(gram) - 1
            vec[k].append((i, tf * (float(self.idf[i]) if i >= 0 else self.log_docs)))  # unseen: df 0 -> 1
            if k == 1:
                length += tf
        norms = [math.sqrt(sum(v * v for _, v in grams)) for grams in vec]
        total = 0.0
        for r in range(first, last):
            ref, ref_norms = self._reference(r), self.ref_norms[r]
            penalty = math.exp(-((length - int(self.ref_length[r])) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                val = sum(min(v, ref.get(i, 0.0)) * ref.get(i, 0.0) for i, v in vec[k])
                if norms[k] and ref_norms[k]:
                    val /= norms[k] * float(ref_norms[k])
                total += val * penalty
        return total / self.n / (last - first) * 10.0

    def scores(self, hypotheses: Sequence[Sequence[int]], images: Sequence[int]) -> np.ndarray:
        return np.array([self.score(h, i) for h, i in zip(hypotheses, images)], dtype=np.float64)


def words_of(tokens: torch.Tensor | Sequence[Sequence[int]], keep_end: bool = False) -> list[list[int]]:
    """(R, T) ids -> each row's words up to its first <end> (that <end> included when keep_end)."""
    out = []
    for row in tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens:
        words = []
        for t in row:
            if t == END:
                if keep_end:
                    words.append(END)
                break
            if t not in (PAD, START):
                words.append(t)
        out.append(words)
    return out


def reward_references(captions: Sequence[Sequence[Sequence[int]]]) -> CiderD:
    """The CIDEr-D scorer of SCST rewards: each image's reference word ids, each ending with <end>.

    A reference's <unk> becomes an id no caption contains: it still counts in the reference's length and
    n-grams, but a sampled <unk> earns nothing (the evaluation compares real words, where <unk> never matches).
    """
    return CiderD([[[*(NO_MATCH if t == UNK else t for t in c), END] for c in refs] for refs in captions])


def scst_loss(
    model, features: torch.Tensor, images: Sequence[int], cider: CiderD, *, samples: int = 5,
    max_length: int = 20, baseline: str = "greedy", total_rows: int | None = None, temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The self-critical loss of one batch of images (features (I, P, D), images: their reference indices).

    cider: built by `reward_references` (captions are scored with their <end>).

    baseline: "greedy" (reward of the greedy caption) or "mean" (mean reward of the image's other samples;
    needs samples >= 2). Captions are sampled without dropout: with dropout 0.5 before the output layer,
    samples score far below the greedy caption (CIDEr-D 0.2 against 0.5 on Flickr8k) and nearly every
    advantage is negative. total_rows: sampled captions in the whole batch when
    this is one shard of it (distributed training), so the shards' losses add up.
    """
    if baseline not in ("greedy", "mean"):
        raise ValueError(f"SCST baseline must be 'greedy' or 'mean', not {baseline!r}")
    if baseline == "mean" and samples < 2:
        raise ValueError("the 'mean' SCST baseline needs at least 2 samples per image")
    I = features.size(0)
    row_images = [i for i in images for _ in range(samples)]
    parts: dict[str, float] = {}
    was_training = model.training
    model.eval()  # the policy is the network without dropout: samples and greedy captions alike
    if baseline == "greedy":
        greedy = greedy_search(model, features, max_length)
        base_per_image = cider.scores(words_of([h.tokens for h in greedy], keep_end=True), images)  # (I,)
        base = np.repeat(base_per_image, samples)
        parts["greedy_reward"] = float(base_per_image.mean())
    tokens, log_probs = sample_captions(model, features, samples, max_length, temperature)
    model.train(was_training)
    reward = cider.scores(words_of(tokens, keep_end=True), row_images)  # (R,)
    if baseline == "mean":
        per_image = reward.reshape(I, samples)
        base = ((per_image.sum(1, keepdims=True) - per_image) / (samples - 1)).reshape(-1)
    advantage = torch.as_tensor(reward - base, dtype=log_probs.dtype, device=log_probs.device)  # (R,)
    rows = total_rows or tokens.size(0)
    loss = -(advantage * log_probs.sum(1)).sum() / rows
    parts.update(sample_reward=float(reward.mean()), advantage=float(advantage.mean()),
                 sample_words=float((tokens != PAD).sum(1).float().mean()))
    return loss, parts

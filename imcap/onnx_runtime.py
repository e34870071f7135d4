"""Caption images with an ONNX export (onnx_export.py) on onnxruntime, numpy and Pillow: no PyTorch.

    from imcap.onnx_runtime import OnnxCaptioner
    captioner = OnnxCaptioner.load("flickr8k-onnx")   # a folder written by `imcap export RUN_DIR --format onnx`
    result = captioner.caption("photo.jpg", beam_size=3)
    print(result.caption, result.score)               # result.alphas: (T, h, w) attention per word

The export is three graphs and a JSON file (onnx_export.py says what each holds). Here the encoder graph turns
preprocessed pixels into the annotation grid, the init graph computes the per-image memory and initial state,
and greedy and beam search run in numpy over the step graph with decoding.py's rules: the GNMT length penalty,
n-best lists, <unk> never chosen unless allow_unk, a caption always returned (the best unfinished one when none
ended by max_length), the rows of finished images dropped from the batch (COMPACT_SHARE), and the attention of
every word returned. Images are read and preprocessed as api.py does it (images.py, then the resize and
normalisation of encoders.ImageEncoder.preprocess, with the sizes and statistics of the export's JSON).

This module imports only the torch-free parts of imcap (text.py, images.py, limits.py); tests/test_onnx.py
checks that importing it and captioning with it never load torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image

from .images import to_rgb
from .captions import Caption, DecodingOptions, Hypothesis, ImageCaptioning, is_int
from .text import END, START, UNK, Vocabulary, get_tokenizer

MANIFEST = "imcap-onnx.json"  # the export's JSON, beside its graphs
FORMAT = "imcap-onnx"
VERSION = 1  # the newest manifest version read
# As decoding.COMPACT_SHARE: the rows of done images are dropped once they are at least this share of the batch.
COMPACT_SHARE = 0.1

ImageInput = Union[str, os.PathLike, Image.Image]
Arrays = tuple  # a tuple of numpy arrays indexed by batch row: the memory (one row per image) or the state


class OnnxModelError(ValueError):
    """An export folder that is missing, incomplete or not one of ours; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------ search options, results


# ---------------------------------------------------------------------------------------------- the exported graphs


class OnnxDecoder:
    """decoder_init.onnx and decoder_step.onnx behind the search contract of model.py, on numpy arrays.

    attend(features) -> (memory, state): the memory is the features and what the init graph computes from them
    (one row per image), the state the initial recurrent state. step(tokens, state, memory) -> (log_probs, state,
    alpha): tokens (N,) int64 and state N rows, the memory M rows, N = M * W (W consecutive rows per image).
    """

    def __init__(self, init, step, memory_names: Sequence[str], state_names: Sequence[str]):
        self._init, self._step = init, step  # onnxruntime.InferenceSession each
        self.memory_names, self.state_names = list(memory_names), list(state_names)
        self._step_outputs = ["log_probs", *(f"{s}_next" for s in self.state_names), "alpha"]

    def attend(self, features: np.ndarray) -> tuple[Arrays, Arrays]:
        """features (B, P, D) float32 -> memory, state."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        out = self._init.run([*self.memory_names[1:], *self.state_names], {"features": features})
        k = len(self.memory_names) - 1
        return (features, *out[:k]), tuple(out[k:])

    def step(self, tokens: np.ndarray, state: Arrays, memory: Arrays) -> tuple[np.ndarray, Arrays, np.ndarray]:
        """tokens (N,) previous words -> log_probs (N, V), new state, alpha (N, P)."""
        feeds = {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)}
        feeds.update((n, np.ascontiguousarray(x)) for n, x in zip(self.memory_names, memory))
        feeds.update((n, np.ascontiguousarray(x)) for n, x in zip(self.state_names, state))
        out = self._step.run(self._step_outputs, feeds)
        return out[0], tuple(out[1:-1]), out[-1]


# ----------------------------------------------------------------------------------------------------- the searches


def length_normalize(log_prob: np.ndarray, length: np.ndarray | int, penalty: float) -> np.ndarray:
    """GNMT length penalty (Wu et al. 2016): log p / ((5 + L) / 6) ** penalty, in log_prob's dtype."""
    if penalty == 0.0:
        return log_prob
    length = np.asarray(length, dtype=log_prob.dtype)
    return log_prob / ((5.0 + length) / 6.0) ** penalty


def decode(decoder: OnnxDecoder, features: np.ndarray, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Caption a batch of feature grids (B, P, D); returns n_best hypotheses per image, best first."""
    if features.shape[0] == 0:
        return []
    if options.beam_size == 1:
        return [[h] for h in greedy_search(decoder, features, options.max_length, options.allow_unk, options.no_repeat_ngram)]
    return beam_search(decoder, features, options)


def greedy_search(decoder: OnnxDecoder, features: np.ndarray, max_length: int = 30,
                  allow_unk: bool = False, no_repeat_ngram: int = 0) -> list[Hypothesis]:
    """Take the most probable word at each step (never <unk> unless allow_unk, nor a word that repeats an n-gram
    of the caption with no_repeat_ngram = n) until <end> or max_length words; the rows of images whose caption
    has ended are dropped from the batch (COMPACT_SHARE)."""
    B, L = features.shape[0], max_length
    image_memory, state = decoder.attend(features)  # (B) rows each
    memory = image_memory  # (A) rows: the images still in the batch
    live = np.arange(B)  # (A,) row a of every per-step array is image live[a]
    tokens = np.full(B, START, dtype=np.int64)  # (A,)
    done = np.zeros(B, dtype=bool)  # (A,) caption ended (row not dropped yet)
    log_probs = np.zeros(B, dtype=np.float32)  # (B,)
    lengths = np.full(B, L)  # (B,) unfinished captions keep max_length words
    out_tokens = np.zeros((L + 1, B), dtype=np.int64)  # (T, B) word of each image at each step
    out_alphas = np.zeros((L + 1, B, features.shape[1]), dtype=np.float32)  # (T, B, P)
    words = np.zeros((B, 0), dtype=np.int64)  # (A, t) each row's words so far (no_repeat_ngram)
    for t in range(L + 1):  # max_length words, then one last chance for <end>
        lp, state, alpha = decoder.step(tokens, state, memory)  # (A, V), state, (A, P)
        if not allow_unk:
            lp[:, UNK] = -np.inf
        if no_repeat_ngram:
            block_repeats(lp, words, no_repeat_ngram)
        tokens = lp.argmax(axis=1)  # (A,)
        best_lp = lp[np.arange(tokens.size), tokens]  # (A,)
        ended = tokens == END
        take = ~done & (ended | (t < L))
        log_probs[live] += np.where(take, best_lp, 0.0)
        lengths[live] = np.where(~done & ended, t + 1, lengths[live])
        done |= ended
        out_tokens[t, live] = tokens
        out_alphas[t, live] = alpha
        if no_repeat_ngram:
            words = np.concatenate([words, tokens[:, None]], 1)
        n_done = int(done.sum())
        if n_done == done.size:
            break
        if n_done >= COMPACT_SHARE * done.size:  # drop the rows of ended captions
            keep = np.flatnonzero(~done)  # (A',)
            live, tokens, done, words = live[keep], tokens[keep], done[keep], words[keep]
            state, memory = _rows(state, keep), _rows(image_memory, live)
    seq = out_tokens[: t + 1].T.tolist()  # (B, T)
    alphas = out_alphas[: t + 1].transpose(1, 0, 2)  # (B, T, P)
    return [Hypothesis(seq[b][: lengths[b]], float(log_probs[b]), float(log_probs[b]), alphas[b, : lengths[b]].copy())
            for b in range(B)]


def beam_search(decoder: OnnxDecoder, features: np.ndarray, options: DecodingOptions = DecodingOptions()) -> list[list[Hypothesis]]:
    """Batched beam search over B images x K beams, as decoding.beam_search; returns options.n_best hypotheses
    per image.

    At each step the 2K best extensions of each image are ranked; an <end> ranked within the first K finishes a
    hypothesis (kept in a pool of the K best finished, by length-penalised score), the K best other extensions
    go on. An image is done once K hypotheses have finished; at max_length the beams still open join the pool as
    unfinished hypotheses, so every image gets a caption. Each step records, per image and beam slot, the word
    chosen, the slot it extended (a back-pointer) and the attention; the n-best are traced back at the end.
    """
    B, K, L, P = features.shape[0], options.beam_size, options.max_length, features.shape[1]
    neg_inf = -np.inf
    image_memory, state = decoder.attend(features)  # (B) rows each
    # step 0 runs one row per image (the K beams start identical), later steps K: rows a * W .. a * W + W - 1 of
    # the state and tokens are the beams of image live[a], W = 1 then K; the memory has one row per image
    memory = image_memory
    live = np.arange(B)  # (A,) images still in the batch
    tokens = np.full(B, START, dtype=np.int64)  # (A * W,)
    beam_lp = np.full((B, K), neg_inf, dtype=np.float32)  # (A, K) log p of each open beam
    beam_lp[:, 0] = 0.0  # one alive at the start
    n_finished = np.zeros(B, dtype=np.int64)  # (A,)
    rank = np.arange(2 * K)[None]  # (1, 2K)
    # history by step and image (B, not A): the beam in slot j after step t ends with word hist_word[t, b, j] and
    # extends the beam in slot hist_parent[t, b, j] at step t, which attended with hist_alpha[t, b, that slot]
    hist_word = np.zeros((L + 1, B, K), dtype=np.int64)
    hist_parent = np.zeros((L + 1, B, K), dtype=np.int64)
    hist_alpha = np.zeros((L + 1, B, K, P), dtype=np.float32)
    # finished hypotheses, best first: score, log p, last step, slot extended at the last step, last word
    pool = [np.full((B, K), neg_inf, dtype=np.float32) for _ in range(2)] + [np.zeros((B, K), np.int64) for _ in range(3)]
    final = [p.copy() for p in pool]  # (B, K) each: the pools of images dropped from the batch
    words = np.zeros((B, 0), dtype=np.int64)  # (A * W, t) each row's words (no_repeat_ngram only)

    def add_to_pool(*candidates):  # (A, J) each, in the order of pool; -inf scores are not candidates
        nonlocal pool
        score, pos = _topk(np.concatenate([pool[0], candidates[0]], 1), K)  # (A, K)
        pool = [score] + [_take(np.concatenate([p, c], 1), pos) for p, c in zip(pool[1:], candidates[1:])]

    def retire(index):  # copy the pools of live images `index` (A',) to `final`
        for f, p in zip(final, pool):
            f[live[index]] = p[index]

    for t in range(L + 1):  # L words, then one last chance for <end>
        lp, state, alpha = decoder.step(tokens, state, memory)  # (A*W, V), state, (A*W, P)
        if not options.allow_unk:
            lp[:, UNK] = neg_inf
        if options.no_repeat_ngram:
            block_repeats(lp, words, options.no_repeat_ngram)
        A, V, W = beam_lp.shape[0], lp.shape[1], 1 if t == 0 else K
        hist_alpha[t, live] = np.broadcast_to(alpha.reshape(A, W, P), (A, K, P))
        total = beam_lp[:, :, None] + lp.reshape(A, W, V)  # (A, K, V); at step 0 all but slot 0 are -inf
        top_lp, top_idx = _topk(total.reshape(A, K * V), min(2 * K, K * V))  # (A, 2K) best first
        top_beam, top_tok = top_idx // V, top_idx % V  # (A, 2K)

        is_end = top_tok == END
        done = n_finished >= K
        accept = is_end & (rank[:, : top_lp.shape[1]] < K) & ~done[:, None] & (top_lp > neg_inf)
        if accept.any():
            score = np.where(accept, length_normalize(top_lp, t + 1, options.length_penalty), neg_inf)
            add_to_pool(score, top_lp, np.full_like(top_beam, t), top_beam, top_tok)
            n_finished = n_finished + accept.sum(1)
            done = n_finished >= K
        n_done = int(done.sum())
        if t == L or n_done == A:
            break

        cont_lp, cont_pos = _topk(np.where(is_end, neg_inf, top_lp), K)  # (A, K) best open beams
        parent, word = _take(top_beam, cont_pos), _take(top_tok, cont_pos)  # (A, K)
        hist_parent[t, live] = parent
        hist_word[t, live] = word
        beam_lp = cont_lp
        rows = np.broadcast_to(np.arange(A)[:, None] * W + (parent if W == K else 0), (A, K))  # (A, K) parents' rows
        if n_done >= COMPACT_SHARE * A:  # drop the rows of done images
            keep, gone = np.flatnonzero(~done), np.flatnonzero(done)  # (A',), (A - A',)
            retire(gone)
            pool = [p[keep] for p in pool]
            live, beam_lp, n_finished, word, rows = live[keep], beam_lp[keep], n_finished[keep], word[keep], rows[keep]
            memory = _rows(image_memory, live)  # (A') rows
        state = _rows(state, rows.reshape(-1))
        tokens = word.reshape(-1)
        if options.no_repeat_ngram:
            words = np.concatenate([words[rows.reshape(-1)], tokens[:, None]], 1)  # (A' * K, t + 1)

    open_ = ~done[:, None] & (beam_lp > neg_inf)  # (A, K) beams that never ended (t == L)
    if open_.any():
        score = np.where(open_, length_normalize(beam_lp, L, options.length_penalty), neg_inf)
        add_to_pool(score, beam_lp, np.full_like(pool[2], L - 1), hist_parent[L - 1, live], hist_word[L - 1, live])
    retire(np.arange(live.size))

    # trace the n-best back: slot is the beam slot at step u of each hypothesis
    N = options.n_best
    score, log_prob, last, slot, last_word = (f[:, :N] for f in final)  # (B, N) each
    T = int(last.max()) + 1
    seq = np.zeros((B, N, T), dtype=np.int64)
    alphas = np.zeros((B, N, T, P), dtype=np.float32)
    image = np.arange(B)[:, None]  # (B, 1)
    for u in range(T - 1, -1, -1):  # positions past a hypothesis' last step get junk, cut below
        before = last > u  # (B, N) word u was chosen by a beam that went on
        seq[:, :, u] = np.where(before, hist_word[u][image, slot], last_word)
        slot = np.where(before, hist_parent[u][image, slot], slot)
        alphas[:, :, u] = hist_alpha[u][image, slot]

    results = []
    for b in range(B):
        hyps = []
        for j in range(N):
            if score[b, j] == neg_inf:
                break
            n = int(last[b, j]) + 1
            hyps.append(Hypothesis(seq[b, j, :n].tolist(), float(log_prob[b, j]), float(score[b, j]), alphas[b, j, :n].copy()))
        results.append(hyps)
    return results


def block_repeats(lp: np.ndarray, words: np.ndarray, n: int) -> None:
    """decoding.block_repeats in numpy: lp[r, w] = -inf (in place) wherever word w after row r's words
    (R, t) would repeat an n-gram they hold."""
    t = words.shape[1]
    if t < n:
        return
    windows = np.lib.stride_tricks.sliding_window_view(words[:, : t - 1], n - 1, axis=1)  # (R, t-n+1, n-1)
    row, at = np.nonzero((windows == words[:, None, t - n + 1:]).all(2))  # each earlier match of the last n-1
    lp[row, words[row, at + n - 1]] = -np.inf  # the word that followed it


def _rows(arrays: Arrays, index: np.ndarray) -> Arrays:
    """Rows `index` (dim 0) of every array of a memory or state tuple."""
    return tuple(x[index] for x in arrays)


def _take(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """x: (B, K), index: (B, J) -> (B, J): per-image selection."""
    return np.take_along_axis(x, index, axis=1)


def _topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values of each row of x (A, n), largest first, and their columns (as torch.topk)."""
    if k < x.shape[1]:
        index = np.argpartition(-x, k - 1, axis=1)[:, :k]  # (A, k) unordered
    else:
        index = np.broadcast_to(np.arange(x.shape[1]), x.shape)
    index = _take(index, np.argsort(-_take(x, index), axis=1, kind="stable"))  # (A, k) largest first
    return _take(x, index), index


# ---------------------------------------------------------------------------------------------- images to captions


@dataclass(frozen=True)
class Preprocessing:
    """encoders.ImageEncoder.preprocess, from the export's JSON: the whole image resized to image_size x image_size
    (bicubic, PIL; no crop, aspect ratio not kept), then (pixel / 255 - mean) / std per RGB channel."""

    image_size: int  # square input side in pixels
    mean: tuple[float, float, float]  # per RGB channel, for pixels scaled to [0, 1]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> (3, S, S) float32."""
        if image.mode != "RGB":
            image = to_rgb(image)
        s = self.image_size
        if image.size != (s, s):
            image = image.resize((s, s), Image.BICUBIC)
        x = np.asarray(image, dtype=np.float32) / 255  # (S, S, 3)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.transpose(2, 0, 1)  # (3, S, S)


class OnnxCaptioner(ImageCaptioning):
    """An ONNX export (encoder, decoder init and step graphs, vocabulary, preprocessing) on onnxruntime."""

    def __init__(self, manifest: dict, encoder, decoder: OnnxDecoder):
        self.manifest = manifest
        self.vocab = Vocabulary.from_dict(manifest["vocab"])
        self.tokenizer = get_tokenizer(manifest.get("language", self.vocab.language))
        pre = manifest["preprocessing"]
        self.preprocessing = Preprocessing(int(pre["image_size"]), tuple(pre["mean"]), tuple(pre["std"]))
        self.grid = tuple(manifest["encoder"]["grid"])  # (h, w) of the annotation grid
        self._encoder = encoder  # onnxruntime.InferenceSession of encoder.onnx
        self.decoder = decoder

    @classmethod
    def load(cls, export_dir: str | os.PathLike, *, threads: int | None = None,
             providers: Sequence[str] = ("CPUExecutionProvider",)) -> "OnnxCaptioner":
        """Load the export in `export_dir`. threads: onnxruntime's intra-op threads (None: its default, every
        core). providers: onnxruntime execution providers, in order of preference. OnnxModelError (one line
        naming the file) for a folder that is no export; ImportError when onnxruntime is not installed."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the ONNX runtime needs the package onnxruntime: pip install onnxruntime "
                              "(or pip install 'imcap[onnx]')") from None
        folder = Path(export_dir)
        manifest = read_manifest(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or 0)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only

        def session(graph: str):
            path = folder / manifest["graphs"][graph]
            if not path.is_file():
                raise OnnxModelError(f"{path}: missing")
            try:
                return ort.InferenceSession(str(path), options, providers=list(providers))
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error types for a bad graph
                problem = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                raise OnnxModelError(f"{path}: not a usable ONNX graph ({problem})") from None

        decoder = OnnxDecoder(session("init"), session("step"), manifest["memory"], manifest["state"])
        return cls(manifest, session("encoder"), decoder)

    def caption_features(self, features: np.ndarray, options: DecodingOptions = DecodingOptions(),
                         names: Sequence[str] | None = None) -> list[Caption]:
        """Caption annotation grids (B, P, D) (from encode, or a feature store), searched as float32."""
        names = names or [f"<image {i}>" for i in range(features.shape[0])]
        hyps = decode(self.decoder, np.asarray(features, dtype=np.float32), options)
        return [self._result(name, h) for name, h in zip(names, hyps)]

    def encode(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> annotations (B, P, D) float32, with the export's preprocessing and encoder graph."""
        pixels = np.stack([self.preprocessing(to_rgb(im)) for im in images])  # (B, 3, S, S)
        return self._encoder.run(["features"], {"images": pixels})[0]

    def _result(self, name: str, hyps: list[Hypothesis]) -> Caption:
        out = []
        for h in hyps:
            words = self.vocab.decode(h.tokens)
            out.append(Caption(image=name, caption=self.tokenizer.detokenize(words), tokens=words, score=h.score,
                               log_prob=h.log_prob, finished=h.finished,
                               alphas=h.alphas.reshape(len(h.tokens), *self.grid)))  # (T, h, w)
        best = out[0]
        best.alternatives = out[1:]
        return best


def read_manifest(folder: Path) -> dict:
    """The checked imcap-onnx.json of export folder `folder`; OnnxModelError naming the file otherwise."""
    file = folder / MANIFEST
    if not folder.is_dir():
        raise OnnxModelError(f"{folder}: no such export folder (write one: imcap export RUN_DIR --format onnx "
                             f"--out {folder})")
    if not file.is_file():
        raise OnnxModelError(f"{folder}: not an ONNX export (no {MANIFEST}; write one: imcap export RUN_DIR "
                             f"--format onnx --out DIR)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        raise OnnxModelError(f"{file}: malformed JSON ({str(e).split(';')[0][:200]})") from None
    except OSError as e:
        raise OnnxModelError(f"{file}: cannot read ({e.strerror or e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OnnxModelError(f"{file}: not an imcap ONNX export")
    version = manifest.get("version")
    if not is_int(version) or version < 1:
        raise OnnxModelError(f"{file}: 'version' must be a positive integer, got {str(version)[:40]!r}")
    if version > VERSION:
        raise OnnxModelError(f"{file}: written by a newer imcap (export format version {version})")
    missing = [k for k in ("graphs", "memory", "state", "vocab", "preprocessing", "encoder") if k not in manifest]
    if missing:
        raise OnnxModelError(f"{file}: missing keys {', '.join(missing)}")
    try:
        Vocabulary.from_dict(manifest["vocab"])
        if {"encoder", "init", "step"} - set(manifest["graphs"]) or manifest["memory"][0] != "features":
            raise ValueError("'graphs' must name encoder, init and step; 'memory' must start with features")
        pre = manifest["preprocessing"]
        Preprocessing(int(pre["image_size"]), tuple(pre["mean"]), tuple(pre["std"]))
        tuple(manifest["encoder"]["grid"])
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise OnnxModelError(f"{file}: inconsistent export ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return manifest

"""imcap's benchmarks on CPU: one command, a table on stdout, the figures as JSON.

    .venv/bin/python benchmarks/run.py [--quick] [--threads N] [--out benchmarks/results.json] [--sections a,b]

Each section runs in its own child process (`run.py --section NAME`), so its peak resident memory (max RSS,
read with os.wait4) is its own. Sections (benchmarks/README.md says what each row means):
    startup                  the interpreter with torch and imcap imported: the RSS floor of every section
    train-{paper,default}-*  decoder training steps (forward, loss, backward, clipping, Adam) on random
                             features and Flickr8k-length captions: imcap's fast path vs the tutorial-style
                             baseline of benchmarks/baseline.py, with useful GFLOP/s and the share of the
                             matmul peak measured in the same process
    train-paper-interleaved  the paper setup's fast and baseline steps in turn in one process: their ratio
                             under the same conditions, the peak measured before each pair
    recurrence-gemms         the paper setup's per-step recurrence matmuls (32 rows) timed alone: the share of
                             the matmul peak that training's recurrence could reach at best
    beam                     decode() over random features, k = 1, 3, 5: batched vs the tutorial-style beam
                             search of benchmarks/baseline.py one image at a time (on a subset: it is slow),
                             and vs decode() one image at a time; the count of images whose captions differ
                             (must be 0)
    extract-{224,448}        extract_features with pretrained EfficientNet-Lite0 on synthetic scenes
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import TutorialDecoder, tutorial_beam_search  # noqa: E402
from machine import cpu_model, loadavg  # noqa: E402
from imcap.decoding import DecodingOptions, Hypothesis, decode  # noqa: E402
from imcap.model import ModelConfig, ShowAttendTell, caption_loss  # noqa: E402
from imcap.text import END, START  # noqa: E402

# Flickr8k caption lengths in words: counts of 1..30 words over the 40,460 captions of Flickr8k.token.txt
# (words = runs of [A-Za-z0-9'-], lower-cased; the 12 captions over 30 words left out). Mean 10.8, median 10.
FLICKR8K_WORDS = [
    2, 25, 178, 472, 1176, 2647, 3415, 3907, 4431, 4560, 4195, 3721, 3083, 2506, 1782,
    1372, 906, 703, 483, 277, 188, 140, 97, 65, 46, 26, 16, 12, 14, 5,
]
FIRST_WORD = 4  # ids below are <pad> <start> <end> <unk>


# ------------------------------------------------------------------------------------------ shared helpers


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a float32 (size x size) @ (size x size) torch.mm at the current thread count, best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def train_flops(cfg: ModelConfig, positions: int, n_images: int, lengths: torch.Tensor) -> float:
    """Useful matmul FLOPs of one training step, forward + backward, counted analytically (multiply-add = 2).

    I images, S = sum_b (lengths_b - 1) predicted words (no padding), P locations, D feature channels,
    m embedding, n hidden, A attention, V vocabulary; G = 4n (LSTM) or 3n (GRU); k = 2 (LSTM: f_init_h and
    f_init_c) or 1 (GRU).
        forward, per image:  W_a a                                  2 P D A
                             f_init on mean_i a_i                    2 D n k
        forward, per word:   W_h h                                  2 n A
                             w^T tanh(.) (fastpath: via sigmoid)    2 P A
                             sum_i alpha_i a_i                       2 P D
                             f_beta h                                2 n          (with the gate)
                             cell gates W_e E y + W_z z + W_h h      2 G (m + D + n)
                             deep output L_h h + L_z z               2 m (n + D)  (with the deep output)
                             L_o                                     2 m V        (2 n V without the deep output)
        backward: twice the forward (the input's gradient and the weight's), except where the input is the
        features a, which need no gradient: W_a a, f_init and sum_i alpha_i a_i cost once their forward.
    total = 2 I (2PDA + 2Dnk) + S (3 (2nA + 2PA + 2n + 2G(m+D+n) + 2m(n+D) + 2mV) + 2 (2PD))
    """
    c = cfg
    P, D, m, n, A, V = positions, c.feature_dim, c.embed_dim, c.hidden_dim, c.attention_dim, c.vocab_size
    G, k = (4 * n, 2) if c.rnn == "lstm" else (3 * n, 1)
    S = int((lengths - 1).sum())
    per_image = 2 * P * D * A + 2 * D * n * k
    per_word = 2 * n * A + 2 * P * A + 2 * G * (m + D + n)
    per_word += 2 * n if c.gate else 0
    per_word += 2 * m * (n + D) + 2 * m * V if c.deep_output else 2 * n * V
    return 2 * n_images * per_image + S * (3 * per_word + 2 * 2 * P * D)


@dataclass
class TrainSetup:
    config: ModelConfig
    positions: int  # P
    batch: int  # captions per batch


TRAIN_SETUPS = {
    # Xu et al. 2015: VGG conv5 14x14x512 in the paper; the usual ResNet-101 grid 14x14x2048 here, 512/512/512, 10k words
    "paper": TrainSetup(ModelConfig(vocab_size=10_000, feature_dim=2048, embed_dim=512, hidden_dim=512, attention_dim=512), 196, 32),
    # imcap's defaults: EfficientNet-Lite0 7x7x1280, 256/512/512, Flickr8k vocabulary (min count 5)
    "default": TrainSetup(ModelConfig(vocab_size=2540), 49, 128),
}


def caption_batch(vocab_size: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions with Flickr8k's length distribution: captions (B, L) <start> w.. <end> <pad>.., lengths (B,)."""
    words = torch.multinomial(torch.tensor(FLICKR8K_WORDS, dtype=torch.float), batch, replacement=True, generator=generator) + 1
    lengths = words + 2  # (B,) with <start> and <end>
    captions = torch.randint(FIRST_WORD, vocab_size, (batch, int(lengths.max())), generator=generator)  # (B, L)
    captions[:, 0] = START
    captions[torch.arange(batch), lengths - 1] = END
    captions[torch.arange(captions.size(1)).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # <pad>
    return captions, lengths


def train_batches(setup: TrainSetup, per_image: int, n: int, seed: int = 0) -> list[tuple]:
    """n batches (features (I, P, D), captions (B, L), lengths (B,), image_index (B,)); the captions depend only on
    the seed, so every variant of a setup trains on the same captions."""
    g_caps, g_feat = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(n):
        captions, lengths = caption_batch(setup.config.vocab_size, setup.batch, g_caps)
        image_index = torch.arange(setup.batch) // per_image  # (B,): per_image consecutive captions share an image
        features = torch.rand(int(image_index[-1]) + 1, setup.positions, setup.config.feature_dim, generator=g_feat)
        out.append((features, captions, lengths, image_index))
    return out


def training_step(module, optimizer, features, captions, lengths, image_index) -> None:
    """What imcap.train.Trainer._step does: forward, loss, backward, clip at 5, Adam (fused for imcap, the
    default foreach implementation for the baseline)."""
    logits, alphas = module(features, captions, lengths, image_index)  # (B, T, V), (B, T, P)
    loss, _ = caption_loss(logits, captions[:, 1:], alphas, lengths)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), 5.0)
    optimizer.step()


def train_variant(model: ShowAttendTell, batches: list[tuple], variant: str) -> tuple:
    """(module, optimizer, batches) of one variant: "fast" is the model itself with fused Adam (as imcap.train
    does); "baseline" is a TutorialDecoder on a copy of its parameters with the default Adam, on batches with a
    copy of the image per caption, made before timing."""
    if variant == "baseline":
        module = TutorialDecoder(model).train()
        batches = [(f[i], c, l, None) for f, c, l, i in batches]
    else:
        module = model
    return module, torch.optim.Adam(module.parameters(), lr=4e-4, fused=variant == "fast"), batches


# ------------------------------------------------------------------------------------------------ sections


def section_train_interleaved(args, setup_name: str = "paper") -> dict:
    """The fast path and the tutorial-style baseline in one process, one training step each in turn, with the
    matmul peak measured before each pair: their ratio under the same conditions. This machine's speed swings
    between sections (the peak measured in one run's sections ranged 76-143 GFLOP/s), which moves the ratio of
    the separate train-* sections; here both variants see the same swings. Both start from the same weights
    and train the same captions, each with its own optimizer (fused Adam for imcap, as in train-*)."""
    setup = TRAIN_SETUPS[setup_name]
    torch.manual_seed(0)
    model = ShowAttendTell(setup.config).train()
    batches = train_batches(setup, 1, n=2 if args.quick else 3)
    useful = [train_flops(setup.config, setup.positions, f.size(0), lengths) for f, _, lengths, _ in batches]
    variants = {name: train_variant(model, batches, name) for name in ("fast", "baseline")}  # same start weights
    for module, optimizer, data in variants.values():  # warm-up, not timed
        training_step(module, optimizer, *data[0])
    rounds = 1 if args.quick else 6
    seconds = {name: [] for name in variants}
    peaks, flops = [], 0.0
    for r in range(rounds):
        j = (r + 1) % len(batches)
        peaks.append(matmul_peak(args.threads, repeats=3))
        for name, (module, optimizer, data) in variants.items():
            t = time.perf_counter()
            training_step(module, optimizer, *data[j])
            seconds[name].append(time.perf_counter() - t)
        flops += useful[j]
    captions = rounds * setup.batch
    peak = sum(peaks) / len(peaks)
    out = {"setup": setup_name, "rounds": rounds, "batch": setup.batch, "peak_gflops_each_round": [round(x, 1) for x in peaks]}
    for name, times in seconds.items():
        gflops = flops / sum(times) / 1e9
        out[name] = {"captions_per_s": round(captions / sum(times), 2), "step_s": [round(x, 3) for x in times],
                     "gflops": round(gflops, 2), "share_of_mean_peak": round(gflops / peak, 4),
                     "share_of_max_peak": round(gflops / max(peaks), 4)}  # the strictest reading
    round_ratios = [b / f for f, b in zip(seconds["fast"], seconds["baseline"])]
    out["fast_over_baseline"] = round(sum(seconds["baseline"]) / sum(seconds["fast"]), 2)
    out["fast_over_baseline_each_round"] = [round(x, 2) for x in round_ratios]
    return out


def section_recurrence_gemms(args) -> dict:
    """What the training recurrence's matmuls can reach here: the per-step matmuls of the paper setup (32 rows:
    W_h h for attention, the cell's W_z z and W_h h), each forward, input gradient and accumulated weight
    gradient, timed alone, against the 2048^2 peak of the same process. The recurrence cannot run faster than
    these shapes allow; `dW batched` is the weight gradient done once over all steps instead (what deferring
    it would give)."""
    setup = TRAIN_SETUPS["paper"]
    c, rows = setup.config, setup.batch
    steps = 22  # about a Flickr8k caption's predictions
    G = (4 if c.rnn == "lstm" else 3) * c.hidden_dim
    shapes = [(c.hidden_dim, c.attention_dim), (c.feature_dim, G), (c.hidden_dim, G)]  # (in, out) per step
    peak = matmul_peak(args.threads)
    repeats = 3 if args.quick else 20
    per_step = {"forward": 0.0, "input_grad": 0.0, "weight_grad": 0.0, "weight_grad_batched": 0.0}
    flop = 0.0
    for k, n in shapes:
        x, w, g = torch.randn(rows, k), torch.randn(n, k), torch.randn(rows, n)
        acc, xs, gs = torch.zeros(n, k), torch.randn(rows * steps, k), torch.randn(rows * steps, n)
        for name, f, times in (("forward", lambda: x @ w.T, repeats), ("input_grad", lambda: g @ w, repeats),
                               ("weight_grad", lambda: acc.addmm_(g.T, x), repeats),
                               ("weight_grad_batched", lambda: gs.T @ xs, max(1, repeats // steps * 2))):
            f()
            t = time.perf_counter()
            for _ in range(times):
                f()
            per_step[name] += (time.perf_counter() - t) / times / (steps if name == "weight_grad_batched" else 1)
        flop += 2 * rows * k * n  # each of the three
    step_s = per_step["forward"] + per_step["input_grad"] + per_step["weight_grad"]
    batched_s = per_step["forward"] + per_step["input_grad"] + per_step["weight_grad_batched"]
    return {"rows": rows, "shapes": shapes, "peak_gflops": round(peak, 2),
            "ms_per_step": {k: round(v * 1e3, 3) for k, v in per_step.items()},
            "gflops": round(3 * flop / step_s / 1e9, 2), "share_of_peak": round(3 * flop / step_s / 1e9 / peak, 4),
            "gflops_dw_batched": round(3 * flop / batched_s / 1e9, 2),
            "share_of_peak_dw_batched": round(3 * flop / batched_s / 1e9 / peak, 4)}


def section_startup(args) -> dict:
    import imcap.features  # noqa: F401  (what the other sections import)

    return {"torch": torch.__version__}


def section_train(args, setup_name: str, variant: str, per_image: int) -> dict:
    """Training captions/s of one variant ("fast" or "baseline") at one setup, captions grouped per_image per image."""
    setup = TRAIN_SETUPS[setup_name]
    peak = matmul_peak(args.threads)
    torch.manual_seed(0)
    model = ShowAttendTell(setup.config).train()
    batches = train_batches(setup, per_image, n=2 if args.quick else 3)
    # useful work is the same for both variants: each image projected once, no padding
    useful = [train_flops(setup.config, setup.positions, f.size(0), lengths) for f, _, lengths, _ in batches]
    n_images = batches[0][0].size(0)
    module, optimizer, batches = train_variant(model, batches, variant)
    del model  # the baseline holds its own copy of the parameters

    # the warm-up step, counting the matmul FLOPs actually executed
    executed = matmul_flops(lambda: training_step(module, optimizer, *batches[0]))

    min_steps, min_seconds, max_steps = (1, 0.0, 1) if args.quick else (3, 8.0, 30)
    times, flops, captions = [], 0.0, 0
    while len(times) < min_steps or (sum(times) < min_seconds and len(times) < max_steps):
        j = (len(times) + 1) % len(batches)
        t = time.perf_counter()
        training_step(module, optimizer, *batches[j])
        times.append(time.perf_counter() - t)
        flops += useful[j]
        captions += batches[j][1].size(0)
    seconds = sum(times)
    gflops = flops / seconds / 1e9
    return {
        "setup": setup_name, "variant": variant, "captions_per_image": per_image,
        "batch": setup.batch, "images_per_batch": n_images, "P": setup.positions, **setup.config.to_dict(),
        "steps": len(times), "seconds": round(seconds, 3), "step_s": [round(t, 3) for t in times],
        "captions_per_s": round(captions / seconds, 2),
        "words_per_batch": [int((b[2] - 1).sum()) for b in batches],
        "useful_gflop_per_step": round(useful[0] / 1e9, 3),
        "executed_gflop_first_step": round(executed / 1e9, 3),  # mm/bmm/addmm only (torch FlopCounterMode)
        "executed_over_useful": round(executed / useful[0], 3),
        "gflops": round(gflops, 2), "peak_gflops": round(peak, 2), "share_of_peak": round(gflops / peak, 4),
    }


def decoding_model(seed: int = 0, end_bias: float = 2.5) -> ShowAttendTell:
    """imcap's default model with random weights, made to write captions of varied lengths.

    A freshly initialised model has nearly flat logits (its outputs differ by ~0.1), so greedy and beam search
    either end every caption at once or never. As in a trained model, the fed-back word is made to drive the
    state (embedding x10) and the logits to be peaky (L_o weights x5); <end> is raised so captions end after
    a few to 30 words.
    """
    torch.manual_seed(seed)
    model = ShowAttendTell(ModelConfig(vocab_size=2540)).eval()
    with torch.no_grad():
        model.embedding.weight *= 10
        model.out.weight *= 5
        model.out.bias[END] += end_bias
    return model


def decoding_features(n: int, seed: int = 1, positions: int = 49, dim: int = 1280) -> torch.Tensor:
    """(n, P, D) random nonnegative features (like a CNN's after ReLU6) with a per-image channel pattern, so that
    images differ from each other as much as from location to location."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, dim, generator=g) + torch.randn(n, positions, dim, generator=g)).clamp(min=0)


def decode_best(model, features: torch.Tensor, options: DecodingOptions, chunk: int) -> list[Hypothesis]:
    """Best hypothesis for each image, decoding `chunk` images per call of decode()."""
    return [hyps[0] for part in features.split(chunk) for hyps in decode(model, part, options)]


def decode_tokens(model, features: torch.Tensor, options: DecodingOptions, chunk: int) -> list[list[int]]:
    """Best caption's tokens for each image, decoding `chunk` images per call of decode()."""
    return [h.tokens for h in decode_best(model, features, options, chunk)]


def matmul_flops(f) -> int:
    """The matmul FLOPs (mm, bmm, addmm: torch's FlopCounterMode) that f() executes."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        f()
    return counter.get_total_flops()


def timed(f, *args):
    """f(*args) and the seconds it took."""
    t = time.perf_counter()
    result = f(*args)
    return result, time.perf_counter() - t


def timed_one_by_one(f, items) -> tuple[list, list[float]]:
    """[f(x) for x in items] and the seconds each call took."""
    results, seconds = [], []
    for x in items:
        result, s = timed(f, x)
        results.append(result)
        seconds.append(s)
    return results, seconds


def section_beam(args) -> dict:
    """Images/s of beam search, k = 1, 3, 5, three ways: imcap's decode() on `chunk` images per call (batched),
    the tutorial-style beam search of baseline.py one image at a time, and decode() one image at a time.
    The three take turns chunk by chunk (batched on a chunk, the tutorial on the chunk's first images, imcap
    one at a time on the chunk), so that they see the same swings of this machine's speed. The tutorial
    baseline is slow (1,000 images would take minutes per k): it runs on the first n_tutorial / chunks images
    of each chunk (a sample: the features are seeded and drawn independently), and its captions are compared
    with the batched ones on those."""
    n, chunk, n_tutorial = (100, 50, 20) if args.quick else (1000, 250, 200)
    model, features = decoding_model(), decoding_features(n)
    tutorial = TutorialDecoder(model).eval()
    L = DecodingOptions().max_length
    peak = matmul_peak(args.threads)
    parts = features.split(chunk)
    per_part = n_tutorial // len(parts)
    tutorial_rows = [c * chunk + i for c in range(len(parts)) for i in range(per_part)]  # its images
    out = {"images": n, "images_one_by_one": n, "images_per_call": chunk, "images_tutorial": len(tutorial_rows),
           "tutorial_subset": f"the first {per_part} of each {chunk}", "max_length": L,
           "peak_gflops": round(peak, 2)}
    for k in (1, 3, 5):
        options = DecodingOptions(beam_size=k, max_length=L)
        decode(model, features[:8], options)  # warm-ups
        tutorial_beam_search(tutorial, features[0], k, L)
        batched, single, naive = [], [], []
        t_batched, t_naive, t_each, each_ratio = 0.0, 0.0, [], []
        for part in parts:  # the three in turn, chunk by chunk
            b, t_b = timed(decode_best, model, part, options, chunk)
            nv, t_n = timed(lambda: [tutorial_beam_search(tutorial, f, k, L) for f in part[:per_part]])
            s, t_s = timed_one_by_one(lambda f: decode(model, f, options)[0][0].tokens, part.split(1))
            batched, naive, single, t_each = batched + b, naive + nv, single + s, t_each + t_s
            t_batched, t_naive = t_batched + t_b, t_naive + t_n
            each_ratio.append((part.size(0) / t_b) / (per_part / t_n))
        tokens = [h.tokens for h in batched]
        words = torch.tensor([len(tok) - (tok[-1] == END) for tok in tokens], dtype=torch.float)
        t_single = sum(t_each)
        speed, speed_single, speed_naive = n / t_batched, n / t_single, len(tutorial_rows) / t_naive
        # matmul FLOPs per image (untimed, counted on one call's worth of images): what the batched search
        # executes, and what a search 20x the tutorial baseline's speed would have to sustain
        flop_image = matmul_flops(lambda: decode_best(model, features[:chunk], options, chunk)) / min(chunk, n)
        out[f"k{k}"] = {
            "batched_images_per_s": round(speed, 2), "batched_s": round(t_batched, 2),
            "tutorial_images_per_s": round(speed_naive, 2), "tutorial_s": round(t_naive, 2),
            "single_images_per_s": round(speed_single, 2), "single_s": round(t_single, 2),
            # imcap one at a time on the tutorial's images only: how representative the subset's work is
            "single_images_per_s_tutorial_images": round(len(tutorial_rows) / sum(t_each[i] for i in tutorial_rows), 2),
            "batched_over_tutorial": round(speed / speed_naive, 2),  # the target: >= 20 at k = 3
            "batched_over_tutorial_each_chunk": [round(x, 2) for x in each_ratio],
            "batched_over_single": round(speed / speed_single, 2),
            "matmul_mflop_per_image": round(flop_image / 1e6, 1),
            "batched_gflops": round(speed * flop_image / 1e9, 2),
            "batched_share_of_peak": round(speed * flop_image / 1e9 / peak, 4),
            "gflops_needed_for_20x": round(20 * speed_naive * flop_image / 1e9, 2),
            "share_of_peak_needed_for_20x": round(20 * speed_naive * flop_image / 1e9 / peak, 4),
            "mismatches_tutorial": sum(tokens[i] != b for i, (b, _, _) in zip(tutorial_rows, naive)),
            "max_log_prob_diff_tutorial": max(abs(batched[i].log_prob - lp) for i, (_, lp, _) in zip(tutorial_rows, naive)),
            "mismatches_single": sum(a != b for a, b in zip(tokens, single)),
            "words_mean": round(float(words.mean()), 2),
            "words_mean_tutorial_images": round(float(words[tutorial_rows].mean()), 2),
            "words_quartiles": [float(q) for q in words.quantile(torch.tensor([0.25, 0.5, 0.75]))],
            "unfinished": sum(tok[-1] != END for tok in tokens),  # reached max_length without <end>
        }
        print(f"beam k={k}: {out[f'k{k}']}", file=sys.stderr, flush=True)
    return out


def section_extract(args, image_size: int, n_images: int) -> dict:
    from imcap.datasets import prepare
    from imcap.encoders import build_encoder
    from imcap.features import extract_features
    from imcap.synth import make_scenes

    n = max(4, n_images // 6) if args.quick else n_images
    with tempfile.TemporaryDirectory(prefix="imcap-bench-") as tmp:
        scenes = make_scenes(Path(tmp) / "scenes", n_images=n, seed=0, image_size=224, progress=False)
        prepare(scenes, "karpathy", Path(tmp) / "data", min_count=1, progress=False)
        encoder = build_encoder("efficientnet-lite0", image_size, pretrained=True)
        torch.set_num_threads(args.threads)
        with torch.inference_mode():  # warm-up: the first CNN call allocates
            encoder(torch.zeros(4, 3, image_size, image_size))
        summary = extract_features(Path(tmp) / "data", encoder=encoder, image_size=image_size, threads=args.threads,
                                   progress=False)
        store = Path(summary["store"])
        on_disk = (store / "features.f16").stat().st_size
    return {
        "encoder": summary["encoder"], "image_size": image_size, "images": summary["encoded"], "scene_size": 224,
        "seconds": summary["seconds"], "images_per_s": summary["images_per_s"],
        "decode_wait_s": summary["decode_wait_s"], "threads": summary["threads"],
        "bytes_per_image": summary["bytes_per_image"], "store_file_bytes_per_image": on_disk // summary["images"],
    }


SECTIONS = {
    "startup": section_startup,
    "train-paper-fast": partial(section_train, setup_name="paper", variant="fast", per_image=1),
    "train-paper-grouped": partial(section_train, setup_name="paper", variant="fast", per_image=5),
    "train-paper-baseline": partial(section_train, setup_name="paper", variant="baseline", per_image=1),
    "train-paper-interleaved": section_train_interleaved,
    "train-default-fast": partial(section_train, setup_name="default", variant="fast", per_image=5),
    "train-default-baseline": partial(section_train, setup_name="default", variant="baseline", per_image=5),
    "recurrence-gemms": section_recurrence_gemms,
    "beam": section_beam,
    "extract-224": partial(section_extract, image_size=224, n_images=48),
    "extract-448": partial(section_extract, image_size=448, n_images=24),
}


# ---------------------------------------------------------------------------------------- the parent process


def run_child(name: str, args, result_path: Path) -> dict:
    """Run one section in a child process; its result JSON plus max RSS (MiB) and wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--threads", str(args.threads),
           "--result", str(result_path)] + (["--quick"] if args.quick else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not result_path.exists():
        return {"error": f"exit code {proc.returncode}", "wall_s": round(wall, 1)}
    result = json.loads(result_path.read_text())
    result["max_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    result["wall_s"] = round(wall, 1)
    return result


def source_version() -> dict:
    """The commit checked out (read from .git, no git command) and a digest of the sources measured, since the
    working tree may hold uncommitted changes."""
    out = {}
    try:
        head = (REPO / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = REPO / ".git" / ref
            if path.exists():
                head = path.read_text().strip()
            else:
                packed = (REPO / ".git" / "packed-refs").read_text().splitlines()
                head = next((line.split()[0] for line in packed if line.endswith(" " + ref)), "unknown")
        out["commit"] = head
    except OSError:
        out["commit"] = "unknown"
    for name in ("model.py", "decoding.py", "features.py", "train.py"):
        data = (REPO / "imcap" / name).read_bytes()
        out[f"sha1 imcap/{name}"] = hashlib.sha1(data).hexdigest()[:12]
    return out


def ratios(s: dict) -> dict:
    def ratio(a, b, key):
        if key in s.get(a, {}) and key in s.get(b, {}):
            return round(s[a][key] / s[b][key], 2)
        return None

    out = {
        "train_paper_fast_over_baseline": ratio("train-paper-fast", "train-paper-baseline", "captions_per_s"),
        "train_paper_grouped_over_baseline": ratio("train-paper-grouped", "train-paper-baseline", "captions_per_s"),
        "train_paper_grouped_over_fast": ratio("train-paper-grouped", "train-paper-fast", "captions_per_s"),
        "train_paper_interleaved_fast_over_baseline": s.get("train-paper-interleaved", {}).get("fast_over_baseline"),
        "train_default_fast_over_baseline": ratio("train-default-fast", "train-default-baseline", "captions_per_s"),
        "extract_224_over_448": ratio("extract-224", "extract-448", "images_per_s"),
    }
    for k in (1, 3, 5):
        r = s.get("beam", {}).get(f"k{k}", {})
        if "batched_over_tutorial" in r:
            out[f"beam_k{k}_batched_over_tutorial"] = r["batched_over_tutorial"]
            out[f"beam_k{k}_batched_over_single"] = r["batched_over_single"]
    return out


def table(s: dict) -> list[str]:
    """The printed table, one string per line."""
    rows = [("benchmark", "setting", "speed", "GFLOP/s", "% peak", "ratio", "max RSS", "notes")]
    labels = {
        "train-paper-fast": ("train paper", "fast, 32 captions of 32 images"),
        "train-paper-grouped": ("train paper", "fast, 32 captions, 5 per image (7 images)"),
        "train-paper-baseline": ("train paper", "baseline (tutorial), 32 captions of 32 images"),
        "train-default-fast": ("train default", "fast, 128 captions, 5 per image (26 images)"),
        "train-default-baseline": ("train default", "baseline (tutorial), 128 captions, image copied per caption"),
    }
    base = {"paper": s.get("train-paper-baseline", {}), "default": s.get("train-default-baseline", {})}
    mib = lambda r: f"{r['max_rss_mib']:.0f} MiB" if "max_rss_mib" in r else ""  # noqa: E731
    if "startup" in s:
        rows.append(("startup", "python + torch + imcap imported", "", "", "", "", mib(s["startup"]), ""))
    for name, (bench, setting) in labels.items():
        r = s.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append((bench, setting, "FAILED", "", "", "", "", r["error"]))
            continue
        b = base[r["setup"]]
        vs = f"{r['captions_per_s'] / b['captions_per_s']:.2f}x" if r["variant"] == "fast" and "captions_per_s" in b else ""
        rows.append((bench, setting, f"{r['captions_per_s']:.1f} captions/s", f"{r['gflops']:.1f}",
                     f"{100 * r['share_of_peak']:.1f}", vs, mib(r),
                     f"peak {r['peak_gflops']:.0f} GFLOP/s; executed/useful FLOPs {r['executed_over_useful']:.2f}"
                     + (f"; 8x the baseline needs {800 * b['share_of_peak']:.0f}% of peak"
                        if r["variant"] == "fast" and "share_of_peak" in b else "")))
    r = s.get("train-paper-interleaved")
    if r is not None and "error" in r:
        rows.append(("train paper", "interleaved", "FAILED", "", "", "", "", r["error"]))
    elif r is not None:
        f, b, each = r["fast"], r["baseline"], r["fast_over_baseline_each_round"]
        rows.append(("train paper", f"interleaved: fast and baseline in turn, {r['rounds']} rounds",
                     f"{f['captions_per_s']:.1f} / {b['captions_per_s']:.1f} captions/s", f"{f['gflops']:.1f}",
                     f"{100 * f['share_of_mean_peak']:.1f}", f"{r['fast_over_baseline']:.2f}x", mib(r),
                     f"rounds {min(each):.2f}-{max(each):.2f}x; peak {min(r['peak_gflops_each_round']):.0f}-"
                     f"{max(r['peak_gflops_each_round']):.0f} GFLOP/s, % of the mean ({100 * f['share_of_max_peak']:.1f}% "
                     f"of the highest); baseline {100 * b['share_of_mean_peak']:.1f}%, so 8x needs "
                     f"{800 * b['share_of_mean_peak']:.0f}%"))
    r = s.get("recurrence-gemms")
    if r is not None and "error" not in r:
        ms = r["ms_per_step"]
        rows.append(("ceiling", f"paper recurrence matmuls alone, {r['rows']} rows", "", f"{r['gflops']:.1f}",
                     f"{100 * r['share_of_peak']:.1f}", "", mib(r),
                     f"ms per step: forward {ms['forward']}, input grad {ms['input_grad']}, weight grad "
                     f"{ms['weight_grad']} ({ms['weight_grad_batched']} batched over steps: "
                     f"{100 * r['share_of_peak_dw_batched']:.1f}% of peak)"))
    beam = s.get("beam", {})
    if "error" in beam:
        rows.append(("beam", "", "FAILED", "", "", "", "", beam["error"]))
    for k in (1, 3, 5):
        r = beam.get(f"k{k}")
        if r is None:
            continue
        flops = ("", "") if "batched_gflops" not in r else (f"{r['batched_gflops']:.1f}", f"{100 * r['batched_share_of_peak']:.1f}")
        need = "" if "batched_gflops" not in r else (f"; 20x the baseline needs {r['gflops_needed_for_20x']:.0f} GFLOP/s "
                                                     f"= {100 * r['share_of_peak_needed_for_20x']:.0f}% of peak")
        rows.append((f"beam k={k}", f"batched, {beam['images_per_call']} images per call ({beam['images']} images)",
                     f"{r['batched_images_per_s']:.1f} images/s", *flops, f"{r['batched_over_tutorial']:.2f}x",
                     mib(beam),
                     (f"chunks {min(r['batched_over_tutorial_each_chunk']):.1f}-"
                      f"{max(r['batched_over_tutorial_each_chunk']):.1f}x; " if "batched_over_tutorial_each_chunk" in r else "")
                     + f"{r['batched_over_single']:.2f}x imcap one at a time; words mean {r['words_mean']:.1f}, "
                     f"quartiles {r['words_quartiles']}, {r['unfinished']} unfinished{need}"))
        subset = f"{beam['images_tutorial']} images: {beam.get('tutorial_subset', 'the first ones')}"
        rows.append((f"beam k={k}", f"baseline (tutorial), one image at a time ({subset})",
                     f"{r['tutorial_images_per_s']:.1f} images/s", "", "", "", "",
                     f"captions differing from batched: {r['mismatches_tutorial']}; max log p difference "
                     f"{r['max_log_prob_diff_tutorial']:.1e}; on these images: words mean "
                     f"{r['words_mean_tutorial_images']:.1f}, imcap one at a time "
                     f"{r['single_images_per_s_tutorial_images']:.1f} images/s"))
        rows.append((f"beam k={k}", f"imcap, one image at a time ({beam['images_one_by_one']} images)",
                     f"{r['single_images_per_s']:.1f} images/s", "", "", "", "",
                     f"captions differing from batched: {r['mismatches_single']}"))
    for size in (224, 448):
        r = s.get(f"extract-{size}")
        if r is None:
            continue
        if "error" in r:
            rows.append((f"extract {size}", "", "FAILED", "", "", "", "", r["error"]))
            continue
        rows.append((f"extract {size}", f"Lite0 pretrained, {r['images']} scenes", f"{r['images_per_s']:.1f} images/s",
                     "", "", "", mib(r), f"{r['bytes_per_image']:,} B/image in the store; decode wait {r['decode_wait_s']} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, images and captions: a smoke run, not figures")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every section")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results.json"), help="where to write the JSON")
    p.add_argument("--sections", help=f"comma-separated subset of: {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--section", choices=list(SECTIONS), help=argparse.SUPPRESS)  # child: run one section
    p.add_argument("--result", help=argparse.SUPPRESS)  # child: where to write its JSON
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.section:
        result = SECTIONS[args.section](args)
        result["threads"] = torch.get_num_threads()
        Path(args.result).write_text(json.dumps(result))
        return 0

    names = args.sections.split(",") if args.sections else list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}: choose from {', '.join(SECTIONS)}")
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": args.threads, "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
        "cpu": cpu_model(), "cpus": os.cpu_count(), "source": source_version(), "loadavg_before": loadavg(),
    }
    sections = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imcap-bench-") as tmp:
        for name in names:
            print(f"[{time.perf_counter() - t0:6.1f} s] {name} ...", file=sys.stderr, flush=True)
            sections[name] = run_child(name, args, Path(tmp) / f"{name}.json")
    meta["loadavg_after"] = loadavg()
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    lines = table(sections)
    header = (f"imcap benchmarks {meta['date']}: {meta['threads']} threads, torch {meta['torch']}, {meta['cpu']} "
              f"({meta['cpus']} CPUs), load {meta['loadavg_before']} -> {meta['loadavg_after']}, {meta['seconds']} s")
    print(header)
    print("\n".join(lines))
    result = {"meta": meta, "ratios": ratios(sections), "sections": sections, "table": [header, *lines]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"ratios: {json.dumps(result['ratios'])}")
    print(f"wrote {args.out}")
    return 1 if any("error" in r for r in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

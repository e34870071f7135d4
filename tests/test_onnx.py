"""ONNX export and the torch-free runtime: the graphs compute what the torch model does, the numpy searches find
decoding.py's captions, captioning never loads torch, and the CLI's export and caption verbs."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

for _package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_package, reason=f"{_package} is not installed: pip install 'imcap[onnx]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import imcap  # noqa: E402
from imcap import checkpoint as ckpt  # noqa: E402
from imcap import decoding  # noqa: E402
from imcap import onnx_runtime as rt  # noqa: E402
from imcap.api import Captioner  # noqa: E402
from imcap.cli import main  # noqa: E402
from imcap.encoders import encoder_spec, weights_path  # noqa: E402
from imcap.images import to_rgb  # noqa: E402
from imcap.model import ModelConfig, ShowAttendTell  # noqa: E402
from imcap.text import END, PAD, START, UNK, Vocabulary  # noqa: E402
from test_decoding import repeats_an_ngram  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "a the red blue green big small circle square triangle is on left right of and".split()
SIZE = 64  # pretrained Lite0 at 64 px: a 2x2 grid of 1280 channels


def _decoder(vocab_size: int, rnn: str = "lstm", seed: int = 0) -> ShowAttendTell:
    torch.manual_seed(seed)
    model = ShowAttendTell(ModelConfig(vocab_size=vocab_size, feature_dim=1280, embed_dim=16, hidden_dim=24,
                                       attention_dim=16, rnn=rnn)).eval()
    with torch.no_grad():  # captions that end after a few words and captions cut at max_length, <unk> in some
        model.out.bias[END] += 0.3
        model.out.bias[UNK] += 0.3
        model.out.bias[[PAD, START]] -= 5.0
    return model


def _save_run(path: Path, model: ShowAttendTell, vocab: Vocabulary) -> Path:
    spec = encoder_spec("efficientnet-lite0", SIZE, weights=Path(weights_path("efficientnet-lite0")).name)
    meta = {"model_config": model.config.to_dict(), "vocab": vocab.to_dict(), "encoder": spec.to_dict(),
            "language": "en", "metrics": {}, "progress": {"epoch": 1}}
    ckpt.save_checkpoint(path / "best", model, meta)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """root/run: a tiny LSTM decoder; root/ens: an ensemble of an LSTM and a GRU; each exported by `imcap export`
    to root/run-onnx and root/ens-onnx. The encoder is pretrained Lite0 at 64 px, as the checkpoints say."""
    root = tmp_path_factory.mktemp("onnx")
    vocab = Vocabulary.build([WORDS], min_count=1)
    _save_run(root / "run", _decoder(len(vocab)), vocab)
    _save_run(root / "ens" / "m1", _decoder(len(vocab), seed=1), vocab)
    _save_run(root / "ens" / "m2", _decoder(len(vocab), "gru", seed=2), vocab)
    (root / "ens" / ckpt.ENSEMBLE_FILE).write_text(json.dumps({"members": ["m1", "m2"]}))
    for name in ("run", "ens"):
        assert main(["export", str(root / name), "--format", "onnx", "--out", str(root / f"{name}-onnx"),
                     "--quiet"]) == 0
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Five image files of different sizes and modes (RGBA, greyscale, an EXIF rotation), and a bad one."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h, mode) in enumerate([(64, 64, "RGB"), (97, 41, "RGB"), (50, 80, "RGBA"), (120, 90, "L"),
                                      (70, 60, "RGB")]):
        im = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze(), mode)
        path = root / f"photo{i}.png"
        if i == 4:  # EXIF orientation 6: shown rotated
            exif = Image.Exif()
            exif[0x0112] = 6
            path = path.with_suffix(".jpg")
            im.save(path, exif=exif)
        else:
            im.save(path)
        files.append(path)
    bad = root / "not-an-image.jpg"
    bad.write_text("hello")
    return files + [bad]


def _torch(root: Path, name: str) -> Captioner:
    return Captioner.load(root / name, device="cpu", precision="fp32")


def _features(n: int, seed: int = 3) -> torch.Tensor:
    return 3 * torch.randn(n, 4, 1280, generator=torch.Generator().manual_seed(seed))  # (n, P, D)


# ---------------------------------------------------------------------------------------------------- the graphs


@pytest.mark.parametrize("batch", [1, 3])
def test_the_encoder_graph_computes_the_torch_encoders_grid(runs, batch):
    captioner = _torch(runs, "run")
    images = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
    session = ort.InferenceSession(str(runs / "run-onnx" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["features"], {"images": images.numpy()})[0]
    with torch.no_grad():
        want = captioner.encoder(images).numpy()
    assert got.shape == want.shape == (batch, 4, 1280)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["run", "ens"])
@pytest.mark.parametrize("batch", [1, 3])
def test_the_decoder_graphs_give_the_log_probs_state_and_alpha_of_model_step(runs, name, batch):
    model = _torch(runs, name).model  # the CPU fast path of model.py, as decoding runs it
    decoder = rt.OnnxCaptioner.load(runs / f"{name}-onnx", threads=1).decoder
    features = _features(batch, seed=batch)
    memory, state = decoder.attend(features.numpy())
    with torch.no_grad():
        t_memory = model.attend_memory(features)
        t_state = model.init_state(t_memory)
    assert len(state) == len(t_state) == (2 if name == "run" else 3)  # (h, c) or LSTM (h, c) + GRU (h,)
    for got, want in zip(state, t_state):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    gen = torch.Generator().manual_seed(7)
    for beams in (1, 2):  # W state rows per memory row, as beam search runs the step
        tokens = torch.randint(0, model.config.vocab_size, (batch * beams,), generator=gen)
        t_rows = tuple(s.repeat_interleave(beams, 0) + 0.1 * torch.randn(s.shape[0] * beams, s.shape[1], generator=gen)
                       for s in t_state)
        got_lp, got_state, got_alpha = decoder.step(tokens.numpy(), tuple(s.numpy() for s in t_rows), memory)
        with torch.no_grad():
            lp, new_state, alpha = model.step(tokens, t_rows, t_memory)
        np.testing.assert_allclose(got_lp, lp.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_alpha, alpha.numpy(), atol=1e-4, rtol=0)
        for got, want in zip(got_state, new_state, strict=True):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_the_export_holds_checked_graphs_with_dynamic_batches_and_its_json(runs):
    out = runs / "run-onnx"
    manifest = json.loads((out / rt.MANIFEST).read_text())
    assert manifest["format"] == "imcap-onnx" and manifest["imcap_version"] == imcap.__version__
    assert manifest["special_ids"] == {"pad": PAD, "start": START, "end": END, "unk": UNK}
    assert Vocabulary.from_dict(manifest["vocab"]) == Vocabulary.build([WORDS], min_count=1)
    assert manifest["preprocessing"]["image_size"] == SIZE and manifest["encoder"]["grid"] == [2, 2]
    assert manifest["model_config"]["hidden_dim"] == 24
    assert manifest["memory"] == ["features", "projected"] and manifest["state"] == ["h", "c"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["graphs"].values(), rt.MANIFEST])
    for file in manifest["graphs"].values():
        graph = onnx.load(out / file)
        onnx.checker.check_model(graph, full_check=True)
        for value in [*graph.graph.input, *graph.graph.output]:
            assert value.type.tensor_type.shape.dim[0].dim_param, f"{file}: {value.name} has a fixed batch size"
    ens = json.loads((runs / "ens-onnx" / rt.MANIFEST).read_text())
    assert ens["memory"] == ["features", "projected_1", "projected_2"] and ens["state"] == ["h_1", "c_1", "h_2"]


# -------------------------------------------------------------------------------------------------- the searches

OPTIONS = [
    {"beam_size": 1},
    {"beam_size": 1, "allow_unk": True, "max_length": 5},
    {"beam_size": 3},
    {"beam_size": 3, "length_penalty": 1.0, "n_best": 3},
    {"beam_size": 5, "n_best": 2, "max_length": 4},  # many cut at max_length: the best unfinished ones
    {"beam_size": 3, "allow_unk": True, "length_penalty": 0.6, "n_best": 2},
    {"beam_size": 1, "no_repeat_ngram": 2},
    {"beam_size": 4, "no_repeat_ngram": 2, "n_best": 4, "max_length": 12},
]


@pytest.mark.parametrize("name", ["run", "ens"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_the_numpy_searches_find_the_captions_of_decoding(runs, name, options):
    model = _torch(runs, name).model
    decoder = rt.OnnxCaptioner.load(runs / f"{name}-onnx", threads=1).decoder
    features = _features(12)
    want = decoding.decode(model, features, decoding.DecodingOptions(**options))
    got = rt.decode(decoder, features.numpy(), rt.DecodingOptions(**options))
    assert len(got) == len(want) == 12
    for g, w in zip(got, want):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        assert len(g) == options.get("n_best", 1)
        for gh, wh in zip(g, w):
            assert gh.score == pytest.approx(wh.score, abs=1e-4) and gh.log_prob == pytest.approx(wh.log_prob, abs=1e-4)
            assert gh.alphas.shape == tuple(wh.alphas.shape)
            np.testing.assert_allclose(gh.alphas, wh.alphas.numpy(), atol=1e-5)
            assert (UNK in gh.tokens) <= options.get("allow_unk", False)
            assert not options.get("no_repeat_ngram") or not repeats_an_ngram(gh.tokens, 2)


def test_the_searches_see_finished_unfinished_and_unk_captions(runs):
    """The tiny model exercises every rule above: captions that end, captions cut at max_length, <unk> chosen
    when allowed (and then never otherwise)."""
    decoder = rt.OnnxCaptioner.load(runs / "run-onnx", threads=1).decoder
    features = _features(12).numpy()
    hyps = [h for o in OPTIONS for image in rt.decode(decoder, features, rt.DecodingOptions(**o)) for h in image]
    assert any(h.finished for h in hyps) and any(not h.finished for h in hyps)
    assert any(UNK in h.tokens for h in hyps)
    assert any(repeats_an_ngram(h.tokens, 2) for h in hyps)  # what no_repeat_ngram 2 must prevent


# ------------------------------------------------------------------------------------------- images to captions


def test_images_are_preprocessed_as_the_torch_encoder_does_it(runs, photos):
    encoder = _torch(runs, "run").encoder
    captioner = rt.OnnxCaptioner.load(runs / "run-onnx", threads=1)
    for path in photos[:-1]:
        with Image.open(path) as im:
            image = to_rgb(im)
        np.testing.assert_array_equal(captioner.preprocessing(image), encoder.preprocess(image).numpy())


def test_both_runtimes_caption_image_files_alike(runs, photos):
    options = {"beam_size": 3, "n_best": 2, "max_length": 8}
    want = _torch(runs, "run").caption([str(p) for p in photos], **options)
    got = rt.OnnxCaptioner.load(runs / "run-onnx", threads=1).caption([str(p) for p in photos], **options)
    assert [r.to_dict().keys() for r in got] == [r.to_dict().keys() for r in want]
    assert got[-1].error == want[-1].error and "not-an-image.jpg" in got[-1].error
    for g, w in zip(got[:-1], want[:-1]):
        assert [g.caption, *(a.caption for a in g.alternatives)] == [w.caption, *(a.caption for a in w.alternatives)]
        assert g.score == pytest.approx(w.score, abs=1e-3) and g.finished == w.finished
        assert g.alphas.shape == w.alphas.shape and g.alphas.shape[1:] == (2, 2)
        np.testing.assert_allclose(g.alphas, w.alphas, atol=1e-4)


def test_the_runtime_captions_without_torch(runs, photos):
    """In a fresh interpreter where `import torch` fails: the module imports, the API and the CLI caption."""
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from imcap.onnx_runtime import OnnxCaptioner
result = OnnxCaptioner.load({str(runs / "run-onnx")!r}, threads=1).caption({str(photos[0])!r}, beam_size=3)
assert result.error is None and result.alphas.shape == (len(result.tokens) + result.finished, 2, 2), result
from imcap.cli import main
status = main(["caption", {str(runs / "run-onnx")!r}, {str(photos[1])!r}, "--json", "--beam", "1"])
assert status == 0, status
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None)
assert not loaded, loaded
print("caption:", result.caption)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "caption" in json.loads(lines[0]) and lines[1].startswith("caption:")


def test_a_hard_attention_model_without_gate_or_deep_output_on_a_fine_tuned_encoder_exports(tmp_path):
    from imcap.encoders import build_encoder
    from imcap.onnx_export import export_captioner

    vocab = Vocabulary.build([WORDS], min_count=1)
    torch.manual_seed(4)
    model = ShowAttendTell(ModelConfig(vocab_size=len(vocab), feature_dim=1280, embed_dim=16, hidden_dim=24,
                                       attention_dim=16, attention="hard", gate=False, deep_output=False)).eval()
    encoder = build_encoder("efficientnet-lite0", SIZE, pretrained=False)
    untuned = copy.deepcopy(encoder)
    tuned = build_encoder("efficientnet-lite0", SIZE, pretrained=False).top_state(2)  # other weights for 2 blocks
    captioner = Captioner(model, vocab, encoder.spec, {"language": "en"}, encoder=encoder, encoder_weights=tuned,
                          device="cpu", precision="fp32")
    summary = export_captioner(captioner, tmp_path / "export")
    assert max(summary.max_difference.values()) < 1e-4
    onnx_captioner = rt.OnnxCaptioner.load(tmp_path / "export", threads=1)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for i in range(3)]
    with torch.no_grad():
        want = captioner.encode(images).numpy()  # the tuned blocks are in the torch encoder
        before = untuned(torch.stack([untuned.preprocess(im) for im in images])).numpy()
    scale = np.abs(want).max()  # random weights: a grid of ~1e-8
    np.testing.assert_allclose(onnx_captioner.encode(images), want, rtol=1e-4, atol=1e-4 * scale)
    assert np.abs(before - want).max() > 0.1 * scale  # the tuned blocks changed the grid
    features = _features(6)
    for options in ({"beam_size": 1}, {"beam_size": 3, "n_best": 2}):
        got = onnx_captioner.caption_features(features.numpy(), rt.DecodingOptions(**options))
        expected = captioner.caption_features(features, decoding.DecodingOptions(**options))
        assert [[r.caption, *(a.caption for a in r.alternatives)] for r in got] == \
            [[r.caption, *(a.caption for a in r.alternatives)] for r in expected]


# ------------------------------------------------------------------------------------------------------- the CLI


def test_the_cli_captions_an_export(runs, photos, capsys, tmp_path):
    files = [str(p) for p in photos]
    expected = rt.OnnxCaptioner.load(runs / "run-onnx", threads=1).caption(files, beam_size=2, n_best=2)
    capsys.readouterr()
    status = main(["caption", str(runs / "run-onnx"), *files, "--beam", "2", "--n-best", "2", "--json",
                   "--runtime", "onnx", "--attention", str(tmp_path / "att"), "--threads", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1  # the bad file
    assert lines == [r.to_dict() for r in expected]
    assert len(list((tmp_path / "att").glob("*.attention.png"))) == len(files) - 1
    assert main(["caption", str(runs / "run-onnx"), files[0], "--beam", "2", "--json"]) == 0  # auto: onnx
    assert json.loads(capsys.readouterr().out)["caption"] == expected[0].caption


@pytest.mark.parametrize("argv, status, words", [
    (["export", "{root}/missing", "--out", "{root}/x"], 1, "missing: no such run directory"),
    (["export", "{root}", "--out", "{root}/x"], 1, "no checkpoint in this directory"),
    (["export", "{root}/run", "--out", "{root}/run/best/checkpoint.json"], 1, "checkpoint.json: exists and is not a directory"),
    (["caption", "{root}/run", "{root}/a.png", "--runtime", "onnx"], 1, "run: not an ONNX export"),
    (["caption", "{root}/missing", "{root}/a.png", "--runtime", "onnx"], 1, "missing: no such export folder"),
    (["caption", "{root}/run-onnx", "{root}/a.png", "--runtime", "torch"], 2, "is an ONNX export"),
    (["caption", "{root}/run-onnx", "{root}/a.png", "--device", "cuda"], 2, "runs on the CPU"),
    (["caption", "{root}/run-onnx", "{root}/a.png", "--ensemble", "{root}/run"], 2, "--ensemble needs --runtime torch"),
    (["caption", "{root}/run-onnx", "{root}/a.png", "--beam", "2", "--n-best", "3"], 2, "n-best must be"),
])
def test_mistakes_are_one_line(runs, capsys, argv, status, words):
    capsys.readouterr()
    assert main([a.format(root=runs) for a in argv]) == status
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (runs / "x").exists()


# ------------------------------------------------------------------------------------------------- real photos


@pytest.mark.realdata
def test_the_packaged_model_captions_flickr8k_alike_in_both_runtimes(shared_data, tmp_path):
    f8k = shared_data / "flickr8k"
    names = (f8k / "Flickr_8k.devImages.txt").read_text().split()
    files = [str(f8k / "images" / n) for n in names if (f8k / "images" / n).is_file()][:100]
    assert len(files) == 100
    assert main(["export", "flickr8k", "--format", "onnx", "--out", str(tmp_path / "f8k"), "--quiet"]) == 0
    want = imcap.load("flickr8k", device="cpu").caption(files, beam_size=3)
    got = rt.OnnxCaptioner.load(tmp_path / "f8k", threads=1).caption(files, beam_size=3)
    differ = [(g, w) for g, w in zip(got, want) if g.caption != w.caption]
    print(f"{len(differ)} of {len(files)} captions differ between the torch and ONNX runtimes at beam 3")
    assert all(r.error is None and r.caption for r in got)
    assert len(differ) <= 3  # near ties, which the two runtimes' rounding may break differently
    for g, w in differ:
        assert g.score == pytest.approx(w.score, abs=0.05), (g.caption, g.score, w.caption, w.score)
    same = [(g, w) for g, w in zip(got, want) if g.caption == w.caption]
    assert max(abs(g.score - w.score) for g, w in same) < 1e-3

"""The CLI end to end on a tiny synthetic set, with the real pretrained encoder."""

import json
import shutil
import subprocess
import sys

import pytest

from imcap.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["synth", str(root / "scenes"), "--images", "150", "--seed", "2", "--quiet"]) == 0
    assert main(["prepare", "--format", "karpathy", str(root / "scenes/scenes.json"), "--out", str(root / "data"),
                 "--min-count", "1", "--quiet"]) == 0
    assert main(["features", str(root / "data"), "--quiet"]) == 0
    assert main(["train", str(root / "data"), "--out", str(root / "run"), "--epochs", "8", "--batch-size", "24",
                 "--lr", "2e-3", "--warmup-steps", "10", "--embed-dim", "64", "--hidden-dim", "128",
                 "--attention-dim", "64", "--dropout", "0.2", "--patience", "0", "--quiet"]) == 0
    return root


def test_evaluate_json_has_the_seven_metrics(run_dir, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "3", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert list(scores)[:7] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"]
    assert list(scores)[7:] == ["grounding"]  # after the seven, where there is one (synthetic scenes have boxes)
    assert set(scores["grounding"]) == {"score", "chance", "words", "images"}
    assert scores["BLEU-1"] > 0.5  # learned something real about held-out scenes
    assert (run_dir / "run/eval/test-beam3.results.json").exists()


def test_evaluate_reports_attention_grounding_on_scenes_with_boxes(run_dir, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "1"]) == 0
    assert "grounding" in capsys.readouterr().out
    g = json.loads((run_dir / "run/eval/test-beam1.scores.json").read_text())["grounding"]
    assert g["images"] > 0 and g["words"] >= g["images"]
    assert 0 <= g["score"] <= 1 and 0 < g["chance"] < 1


def test_evaluate_with_a_length_penalty_keeps_its_own_files(run_dir):
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "2", "--length-penalty", "1", "--quiet"]) == 0
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "2", "--quiet"]) == 0
    with_penalty = json.loads((run_dir / "run/eval/test-beam2-lp1.scores.json").read_text())
    without = json.loads((run_dir / "run/eval/test-beam2.scores.json").read_text())
    assert with_penalty["decoding"]["length_penalty"] == 1 and without["decoding"]["length_penalty"] == 0


def test_evaluate_and_caption_an_ensemble(run_dir, capsys, tmp_path):
    second = run_dir / "second"
    assert main(["train", str(run_dir / "data"), "--out", str(second), "--epochs", "2", "--batch-size", "24",
                 "--embed-dim", "32", "--hidden-dim", "48", "--attention-dim", "32", "--rnn", "gru", "--seed", "5",
                 "--patience", "0", "--quiet"]) == 0
    assert main(["evaluate", str(run_dir / "run"), "--ensemble", str(second), "--split", "test", "--beam", "2"]) == 0
    report = json.loads((run_dir / "run/eval/test-beam2-ensemble-second.scores.json").read_text())
    assert report["checkpoint"] == f"{run_dir / 'run/best'} + {second / 'best'}"
    # an ensemble of a model with itself is that model
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "2"]) == 0
    assert main(["evaluate", str(run_dir / "run"), "--ensemble", str(run_dir / "run"), "--split", "test", "--beam", "2"]) == 0
    alone = json.loads((run_dir / "run/eval/test-beam2.scores.json").read_text())["scores"]
    itself = json.loads((run_dir / "run/eval/test-beam2-ensemble-best.scores.json").read_text())["scores"]
    assert itself == pytest.approx(alone, abs=1e-3)
    image = next((run_dir / "scenes/images").iterdir())
    capsys.readouterr()
    assert main(["caption", str(run_dir / "run"), str(image), "--ensemble", str(second), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["caption"]


def test_an_ensemble_needs_the_same_features(run_dir, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir / "run", other)
    meta = json.loads((other / "best/checkpoint.json").read_text())
    meta["encoder"].update(image_size=256, grid=[8, 8])  # another valid store: the decoder fits any grid
    (other / "best/checkpoint.json").write_text(json.dumps(meta))
    assert main(["evaluate", str(run_dir / "run"), "--ensemble", str(other), "--split", "test"]) == 1
    err = capsys.readouterr().err
    assert "cannot ensemble runs on different features" in err and len(err.strip().splitlines()) == 1


def test_caption_json_attention_and_a_bad_file(run_dir, capsys, tmp_path):
    scenes = json.loads((run_dir / "scenes/scenes.json").read_text())["images"]
    test = [im for im in scenes if im["split"] == "test"][:3]
    files = [str(run_dir / "scenes/images" / im["filename"]) for im in test]
    bad = tmp_path / "not-an-image.jpg"
    bad.write_text("hello")
    capsys.readouterr()
    status = main(["caption", str(run_dir / "run"), files[0], str(bad), *files[1:], "--json",
                   "--attention", str(tmp_path / "att")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1  # some image failed
    assert [line["image"] for line in lines] == [files[0], str(bad), *files[1:]]
    assert "not-an-image.jpg" in lines[1]["error"] and "caption" not in lines[1]
    named = 0
    for line, im in zip([lines[0], *lines[2:]], test):
        assert line["caption"] and isinstance(line["score"], float)
        named += any(obj["shape"] in line["caption"].split() for obj in im["objects"])
    assert named >= 2  # the captions name shapes that are really there
    assert len(list((tmp_path / "att").glob("*.png"))) == 3


def test_console_script_exit_codes(run_dir, tmp_path):
    cmd = [sys.executable, "-m", "imcap"]
    usage = subprocess.run(cmd + ["caption"], capture_output=True, text=True)
    assert usage.returncode == 2
    missing = subprocess.run(cmd + ["caption", str(tmp_path / "no-run"), "x.jpg"], capture_output=True, text=True)
    assert missing.returncode == 1 and "no such run directory" in missing.stderr
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def test_prepare_reports_a_malformed_file_in_one_line(tmp_path, capsys):
    bad = tmp_path / "captions.json"
    bad.write_text("{broken")
    assert main(["prepare", "--format", "coco", str(bad), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "captions.json" in err



def _exit_status(argv: list[str]) -> int:
    """main(argv)'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv, words", [
    (["caption", "RUN", "a.jpg", "--beam", "100000"], "argument --beam: must be >= 1 and <= 10, got 100000"),
    (["caption", "RUN", "a.jpg", "--max-length", "1000000000"], "argument --max-length: must be >= 1 and <= 60"),
    (["caption", "RUN", "a.jpg", "--beam", "0"], "argument --beam: must be >= 1"),
    (["caption", "RUN", "a.jpg", "--beam", "9" * 5000], "argument --beam: expected an integer"),
    (["caption", "RUN", "a.jpg", "--length-penalty", "nan"], "argument --length-penalty: must be >= 0"),
    (["caption", "RUN", "a.jpg", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["caption", "RUN", "a.jpg", "--beam", "3", "--n-best", "5"], "n-best must be between 1 and the beam size (3), got 5"),
    (["evaluate", "RUN", "--beam", "11"], "argument --beam: must be >= 1 and <= 10"),
    (["train", "DATA", "--out", "RUN", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    (["train", "DATA", "--out", "RUN", "--dropout", "nan"], "argument --dropout: must be >= 0 and <= 0.99, got nan"),
    (["train", "DATA", "--out", "RUN", "--hidden-dim", "100000000"], "argument --hidden-dim: must be >= 1 and <= 16,384"),
    (["train", "DATA", "--out", "RUN", "--encoder-lr", "1e-4"], "--encoder-lr needs --finetune-blocks N"),
    (["serve", "RUN", "--concurrency", "0"], "argument --concurrency: must be >= 1"),
    (["serve", "RUN", "--port", "70000"], "argument --port: must be >= 0 and <= 65,535"),
    (["demo", "--threads", "0"], "argument --threads: must be >= 1"),
])
def test_usage_errors_exit_2_with_one_line_before_anything_is_loaded(tmp_path, argv, words, capsys):
    argv = [str(tmp_path / a) if a in ("RUN", "DATA") else a for a in argv]  # neither exists: a usage error comes first
    assert _exit_status(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and err.startswith(f"imcap {argv[0]}: error: ")
    assert "Traceback" not in err and f"see imcap {argv[0]} --help" in err


def test_a_rerun_that_would_ignore_changed_settings_is_refused(tiny_data, tmp_path, capsys):
    args = ["train", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "16",
            "--embed-dim", "8", "--hidden-dim", "8", "--attention-dim", "8", "--lr", "1e-3", "--quiet", "--threads", "1"]
    assert main(args) == 0
    before = (tmp_path / "run/checkpoint/checkpoint.json").read_text()
    capsys.readouterr()
    changed = [*args, "--lr", "1e-2", "--hidden-dim", "16"]  # later flags win
    assert _exit_status(changed) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--hidden-dim, --lr differ from the run's" in err
    assert "only --epochs and --micro-batches may change on resume" in err
    assert (tmp_path / "run/checkpoint/checkpoint.json").read_text() == before  # nothing was touched
    assert main([*args, "--epochs", "2"]) == 0  # the same line with more epochs resumes
    assert "resuming" in capsys.readouterr().out


@pytest.mark.parametrize("cores, load, threads", [(2, 0.1, 2), (2, 0.9, 1), (2, 1.4, 1), (2, 5.0, 1), (16, 3.2, 13), (1, 0.0, 1)])
def test_default_threads_are_the_cores_idle_at_start(monkeypatch, cores, load, threads):
    from imcap import cli

    monkeypatch.setattr(cli.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (load, load, load))
    assert cli.default_threads() == threads


def test_serve_passes_its_request_limits_on(monkeypatch):
    import imcap.server

    seen = {}
    monkeypatch.setattr(imcap.server, "serve", lambda run_dir, host, port, **kw: seen.update(kw))
    assert main(["serve", "RUN", "--max-cost", "100", "--max-overlay-images", "1", "--max-overlays", "8",
                 "--max-reply-mb", "2.5", "--device", "cpu"]) == 0
    assert (seen["max_cost"], seen["max_overlay_images"], seen["max_overlays"], seen["max_reply_bytes"]) == (100, 1, 8, 2_500_000)


def test_a_uint8_store_trains_and_evaluates_like_float16(run_dir, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dataset.json", "vocab.json"):
        shutil.copy(run_dir / "data" / name, data / name)
    capsys.readouterr()
    assert main(["features", str(data), "--dtype", "uint8", "--quiet"]) == 0
    assert "uint8, 62,720 bytes/image" in capsys.readouterr().out  # 7 x 7 x 1280, half of float16's
    capsys.readouterr()
    assert main(["evaluate", str(run_dir / "run"), "--data", str(data), "--split", "test", "--beam", "1", "--json"]) == 0
    on_bytes = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run_dir / "run"), "--split", "test", "--beam", "1", "--json"]) == 0
    on_halves = json.loads(capsys.readouterr().out)
    assert abs(on_bytes["CIDEr"] - on_halves["CIDEr"]) < 0.05  # the model trained on float16 reads uint8 features
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "24",
                 "--embed-dim", "32", "--hidden-dim", "48", "--attention-dim", "32", "--patience", "0", "--quiet"]) == 0
    saved = json.loads((tmp_path / "run/best/checkpoint.json").read_text())
    assert saved["data"]["features"] == "efficientnet-lite0-224"

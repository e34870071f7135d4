"""Checkpoints that pass the format checks but would crash later (issue #13): out-of-range or inconsistent
configs, ensemble.json files that loop or leave RUN_DIR, training state that cannot be resumed, numbers too
long to parse. Each is refused at load in one line naming the file and the key, by every entry point.
docs/reliability.md (section 4) maps each case to its test."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from imcap import checkpoint as ckpt
from test_hardening import QUIET, TRAIN_ARGS, cli_env, imcap_cmd, run_main, tiny_run


def _edit(section: str, key: str, value) -> Callable[[dict], None]:
    return lambda meta: meta[section].__setitem__(key, value)


def _vocab_plus_one(meta: dict) -> None:
    meta["model_config"]["vocab_size"] += 1


# case -> (edit of RUN/best/checkpoint.json, what the one line says after the file name)
CONFIGS: dict[str, tuple[Callable[[dict], None], str]] = {
    "grid-does-not-fit": (_edit("encoder", "grid", [1000, 1000]), "'encoder.grid' must be [2, 2]"),
    "feature-dim-does-not-fit": (_edit("encoder", "feature_dim", 640), "'encoder.feature_dim' must be 1280"),
    "image-size-6400": (_edit("encoder", "image_size", 6400), "'encoder.image_size' must be a multiple of 32"),
    "image-size-3200000": (_edit("encoder", "image_size", 3_200_000), "'encoder.image_size' must be a multiple of 32"),
    "image-size-inf": (_edit("encoder", "image_size", float("inf")), "'encoder.image_size' must be a multiple of 32"),
    "dropout-nan": (_edit("model_config", "dropout", float("nan")), "'model_config.dropout' must be a number in [0, 1), got nan"),
    "dropout-one": (_edit("model_config", "dropout", 1.0), "'model_config.dropout' must be a number in [0, 1)"),
    "dropout-string": (_edit("model_config", "dropout", "0.5"), "'model_config.dropout' must be a number in [0, 1)"),
    "hidden-dim-zero": (_edit("model_config", "hidden_dim", 0), "'model_config.hidden_dim' must be an integer"),
    "embed-dim-negative": (_edit("model_config", "embed_dim", -8), "'model_config.embed_dim' must be an integer"),
    "attention-dim-bool": (_edit("model_config", "attention_dim", True), "'model_config.attention_dim' must be an integer"),
    "embed-dim-string": (_edit("model_config", "embed_dim", "8"), "'model_config.embed_dim' must be an integer"),
    "embed-dim-huge": (_edit("model_config", "embed_dim", 10**4000), "'model_config.embed_dim' must be an integer"),
    "vocab-size-does-not-fit": (_vocab_plus_one, "'model_config.vocab_size' must be the vocabulary's size"),
    "gate-string": (_edit("model_config", "gate", "yes"), "'model_config.gate' must be one of True, False"),
    "unknown-rnn": (_edit("model_config", "rnn", "transformer"), "'model_config.rnn' must be one of 'lstm', 'gru'"),
    "unknown-attention": (_edit("model_config", "attention", "fuzzy"), "'model_config.attention' must be one of 'soft', 'hard'"),
    "hard-sample-prob-1.5": (_edit("model_config", "hard_sample_prob", 1.5), "'model_config.hard_sample_prob' must be a number in [0, 1]"),
}


def _craft_config(run: Path, case: str) -> Path:
    meta_file = run / "best" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    CONFIGS[case][0](meta)
    meta_file.write_text(json.dumps(meta))
    return meta_file


def _craft_ensemble(run: Path, case: str) -> Path:
    """RUN/m1 a good run, RUN/ensemble.json listing it and the case's second member."""
    tiny_run(run / "m1")
    other = run.parent / "other"
    if case == "ensemble-lists-itself":
        second = "."
    elif case == "ensembles-list-each-other":  # RUN lists ../other, other lists ../run
        second = "../other"
        tiny_run(other / "m1")
        (other / ckpt.ENSEMBLE_FILE).write_text(json.dumps({"members": ["m1", f"../{run.name}"]}))
    elif case == "ensemble-member-absolute":
        second = str(run.resolve())
    else:  # a member that is itself an ensemble: here RUN itself, through a symlink
        second = "loop"
        (run / "loop").symlink_to(run.resolve(), target_is_directory=True)
    file = run / ckpt.ENSEMBLE_FILE
    file.write_text(json.dumps({"members": ["m1", second]}))
    return file


ENSEMBLES = {
    "ensemble-lists-itself": "'members' must be subfolders of",
    "ensembles-list-each-other": "'members' must be subfolders of",
    "ensemble-member-absolute": "'members' must be subfolders of",
    "ensemble-member-is-an-ensemble": "member 'loop' is an ensemble itself",
}

HUGE = "9" * 5000  # over Python's 4300-digit limit on int(str): json.loads raises ValueError


def _craft_huge_integer(run: Path, case: str) -> Path:
    meta_file = run / "best" / "checkpoint.json"
    text = meta_file.read_text()
    meta_file.write_text(text.replace('"version": 1', f'"version": {HUGE}', 1))
    assert HUGE in meta_file.read_text()
    return meta_file


CASES = {**{c: (_craft_config, w) for c, (_, w) in CONFIGS.items()},
         **{c: (_craft_ensemble, w) for c, w in ENSEMBLES.items()},
         "integer-of-5000-digits": (_craft_huge_integer, "malformed JSON (Exceeds the limit (4300 digits)")}


def crafted(tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    """(RUN_DIR, the file to be named, the words after it) of a crafted case."""
    run = tmp_path / "run"
    craft, words = CASES[case]
    if craft is not _craft_ensemble:
        tiny_run(run)
    return run, craft(run, case), words


@pytest.mark.parametrize("command", ["caption", "evaluate"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_that_would_crash_is_refused_at_load_in_one_line(tmp_path, case, command, capsys):
    run, file, words = crafted(tmp_path, case)
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    args = [str(image)] if command == "caption" else ["--data", str(tmp_path)]
    status, out, err = run_main_capsys([command, str(run), *args, "--threads", "1"], capsys)
    assert status == 1 and out == "" and len(err) == 1, err
    assert err[0].startswith(f"imcap {command}: error: {file}: {words}"), err[0]


def run_main_capsys(args: list[str], capsys) -> tuple[int, str, list[str]]:
    """run_main, and what reached the real stderr too (a traceback printed by a thread or a warning)."""
    status, out, err = run_main(args)
    captured = capsys.readouterr()
    return status, out + captured.out, err + captured.err.splitlines()


@pytest.mark.parametrize("case", list(CASES))
def test_imcap_load_refuses_a_crafted_checkpoint(tmp_path, case):
    import imcap

    run, file, words = crafted(tmp_path, case)
    with pytest.raises(ckpt.CheckpointError) as e:
        imcap.load(run)
    assert str(e.value).startswith(f"{file}: {words}") and "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["dropout-nan", "grid-does-not-fit", "ensemble-lists-itself"])
def test_serve_refuses_a_checkpoint_that_would_crash_before_listening(tmp_path, case):
    run, file, words = crafted(tmp_path, case)
    r = subprocess.run(imcap_cmd("serve", run, "--port", "0", "--threads", "1"), capture_output=True, text=True,
                       env=cli_env(), timeout=60, check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().startswith(f"imcap serve: error: {file}: {words}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# =============================================================================================== resume, --init-from


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """A RUN_DIR after one epoch of tiny_data: RUN/checkpoint, RUN/best."""
    run = tmp_path_factory.mktemp("trained") / "run"
    status, _, err = run_main(["train", str(tiny_data), "--out", str(run), *TRAIN_ARGS, "--epochs", "1", *QUIET])
    assert status == 0, err
    return run


# case -> (section, key, value) written into RUN/checkpoint/checkpoint.json, what the one line says
RESUMES = {
    "batch-size-zero": ("train_config", "batch_size", 0, "'train_config.batch_size' must be an integer"),
    "batch-size-string": ("train_config", "batch_size", "64", "'train_config.batch_size' must be an integer"),
    "lr-string": ("train_config", "lr", "fast", "'train_config.lr' must be a number"),
    "lr-schedule-unknown": ("train_config", "lr_schedule", "wavy", "'train_config.lr_schedule' must be one of"),
    "seed-huge": ("train_config", "seed", 2**70, "'train_config.seed' must be an integer"),
    "best-epoch-past-history": ("progress", "best_epoch", 7, "'progress.best_epoch' must be an integer in [-1, 1]"),
    "history-not-a-list": ("progress", "history", {"epoch": 1}, "'progress.history' must be a list of 1 epoch records"),
    "history-of-lists": ("progress", "history", [[1]], "'progress.history' must be a list of 1 epoch records"),
    "best-cider-string": ("progress", "best_cider", "high", "'progress.best_cider' must be a number"),
    "dropout-nan": ("model_config", "dropout", float("nan"), "'model_config.dropout' must be a number in [0, 1)"),
}


@pytest.mark.parametrize("case", list(RESUMES))
def test_train_refuses_a_checkpoint_that_cannot_be_resumed(trained, tiny_data, tmp_path, case, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    section, key, value, words = RESUMES[case]
    meta_file = run / "checkpoint" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta[section][key] = value
    meta_file.write_text(json.dumps(meta))
    before = meta_file.read_bytes()
    status, _, err = run_main_capsys(["train", str(tiny_data), "--out", str(run), "--epochs", "2", *QUIET], capsys)
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"imcap train: error: {meta_file}: {words}"), err[0]
    assert meta_file.read_bytes() == before


@pytest.mark.parametrize("case", ["dropout-nan", "vocab-size-does-not-fit", "grid-does-not-fit"])
def test_train_init_from_refuses_a_crafted_checkpoint(trained, tiny_data, tmp_path, case, capsys):
    start = tmp_path / "start"
    shutil.copytree(trained, start)
    file = _craft_config(start, case)
    status, _, err = run_main_capsys(["train", str(tiny_data), "--out", str(tmp_path / "new"), *TRAIN_ARGS,
                                      "--init-from", str(start), *QUIET], capsys)
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"imcap train: error: {file}: {CONFIGS[case][1]}"), err[0]
    assert not (tmp_path / "new" / "checkpoint").exists()


def test_a_checkpoint_naming_a_decoder_imcap_lacks_is_refused_in_one_line(tmp_path, capsys):
    run = tiny_run(tmp_path / "run")
    meta_file = run / "best" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["decoder"] = "transformer"  # (a checkpoint without the key is the paper's decoder: show-attend-tell)
    meta_file.write_text(json.dumps(meta))
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(image)
    status, out, err = run_main_capsys(["caption", str(run), str(image), "--threads", "1"], capsys)
    assert status == 1 and len(err) == 1, err
    assert err[0] == (f"imcap caption: error: {run / 'best'}/checkpoint.json: decoder 'transformer' is not one "
                      "this imcap has (show-attend-tell)"), err[0]

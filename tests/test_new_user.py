"""What a new user meets (issue 15): Ctrl-C during training, the progress it prints, hints and exit statuses.

On the tiny synthetic set with its random-weight encoder (conftest: 64 px -> 2x2 grid, 32 train images x 5
captions), so everything here is fast and hermetic."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imcap.train
from imcap import checkpoint as ckpt
from imcap.cli import main
from imcap.train import Trainer, TrainConfig, TrainingInterrupted, _duration, train

REPO = Path(__file__).resolve().parents[1]
MODEL = {"embed_dim": 16, "hidden_dim": 24, "attention_dim": 16, "dropout": 0.3}
INTERRUPTED = re.compile(r"interrupted at epoch (\d+), step (\d+) of (\d+): checkpoint written to (.+); "
                         r"run the same command to resume")


def config(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, patience=0, seed=3, val_max_length=12)
    return TrainConfig(**{**base, **kw})


def run(data_dir, out, log=lambda *a: None, **cfg):
    return train(data_dir, out, model_config=MODEL, train_config=config(**cfg), progress=False, log=log)


def same_weights(a: Path, b: Path) -> bool:
    files = ["checkpoint/model.safetensors", "checkpoint/optimizer.safetensors", "best/model.safetensors"]
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def history(run_dir: Path) -> list[tuple]:
    return [(h["epoch"], h["step"], h["val"]) for h in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def global_step(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoint/checkpoint.json").read_text())["progress"]["global_step"]


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs in the main thread, at the next bytecode


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(tiny_data, out)
    return out


# --- 5. Ctrl-C ---------------------------------------------------------------------------------------------------

def test_ctrl_c_in_a_step_finishes_it_writes_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(
        tiny_data, tmp_path, straight, monkeypatch):
    step = Trainer._step

    def interrupted_step(self, idx, batch):
        if self.progress.global_step == 3:  # in the 4th step of epoch 1 (10 steps an epoch)
            ctrl_c()
        return step(self, idx, batch)

    monkeypatch.setattr(Trainer, "_step", interrupted_step)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a job started with &
    with pytest.raises(TrainingInterrupted) as e:
        run(tiny_data, tmp_path / "run")
    assert INTERRUPTED.fullmatch(str(e.value)).groups() == ("1", "4", "10", str(tmp_path / "run/checkpoint"))
    assert global_step(tmp_path / "run") == 4  # the step in progress was finished and kept
    assert signal.getsignal(signal.SIGINT) is before  # put back
    monkeypatch.undo()
    summary = run(tiny_data, tmp_path / "run")
    assert summary["steps"] == 20 and summary["epochs"] == 2
    assert same_weights(straight, tmp_path / "run") and history(straight) == history(tmp_path / "run")


def test_ctrl_c_in_validation_stops_at_once_and_keeps_the_epochs_steps(tiny_data, tmp_path, straight, monkeypatch):
    validate = imcap.train.validate
    calls = []

    def interrupted_validate(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            ctrl_c()  # raises KeyboardInterrupt at once, inside validation
            time.sleep(1)  # not reached
        return validate(*args, **kw)

    monkeypatch.setattr(imcap.train, "validate", interrupted_validate)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted in the validation of epoch 1 \(its 10 steps are "
                                                  r"kept\): checkpoint written to .*; run the same command to resume$"):
        run(tiny_data, tmp_path / "run")
    assert global_step(tmp_path / "run") == 10 and not (tmp_path / "run/best").exists()
    summary = run(tiny_data, tmp_path / "run")  # validates epoch 1, then trains epoch 2
    assert summary["steps"] == 20
    assert same_weights(straight, tmp_path / "run") and history(straight) == history(tmp_path / "run")


def test_ctrl_c_while_a_checkpoint_is_written_waits_for_the_write(tiny_data, tmp_path, straight, monkeypatch):
    save = ckpt.save_checkpoint
    writes = []

    def save_with_ctrl_c(path, *args, **kw):
        writes.append(global_step_of(kw, args))
        if len(writes) == 1:
            ctrl_c()  # during the write of step 3's checkpoint: ignored, then training stops after step 4
            time.sleep(0.01)
        return save(path, *args, **kw)

    def global_step_of(kw, args):
        return args[1]["progress"]["global_step"]

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="at epoch 1, step 4 of 10"):
        run(tiny_data, tmp_path / "run", checkpoint_every=3)
    assert writes == [3, 4] and ckpt.load_checkpoint(tmp_path / "run/checkpoint")[0]["progress"]["global_step"] == 4
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.endswith((".tmp", ".old"))]
    monkeypatch.undo()
    run(tiny_data, tmp_path / "run", checkpoint_every=3)
    assert same_weights(straight, tmp_path / "run")  # checkpoint_every changes nothing but the writes


def test_a_second_ctrl_c_before_the_checkpoint_stops_at_once_and_says_so(tiny_data, tmp_path, monkeypatch):
    step = Trainer._step

    def twice(self, idx, batch):
        if self.progress.global_step == 2:
            ctrl_c()
            ctrl_c()  # the second raises KeyboardInterrupt in this step
            time.sleep(1)
        return step(self, idx, batch)

    monkeypatch.setattr(Trainer, "_step", twice)
    with pytest.raises(TrainingInterrupted, match=r"^interrupted at epoch 1, step 2 \(a second Ctrl-C stopped it "
                                                  r"before the checkpoint was written\); no checkpoint yet: the same "
                                                  r"command starts over$"):
        run(tiny_data, tmp_path / "run")
    assert not (tmp_path / "run/checkpoint").exists()


TRAIN = ["--epochs", "2", "--batch-size", "4", "--checkpoint-every", "1000", "--embed-dim", "16", "--hidden-dim", "24",
         "--attention-dim", "16", "--dropout", "0.3", "--lr", "3e-3", "--warmup-steps", "3", "--patience", "0",
         "--seed", "3", "--threads", "1"]  # 160 train captions / 4 = 40 steps an epoch


def test_sigint_to_imcap_train_exits_130_with_one_line_and_the_rerun_resumes_exactly(tiny_data, tmp_path, capsys):
    assert main(["train", str(tiny_data), "--out", str(tmp_path / "straight"), *TRAIN, "--quiet"]) == 0
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "imcap", "train", str(tiny_data), "--out", str(run_dir), *TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen, deadline = b"", time.monotonic() + 120
    while not re.search(rb"\| *[1-9]\d*/40 \[", seen):  # the progress bar after the first step
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"imcap train ended or hung before its first step: {seen.decode()[-2000:]}")
        seen += chunk
    assert b"run_eta=" in seen and b"xent=" in seen  # the bar shows the whole run's ETA and the cross-entropy
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.decode().replace("\r", "\n").strip().splitlines()[-1]
    match = re.fullmatch(r"imcap train: " + INTERRUPTED.pattern, last)
    assert match, last
    epoch, step, steps, written = match.groups()
    assert (epoch, steps, written) == ("1", "40", str(run_dir / "checkpoint"))
    assert global_step(run_dir) == int(step) >= 1
    assert b"Traceback" not in err
    done = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"resuming {run_dir} at epoch 1, step {step}\n" in done.stdout
    assert same_weights(tmp_path / "straight", run_dir)
    assert history(tmp_path / "straight") == history(run_dir)


# --- 6. readable progress -----------------------------------------------------------------------------------------

def test_the_epoch_line_shows_the_cross_entropy_apart_from_the_penalty_and_the_runs_eta(tiny_data, tmp_path):
    lines = []
    run(tiny_data, tmp_path / "run", log=lines.append, alpha_c=1.0)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == 2, lines
    number = r"(\d+\.\d{3})"
    first = re.match(rf"epoch 1: loss {number} \(xent {number} \+ 1 x penalty {number}\), \d+ captions/s "
                     rf"\(\d+% waiting for data\), BLEU-4 \d+\.\d{{3}}, CIDEr \d+\.\d{{3}}( \(best\))?; "
                     rf"1 of 2 epochs to go, run ETA \d+ s  e\.g\. ", epochs[0])
    assert first, epochs[0]
    loss, xent, penalty = map(float, first.groups()[:3])
    assert loss == pytest.approx(xent + penalty, abs=2e-3) and xent > 0 and penalty > 0
    assert "run ETA" not in epochs[1] and re.match(rf"epoch 2: loss {number} \(xent ", epochs[1])  # the last: no ETA
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert {"epoch", "step", "train_loss", "train_parts", "train_seconds", "captions_per_s", "data_wait_share",
            "val_seconds", "val"} <= set(record)  # the keys metrics.jsonl had
    assert set(record["train_parts"]) == {"xent", "attention_penalty"}


def test_durations_read_as_seconds_minutes_hours():
    assert [_duration(s) for s in (0, 45, 59.4, 60, 720, 3599, 3600, 7500, 90000)] == [
        "0 s", "45 s", "59 s", "1 min", "12 min", "1 h 00 min", "1 h 00 min", "2 h 05 min", "25 h 00 min"]


# --- 7. exit codes and hints --------------------------------------------------------------------------------------

def one_error_line(capsys, argv: list[str], status: int) -> str:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == status and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_caption_a_data_dir_says_so_and_suggests_a_run_folder(tiny_data, capsys):
    err = one_error_line(capsys, ["caption", str(tiny_data), "x.jpg"], 1)
    assert err == (f"imcap caption: error: {tiny_data}: no checkpoint in this directory: it is a DATA_DIR "
                   f"(dataset.json, vocab.json); train a run on it first: imcap train {tiny_data} --out runs/NAME")


def test_caption_a_folder_that_holds_runs_names_them(tmp_path, capsys):
    demo = tmp_path / "demo-out"
    for folder in ("run/best", "data/features"):
        (demo / folder).mkdir(parents=True)
    (demo / "run/best/checkpoint.json").write_text("{}")
    err = one_error_line(capsys, ["caption", str(demo), "x.jpg"], 1)
    assert err == f"imcap caption: error: {demo}: no checkpoint in this directory; the run {demo / 'run'} is one level down: name it"
    (demo / "other/checkpoint").mkdir(parents=True)
    (demo / "other/checkpoint/checkpoint.json").write_text("{}")
    err = one_error_line(capsys, ["evaluate", str(demo)], 1)
    assert f"the runs {demo / 'other'}, {demo / 'run'} are one level down: name one of them" in err


def test_attention_figures_of_images_with_the_same_name_do_not_overwrite_each_other(tiny_data, tmp_path, capsys):
    run(tiny_data, tmp_path / "run", epochs=1)
    images = sorted((tiny_data.parent / "scenes/images").iterdir())[:3]
    named = []
    for folder, image in zip("abc", images):
        (tmp_path / folder).mkdir()
        named.append(tmp_path / folder / f"photo{image.suffix}")
        shutil.copy(image, named[-1])
    capsys.readouterr()
    assert main(["caption", str(tmp_path / "run"), *map(str, named), "--beam", "1", "--attention",
                 str(tmp_path / "att"), "--quiet"]) == 0
    figures = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert figures == ["photo-2.attention.png", "photo-3.attention.png", "photo.attention.png"]
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"imcap caption: note: {named[1]}: attention figure {tmp_path / 'att/photo-2.attention.png'} "
                     f"(photo.attention.png is {named[0]}'s)",
                     f"imcap caption: note: {named[2]}: attention figure {tmp_path / 'att/photo-3.attention.png'} "
                     f"(photo.attention.png is {named[0]}'s)"]


@pytest.mark.parametrize("argv", [["synth", "x"], ["prepare", "x", "--format", "lines", "--out", "y"], ["download", "list"]])
def test_threads_is_only_offered_where_torch_runs(argv, capsys):
    err = one_error_line(capsys, [*argv, "--threads", "2"], 2)
    assert "unrecognized arguments: --threads 2" in err
    assert "--threads" in main_help(["train", "--help"], capsys) and "--quiet" in main_help([argv[0], "--help"], capsys)


def main_help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main(argv)
    return capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--finetune-blocks", "2"], "--finetune-blocks needs --init-from RUN_DIR"),
    (["--finetune-blocks", "2", "--init-from", "XE", "--objective", "scst"], "cross-entropy objective only"),
    (["--preset", "flickr8k", "--finetune-blocks", "2"], "--preset flickr8k trains on the cached features"),
    (["--scst-epochs", "2"], "--scst-epochs needs --preset"),
    (["--encoder-lr", "1e-4"], "--encoder-lr needs --finetune-blocks N"),
    (["--scst-temperature", "0.5"], "--scst-temperature is a setting of --objective scst, and this run trains only xe"),
    (["--objective", "scst", "--init-from", "XE", "--label-smoothing", "0.1"],
     "--label-smoothing is a setting of --objective xe, and this run trains only scst"),
    (["--preset", "flickr8k", "--scst-samples", "3"], "--preset flickr8k trains only xe: drop --scst-samples"),
    (["--preset", "flickr8k-scst", "--scst-epochs", "0", "--scst-baseline", "greedy"], "drop --scst-baseline"),
])
def test_flags_that_contradict_each_other_are_usage_errors(tmp_path, capsys, flags, message):
    err = one_error_line(capsys, ["train", str(tmp_path / "DATA"), "--out", str(tmp_path / "RUN"), *flags], 2)
    assert err.startswith("imcap train: error: ") and message in err and "see imcap train --help" in err

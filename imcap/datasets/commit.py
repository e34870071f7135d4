"""The staged commit of a prepare's outputs: dataset.json, vocab.json and report.json replace a previous
DATA_DIR's as one, so they always come from the same run, whenever a prepare fails or is killed."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from ..fileio import write_error, write_json_atomic
from ..text import Vocabulary

COMMIT_DIR = ".prepare-commit"  # inside DATA_DIR: the new outputs, complete, while they are moved in
OUTPUTS = ("dataset.json", "vocab.json", "report.json")


def write_outputs(out_dir: Path, dataset: dict, vocabulary: Vocabulary, report: dict) -> None:
    """Write dataset.json, vocab.json and report.json as one: all three are written to a staging folder,
    which is renamed to COMMIT_DIR (the commit point), and then moved into place. A prepare that fails or
    is killed before the commit leaves a previous DATA_DIR as it was; one killed after it is completed by
    the next reader (`finish_commit`), so dataset.json and vocab.json always come from the same run.
    A write that fails (a full disk) is a WriteError naming the file as it would be in DATA_DIR."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finish_commit(out_dir)
    for stale in out_dir.glob(".prepare-*.tmp"):  # left by a killed prepare
        shutil.rmtree(stale, ignore_errors=True)
    stage = out_dir / f".prepare-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir()
    try:
        write_json_atomic(stage / "dataset.json", dataset, indent=None)
        vocabulary.save(stage / "vocab.json")
        write_json_atomic(stage / "report.json", report, indent=1)
        os.replace(stage, out_dir / COMMIT_DIR)
    except OSError as e:
        written = Path(os.fspath(e.filename)) if e.filename is not None else stage
        if not written.is_relative_to(stage):
            raise
        raise write_error(out_dir / written.relative_to(stage), e) from e  # not the staging folder's name
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    finish_commit(out_dir)


def finish_commit(data_dir: Path) -> None:
    """Move the files of a committed prepare into DATA_DIR (roll forward after a kill); no-op otherwise."""
    commit = Path(data_dir) / COMMIT_DIR
    if not commit.is_dir():
        return
    for name in OUTPUTS:
        try:
            os.replace(commit / name, Path(data_dir) / name)
        except FileNotFoundError:  # already moved (by us before a kill, or by another reader)
            pass
    shutil.rmtree(commit, ignore_errors=True)

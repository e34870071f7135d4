"""Ctrl-C while training: the first one stops at the next step boundary after a checkpoint, a second at once.

train.Trainer installs a CtrlC around its epochs (one process, main thread) and switches its mode: "step"
while training steps, "at_once" in validation (which nothing resumes from), "shielded" while a checkpoint is
written. TrainingInterrupted carries the one line the CLI prints.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped Trainer.train; the message (one line) says where, what was written and how to go on."""


class CtrlC:
    """What SIGINT does while training (active: one process, in the main thread; else Ctrl-C stays the plain
    KeyboardInterrupt). In mode "step" the first sets `requested` (training checkpoints at the next step boundary
    and stops) and a second raises KeyboardInterrupt; "at_once" (validation, which nothing resumes from) raises
    on the first; "shielded" (a checkpoint being written) only sets `requested`."""

    def __init__(self, active: bool):
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._mode = "step"
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        before, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = before

    def _handle(self, signum, frame) -> None:
        if self._mode == "at_once" or (self._mode == "step" and self.requested):
            raise KeyboardInterrupt
        self.requested = True

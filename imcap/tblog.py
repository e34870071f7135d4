"""TensorBoard logging of a training run (RUN_DIR/tb) that never ends the run: a failing write is one warning."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

from .fileio import write_error


def open_tensorboard(path: Path, step: int) -> TensorBoard | None:
    """A writer for `path` from `step` on (events after it, from a run killed later, are purged); None without tensorboard."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # tensorboard is optional at run time
        return None
    return TensorBoard(path, step)


class TensorBoard:
    """TensorBoard's SummaryWriter for RUN_DIR/tb, where a write that fails (a full disk) stops TensorBoard with
    one warning line instead of ending training. TensorBoard writes in a thread, which prints its error as a
    traceback before the next call raises it here: while this writer is open that copy is kept quiet."""

    def __init__(self, path: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.writer = path, None
        self._previous_hook, threading.excepthook = threading.excepthook, self._quiet
        try:
            self.writer = SummaryWriter(str(path), purge_step=step or None)
        except OSError as e:
            self._stop(e)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")
        if threading.excepthook == self._quiet:
            threading.excepthook = self._previous_hook

    def _call(self, method: str, *args) -> None:
        if self.writer is None:  # stopped
            return
        try:
            getattr(self.writer, method)(*args)
        except OSError as e:
            self._stop(e)

    def _stop(self, error: OSError) -> None:
        """Warn once and write no more."""
        writer, self.writer = self.writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
        print(f"imcap train: warning: {write_error(self.path, error)}; TensorBoard logging stopped", file=sys.stderr)

    def _quiet(self, args) -> None:
        ours = type(args.thread).__module__.startswith("tensorboard.") and issubclass(args.exc_type, OSError)
        if not ours:
            self._previous_hook(args)

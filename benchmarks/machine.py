"""What the benchmarks record about the machine they ran on (no torch: benchmarks/onnx.py's runtime must not load it)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> str:
    """/proc/loadavg as it reads (1-, 5-, 15-minute load, runnable/total tasks, last pid)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"

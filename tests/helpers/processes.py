"""Finding a test's child processes (the local launcher's jobs) by the files they hold."""

from __future__ import annotations

import os
from pathlib import Path


def pid_holding_open(path: Path) -> int | None:
    """The process that has ``path`` open (Linux /proc): e.g. the job writing metrics.csv."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return int(fd_dir.parent.name)
        except OSError:  # gone, or not ours
            continue
    return None

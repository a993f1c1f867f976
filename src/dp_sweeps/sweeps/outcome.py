"""A sweep's outcome: the runs it made, and a non-zero exit when every one of them failed.

A job of a sweep or search that fails (bad input, missing data, a crash, a killed
process) is recorded in its folder's ``result.json`` with ``status: failed`` and its error,
and the sweep goes on with the others (:func:`dp_sweeps.run.task`,
:class:`dp_sweeps.sweeps.launcher.LocalLauncher`). Hydra then exits 0 whatever happened,
so a sweep in which *every* job failed (the paper's grid on a machine without the data:
135 failed runs) looked like a success. :class:`SweepOutcome`, a Hydra callback listed in
``conf/hydra/default.yaml``, reads the ``result.json`` files that this invocation wrote
under the sweep folder when the sweep ends, logs the count per status, and, when there is
at least one and all of them failed, stops the process with exit status 1 and the first
failure's error. Runs skipped because they had already finished (``trainer.resume=true``)
write nothing and do not count.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.training.results import RESULT_FILE

log = logging.getLogger(__name__)


def results_written_since(sweep_dir: Path, since: float) -> list[tuple[Path, dict]]:
    """(run folder, record) of every ``result.json`` under ``sweep_dir`` written at or
    after ``since`` (epoch seconds), oldest first."""
    found = []
    for path in sweep_dir.rglob(RESULT_FILE):
        try:
            written = path.stat().st_mtime
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if written >= since:
            found.append((written, path.parent, record))
    return [(folder, record) for _, folder, record in sorted(found, key=lambda item: item[0])]


def all_failed_message(results: list[tuple[Path, dict]]) -> Optional[str]:
    """The error line for a sweep whose every run failed (None otherwise)."""
    if not results or any(record.get("status") != "failed" for _, record in results):
        return None
    folder, record = results[0]
    error = str(record.get("error") or "no error recorded").splitlines()[0]
    return f"every job of the sweep failed ({len(results)} runs); the first, in {folder}: {error}"


class SweepOutcome(Callback):
    """Hydra callback: summarise a multirun's results and exit non-zero when all failed."""

    def __init__(self) -> None:
        self.started: Optional[float] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # File times have coarser resolution than time.time() on some file systems.
        self.started = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        if self.started is None or sweep_dir is None or not Path(str(sweep_dir)).is_dir():
            return
        results = results_written_since(Path(str(sweep_dir)), self.started)
        if not results:
            return
        counts = Counter(str(record.get("status")) for _, record in results)
        log.info("sweep %s: %d runs written: %s", sweep_dir, len(results),
                 ", ".join(f"{n} {status}" for status, n in counts.most_common()))
        message = all_failed_message(results)
        if message is not None:
            # SystemExit passes Hydra's callback wrapper, which turns exceptions into warnings.
            raise SystemExit(f"dp_sweeps: error: {message}")
        for folder, record in results:
            if record.get("status") == "failed":
                log.warning("failed: %s: %s", folder, str(record.get("error")).splitlines()[0][:300])

"""One place that writes a run's records: ``metrics.csv`` (one row per epoch) and
``result.json`` (written once, atomically, when the run ends or is planned), so a
report never reads a half-written result."""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

RESULT_FILE = "result.json"
METRICS_FILE = "metrics.csv"
# Figures computed from the private training data or its sampled batches outside any DP
# mechanism (training loss and accuracy, the number of examples sampled): they carry
# this prefix in metrics.csv and sit under this key in result.json, and exist only when
# asked for (``trainer.non_private_stats``; off by default under DP).
NON_PRIVATE = "non_private"
METRIC_FIELDS = ("epoch", "step", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "epsilon", "seconds",
                 f"{NON_PRIVATE}_train_loss", f"{NON_PRIVATE}_train_accuracy")


def non_private_stats_enabled(setting, *, private: bool) -> bool:
    """``trainer.non_private_stats``: null means off under DP and on without it."""
    return (not private) if setting is None else bool(setting)

# Statuses a result.json can carry. Only "completed" is a finished, reportable run;
# "pruned": a search trial stopped early by the study's pruner (dp_sweeps.sweeps.pruning).
STATUSES = ("completed", "diverged", "planned", "failed", "pruned")


def json_safe(value: Any) -> Any:
    """``value`` as result.json holds it: NaN becomes null, ±inf the strings "inf"/"-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_json_safe = json_safe


def write_json_atomic(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write then rename: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(_json_safe(dict(payload)), fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(run_dir: str | os.PathLike, result: Mapping[str, Any]) -> Path:
    if result.get("status") not in STATUSES:
        raise ValueError(f"unknown status {result.get('status')!r}")
    path = Path(run_dir) / RESULT_FILE
    write_json_atomic(path, result)
    return path


def read_result(run_dir: str | os.PathLike) -> dict:
    with open(Path(run_dir) / RESULT_FILE) as fh:
        return json.load(fh)


class MetricsLog:
    """Appends one row per epoch to ``metrics.csv`` (flushed, so a crash keeps the rows)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        self._writer.writeheader()

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow({k: row.get(k) for k in METRIC_FIELDS})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

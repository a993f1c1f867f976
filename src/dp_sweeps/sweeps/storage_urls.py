"""Storage URLs of the Optuna searches that need no Optuna (the report reads them too)."""

from __future__ import annotations

from pathlib import Path

from dp_sweeps.errors import ConfigError

JOURNAL_PREFIX = "journal:///"


def journal_path(url: str | None) -> Path | None:
    """The file of a ``journal:///PATH`` URL (None for any other URL)."""
    if url is None or not str(url).startswith(JOURNAL_PREFIX):
        return None
    path = str(url)[len(JOURNAL_PREFIX):]
    if not path:
        raise ConfigError(f"hydra.sweeper.storage={url!r}: give a file, e.g. journal:///outputs/optuna/study.log")
    return Path(path)

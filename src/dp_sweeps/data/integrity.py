"""Shared by the readers of published data sets: the md5 check of ``data.verify_checksums``
and torchvision's errors turned into one line."""

from __future__ import annotations

import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from torchvision.datasets.utils import check_integrity

from dp_sweeps.errors import ConfigError


def verify_md5(files: Iterable[tuple[Path, str]], *, what: str) -> None:
    """Every file must exist and match its official md5 (``data.verify_checksums=true``)."""
    for path, md5 in files:
        if not path.is_file():
            raise ConfigError(f"{what}: {path} is missing, so its official md5 cannot be checked "
                              f"(data.verify_checksums=false reads a copy without it)")
        if not check_integrity(str(path), md5):
            raise ConfigError(f"{what} file {path} fails its official md5 checksum: corrupted, or not the official "
                              f"bytes (data.verify_checksums=false reads such a copy)")


@contextmanager
def one_line_errors(what: str, root: Path) -> Iterator[None]:
    """torchvision's reading and download errors as one :class:`ConfigError` line."""
    try:
        yield
    except ConfigError:
        raise
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted.", a bad idx header
        raise ConfigError(f"{what} under {root}: {str(err).strip().splitlines()[0]}") from err
    except OSError as err:  # a failed download, or an unreadable/corrupted archive
        raise ConfigError(f"{what} under {root}: cannot read or download it ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'})") from err
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, IndexError, TypeError, AssertionError,
            UnicodeDecodeError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{what} under {root} is corrupted: cannot read it ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else 'no detail'})") from err

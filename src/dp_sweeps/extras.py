"""The optional extras of the package, and one line that names the missing one.

The core install is what one DP training run of a network needs (``python -m dp_sweeps``,
:mod:`dp_sweeps.run`); importing :mod:`dp_sweeps.run` imports no extra. The rest comes
with extras (``pip install 'dp_sweeps[NAME]'``, pyproject.toml; ``all`` has every one):

- ``search``: Optuna searches (``hparams_search=...``, :mod:`dp_sweeps.sweeps.search`);
- ``cluster``: the submitit launchers (``hydra/launcher=local|slurm``,
  :mod:`dp_sweeps.sweeps.launcher`) and PostgreSQL storages; it includes ``search``;
- ``classical``: scikit-learn and diffprivlib (``model=knn``, ``model=naive_bayes``);
- ``scatter``: kymatio (``features=scattering``);
- ``report``: pandas and matplotlib (:mod:`dp_sweeps.analysis`);
- ``tensorboard``, ``mlflow``: those loggers (``logger=tensorboard``, ``logger=mlflow``,
  :mod:`dp_sweeps.training.loggers`);
- ``dashboard``: optuna-dashboard, a web view of a search's study (docs/logging.md).

Code that needs an extra imports it through :func:`require` or inside :func:`extra`: a
package that is not installed becomes a :class:`MissingExtraError`, whose message is one
line, e.g. ``model=knn needs the 'classical' extra: pip install 'dp_sweeps[classical]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from collections.abc import Iterator, Sequence

from dp_sweeps.errors import ConfigError

# The modules each extra provides (import names), for require_extra().
EXTRAS: dict[str, tuple[str, ...]] = {
    "search": ("optuna", "sqlalchemy", "hydra_plugins.hydra_optuna_sweeper"),
    # The launcher configs register dp_sweeps' plugins through dp_sweeps.sweeps.search.
    "cluster": ("submitit", "hydra_plugins.hydra_submitit_launcher", "optuna", "sqlalchemy",
                "hydra_plugins.hydra_optuna_sweeper"),
    "classical": ("sklearn", "diffprivlib"),
    "scatter": ("kymatio",),
    "report": ("pandas", "matplotlib"),
    "tensorboard": ("tensorboard",),
    "mlflow": ("mlflow",),
    "dashboard": ("optuna_dashboard", "optuna"),
}

# Config groups that Hydra acts on before any dp_sweeps code runs (it builds the sweeper,
# the launcher and their callback first): their extra is checked on the command line.
COMMAND_LINE_GROUPS = {"hparams_search": "search", "hydra/launcher": "cluster"}
# Values of those groups that need no extra (Hydra's own defaults).
NO_EXTRA_VALUES = ("null", "basic")


class MissingExtraError(ConfigError, ImportError):
    """An optional package is not installed; ``str(err)`` is one line naming the extra."""


def missing_extra_message(name: str, *, what: str) -> str:
    return f"{what} needs the {name!r} extra: pip install 'dp_sweeps[{name}]'"


@contextlib.contextmanager
def extra(name: str, *, what: str, script: bool = False) -> Iterator[None]:
    """Imports of extra ``name`` for ``what`` (a config choice or a module): a package not
    installed raises :class:`MissingExtraError`, or with ``script`` (a module run as
    ``python -m``) exits with that line and no traceback. Other import errors pass."""
    if name not in EXTRAS:
        raise ValueError(f"unknown extra {name!r}; known: {', '.join(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as err:
        message = missing_extra_message(name, what=what)
        if script:
            raise SystemExit(f"dp_sweeps: error: {message}") from None
        raise MissingExtraError(message) from err


def require(name: str, module: str, *, what: str) -> types.ModuleType:
    """``import module`` (a package of extra ``name``), or :class:`MissingExtraError`."""
    with extra(name, what=what):
        return importlib.import_module(module)


def require_extra(name: str, *, what: str) -> None:
    """Import every module of extra ``name`` (:data:`EXTRAS`), or :class:`MissingExtraError`."""
    for module in EXTRAS[name]:
        require(name, module, what=what)


def check_command_line(args: Sequence[str]) -> None:
    """The extras that the overrides ``args`` of ``python -m dp_sweeps`` choose in
    :data:`COMMAND_LINE_GROUPS` (e.g. ``hparams_search=frontier``): checked before Hydra
    starts, which would otherwise fail with a long traceback."""
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key.startswith("~"):
            continue
        key = key.lstrip("+")
        name = COMMAND_LINE_GROUPS.get(key)
        if name is not None and value not in NO_EXTRA_VALUES:
            require_extra(name, what=f"{key}={value}")

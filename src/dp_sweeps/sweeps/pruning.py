"""Optuna pruning for the ordinary searches (``hydra.sweeper.pruner: median | hyperband``).

A trial of a search reports its validation metric (``optimized_metric``, a ``val_*``
key: never a test figure) to its study after every epoch, and stops with status
``pruned`` when the study's pruner says so. The sweeper then tells Optuna the trial was
``PRUNED`` (:mod:`dp_sweeps.sweeps.search`). This module holds the pruners and their
checks; the job's side is :mod:`dp_sweeps.sweeps.trial_pruning`. The job finds its trial
from the overrides ``search.study`` and ``search.trial`` that the sweeper gives it, and
opens the study's storage (``hydra.sweeper.storage``), so pruning needs a persistent storage (the default
sqlite file) and a single objective (Optuna cannot prune multi-objective studies).

Privacy: a pruned trial is a DP run stopped early; its ε is the accountant's for the steps
it took. Pruning changes which trials finish, so, like any selection on the validation
split, it is part of the search's cost, which no per-run ε covers (docs/sweeps.md). The
private-tuning search (``hparams_search=private_tuning``) refuses pruners.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dp_sweeps.errors import ConfigError

PRUNED = "pruned"
PRUNER_WHITELIST = ("optuna.pruners.*",)


def _median():
    import optuna

    # Optuna's defaults: no pruning in the first 5 trials, nor before a trial's first report.
    return optuna.pruners.MedianPruner()


def _hyperband():
    import optuna

    # One epoch is the smallest resource; the largest is read from the trials' reports.
    return optuna.pruners.HyperbandPruner(min_resource=1)


# The pruners a name selects; a mapping with `_target_: optuna.pruners.X` gives any other.
PRUNERS: dict[str, Callable[[], Any]] = {"median": _median, "hyperband": _hyperband}


def build_pruner(spec: Any):
    """The Optuna pruner for ``hydra.sweeper.pruner``: None, a name in :data:`PRUNERS`, or
    a mapping ``{_target_: optuna.pruners.X, ...}`` (only ``optuna.pruners`` classes)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in PRUNERS:
            raise ConfigError(f"hydra.sweeper.pruner={spec!r} is not one of: null, {', '.join(PRUNERS)} "
                              f"(or a mapping with _target_: optuna.pruners.<Class>)")
        return PRUNERS[spec]()
    from hydra.utils import instantiate

    try:
        return instantiate(spec, _execution_whitelist_=list(PRUNER_WHITELIST))
    except Exception as err:
        shown = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec
        raise ConfigError(f"hydra.sweeper.pruner={shown!r}: {str(err).splitlines()[0]}") from err


def check_pruning(*, pruner: Any, directions: list[str], storage: Any, optimized_metric: Any,
                  val_size: Any) -> None:
    """Refuse (ConfigError, one line) a pruner the search cannot use: two objectives, a
    study the trials cannot open (in memory), or a metric that is not a validation one."""
    if pruner is None:
        return
    if len(directions) != 1:
        raise ConfigError(f"hydra.sweeper.pruner={pruner!r}: Optuna cannot prune a multi-objective search "
                          f"({len(directions)} objectives); use hydra.sweeper.pruner=null")
    if storage is None:
        raise ConfigError(f"hydra.sweeper.pruner={pruner!r} needs a persistent hydra.sweeper.storage: each trial "
                          f"reports to the study from its own job")
    if not (isinstance(optimized_metric, str) and optimized_metric.startswith("val_")):
        raise ConfigError(f"hydra.sweeper.pruner={pruner!r} prunes on the per-epoch validation metric: "
                          f"optimized_metric={optimized_metric!r} must be a val_* key")
    if not val_size:
        raise ConfigError(f"hydra.sweeper.pruner={pruner!r} needs data.val_size > 0 (it never reads the test set)")
    build_pruner(pruner)

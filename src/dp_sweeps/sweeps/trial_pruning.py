"""The job's side of pruning (:mod:`dp_sweeps.sweeps.pruning`): a search trial reports
its per-epoch validation metric to its Optuna trial and stops with status ``pruned``
when the study's pruner says so.

Guarantee: only the row's ``optimized_metric`` (a ``val_*`` key, checked) is reported,
never a test figure; stopping ends training after a whole epoch, whose steps the
accountant has counted, so the run's ε is the one for the steps it took.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig

from dp_sweeps.sweeps.pruning import PRUNED, build_pruner, check_pruning
from dp_sweeps.training.loop import StopTraining

log = logging.getLogger(__name__)


class ReportToStudy:
    """An epoch callback: report ``metric`` of each epoch's row to trial ``number`` of
    ``study_name`` and raise :class:`StopTraining` (``pruned``) when the pruner says so.
    The study is opened at the first report."""

    def __init__(self, *, storage_url: str, study_name: str, number: int, pruner_spec: Any, metric: str) -> None:
        self.storage_url, self.study_name, self.number = str(storage_url), str(study_name), int(number)
        self.pruner_spec, self.metric = pruner_spec, metric
        self._trial = None

    def _open(self):
        import optuna

        from dp_sweeps.sweeps.search import storage_for

        storage = storage_for(self.storage_url)
        study = optuna.load_study(study_name=self.study_name, storage=storage, pruner=build_pruner(self.pruner_spec))
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(self.study_name), self.number)
        return optuna.trial.Trial(study, trial_id)

    def __call__(self, row: Mapping[str, Any]) -> None:
        value = row.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return  # nothing to compare (a diverged run stops by itself)
        if self._trial is None:
            self._trial = self._open()
        epoch = int(row["epoch"])
        self._trial.report(float(value), step=epoch)
        if self._trial.should_prune():
            raise StopTraining(PRUNED, f"pruned by the study's {self.pruner_spec} pruner at epoch {epoch} "
                                       f"({self.metric}={float(value):.4f})")


def trial_epoch_callbacks(cfg: DictConfig) -> list[Callable[[dict], None]]:
    """The pruning callback of a search trial whose sweeper has a pruner; none otherwise
    (a plain run, a grid sweep, a search without pruner)."""
    search = cfg.get("search") or {}
    study_name, number = search.get("study"), search.get("trial")
    if study_name is None or number is None or not str(number).isdigit():
        return []  # not a trial (or the reduced-batch search's final run, "full_scale")
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    sweeper = HydraConfig.get().sweeper
    spec = sweeper.get("pruner")
    if spec is None:
        return []
    direction = sweeper.get("direction")
    directions = list(direction) if isinstance(direction, (list, ListConfig)) else [direction]
    check_pruning(pruner=spec, directions=directions, storage=sweeper.get("storage"),
                  optimized_metric=cfg.get("optimized_metric"), val_size=cfg.data.get("val_size"))
    return [ReportToStudy(storage_url=sweeper.storage, study_name=study_name, number=int(number), pruner_spec=spec,
                          metric=str(cfg.optimized_metric))]

"""Where a run's per-epoch metrics, its hyperparameters and mechanism, and its final
record go: the ``logger`` config group (``conf/logger/``), one registered class per entry.

- ``csv``: ``metrics.csv`` (:class:`~dp_sweeps.training.results.MetricsLog`), the default;
- ``tensorboard``: event files through ``torch.utils.tensorboard.SummaryWriter`` (extra
  ``tensorboard``);
- ``mlflow``: an MLflow run through ``mlflow.MlflowClient`` (extra ``mlflow``).

``logger=[csv,tensorboard,mlflow]`` (or ``logger=many``) selects several: the training
loop sees one :class:`RunLoggers`, the ``metrics`` object it already writes rows to.

Guarantee (privacy): every logger receives exactly the rows that ``metrics.csv`` holds
(:data:`~dp_sweeps.training.results.METRIC_FIELDS`, and the ``non_private_`` columns only
when the run computed them), the composed config and the privacy plan (public: σ, q, C,
δ, accountant, engine), and the ``result.json`` record as written. Nothing else reaches a
logger, so what ``result.json`` and ``metrics.csv`` leave out (the mechanism's secret
randomness, non-private figures a run did not ask for) no logger holds either.

Hand-written because Lightning's loggers, which do this for a ``LightningModule``, do not
fit our own loop; the writing itself is the libraries' (``SummaryWriter``, ``MlflowClient``).

Sinks are opened on first use, not when :func:`open_loggers` returns: a run refused
before training leaves no logger files behind, as it leaves no ``result.json``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import EXTRAS, require, require_extra
from dp_sweeps.training.results import METRIC_FIELDS, MetricsLog, json_safe

log = logging.getLogger(__name__)

# The record's keys that describe the mechanism (the privacy plan and the engine), logged
# beside the config as the run's parameters (all public: result.json holds them).
MECHANISM_KEYS = ("private", "noise_multiplier", "sample_rate", "max_grad_norm", "delta", "target_epsilon",
                  "planned_epsilon", "accountant", "mechanism", "engine", "grad_sample_mode", "poisson_sampling",
                  "epsilon_valid", "planned_steps", "num_train", "prior_releases")
# The metrics.csv columns that index a row rather than measure something.
INDEX_FIELDS = ("epoch", "step")

LOGGERS: dict[str, Callable[..., "RunLogger"]] = {}


def register_logger(name: str) -> Callable[[type], type]:
    """Class decorator: ``logger.<name>`` in the config builds this class with the keys
    under it, plus ``run_dir`` and ``cfg`` (the composed config)."""
    def add(cls: type) -> type:
        LOGGERS[name] = cls
        return cls
    return add


class RunLogger:
    """One sink. ``log_params`` once before training, ``write`` once per epoch (a row of
    ``metrics.csv``), ``log_result`` once with the final record, ``close`` at the end
    (``ok`` false when the run raised). The defaults do nothing. An ``essential`` sink's
    errors fail the run; another's are reported and the sink is left out."""

    essential = False

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def write(self, row: Mapping[str, Any]) -> None:
        pass

    def log_result(self, result: Mapping[str, Any]) -> None:
        pass

    def close(self, *, ok: bool = True) -> None:
        pass


def metric_values(row: Mapping[str, Any]) -> dict[str, float]:
    """The measured values of a ``metrics.csv`` row that the CSV holds and that are finite
    numbers (a column the run did not compute is absent)."""
    values = {}
    for key in METRIC_FIELDS:
        value = row.get(key)
        if key in INDEX_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            values[key] = float(value)
    return values


def run_params(cfg: DictConfig, record: Mapping[str, Any]) -> dict[str, Any]:
    """The run's parameters: the composed config flattened to dotted keys (``optimizer.lr``)
    and the mechanism from the record (``noise_multiplier``, ``sample_rate``, ...)."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs a Hydra run (composed in a test)
        tree = OmegaConf.to_container(cfg, resolve=False)
    params: dict[str, Any] = {}

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            params[prefix] = node

    flatten("", {k: v for k, v in tree.items() if k != "hydra"})
    params.update({f"mechanism.{key}": record[key] for key in MECHANISM_KEYS if key in record})
    return params


def _scalar(value: Any) -> Any:
    """A parameter value as a logger's hyperparameter type (number, bool or string)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, default=str)


@register_logger("csv")
class CSVLogger(RunLogger):
    """``metrics.csv`` in the run folder, one row per epoch (what this project always wrote)."""

    essential = True  # the run's own record, as result.json is

    def __init__(self, *, run_dir: Path, cfg: DictConfig) -> None:
        self._log = MetricsLog(run_dir)

    def write(self, row: Mapping[str, Any]) -> None:
        self._log.write(row)

    def close(self, *, ok: bool = True) -> None:
        self._log.close()


@register_logger("tensorboard")
class TensorBoardLogger(RunLogger):
    """TensorBoard event files in ``<run_dir>/<save_dir>``: a scalar per metrics.csv column
    at each epoch (``epsilon`` is one), the parameters in the HParams tab and as a text
    table, and result.json as text. ``torch.utils.tensorboard`` does the writing."""

    def __init__(self, *, run_dir: Path, cfg: DictConfig, save_dir: str = "tensorboard",
                 flush_secs: int = 30) -> None:
        require_extra("tensorboard", what="logger=tensorboard")  # torch's module needs the package
        tensorboard = require("tensorboard", "torch.utils.tensorboard", what="logger=tensorboard")
        self._summary = require("tensorboard", "torch.utils.tensorboard.summary", what="logger=tensorboard")
        self.log_dir = run_dir / save_dir
        self._writer = tensorboard.SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log_params(self, params: Mapping[str, Any]) -> None:
        hparams = {key: _scalar(value) for key, value in params.items()}
        # The HParams tab: the run's parameters against the series named here.
        for summary in self._summary.hparams(hparams, {key: 0.0 for key in ("val_accuracy", "test_accuracy",
                                                                              "epsilon")}):
            self._writer.file_writer.add_summary(summary)
        table = "\n".join(f"| {key} | {value} |" for key, value in hparams.items())
        self._writer.add_text("params", f"| param | value |\n|---|---|\n{table}")

    def write(self, row: Mapping[str, Any]) -> None:
        for key, value in metric_values(row).items():
            self._writer.add_scalar(key, value, global_step=row["epoch"])

    def log_result(self, result: Mapping[str, Any]) -> None:
        text = json.dumps(json_safe(dict(result)), indent=2, sort_keys=True, default=str)
        self._writer.add_text("result.json", "\n".join(f"    {line}" for line in text.splitlines()))

    def close(self, *, ok: bool = True) -> None:
        self._writer.close()


@register_logger("mlflow")
class MLflowLogger(RunLogger):
    """An MLflow run: a metric per metrics.csv column at each epoch (``epsilon`` is one),
    the parameters as params, result.json as an artifact and the status as a tag.

    The store is ``tracking_uri``, or by default ``sqlite:///<save_dir>/mlflow.db`` with
    artifacts in ``<save_dir>/artifacts`` (MLflow 3 refuses its ``./mlruns`` file store
    unless ``MLFLOW_ALLOW_FILE_STORE=true``; a sqlite file needs no server either). The
    experiment is named after the sweep (:func:`experiment_name`)."""

    def __init__(self, *, run_dir: Path, cfg: DictConfig, tracking_uri: Optional[str] = None,
                 save_dir: str = "mlruns", experiment_name: Optional[str] = None) -> None:
        # MLflow 3 reports anonymous usage to its maintainers unless told not to; a tool for
        # private data sends nothing anywhere the user did not name (set the variable to opt in).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow = require("mlflow", "mlflow", what="logger=mlflow")
        self._entities = require("mlflow", "mlflow.entities", what="logger=mlflow")
        store = artifact_location = None
        if tracking_uri is None:
            store = Path(save_dir).resolve()
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
            artifact_location = (store / "artifacts").as_uri()
        self.tracking_uri = tracking_uri
        name = experiment_name or default_experiment_name(cfg)
        self.experiment_id = self._experiment(mlflow, name, artifact_location=artifact_location, lock_dir=store)
        tags = {"run_dir": str(run_dir.resolve())}
        search = cfg.get("search") or {}
        tags.update({f"search.{key}": str(search[key]) for key in ("study", "trial") if search.get(key) is not None})
        self.run_id = self._client.create_run(self.experiment_id, run_name=run_dir.name, tags=tags).info.run_id

    def _experiment(self, mlflow: Any, name: str, *, artifact_location: Optional[str],
                    lock_dir: Optional[Path]) -> str:
        """The experiment's id, created by the first job of a sweep to ask (jobs running in
        parallel race to create the sqlite file and the experiment: a file lock orders them)."""
        from filelock import FileLock  # comes with torch

        lock = FileLock(str(lock_dir / ".mlflow.lock")) if lock_dir is not None else None
        if lock is not None:
            lock.acquire(timeout=300)
        try:
            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)  # creates the sqlite tables
            found = self._client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException:  # on a server, another job created it first
                found = self._client.get_experiment_by_name(name)
                if found is None:
                    raise
                return found.experiment_id
        finally:
            if lock is not None:
                lock.release()

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [self._entities.Param(key, str(_scalar(value))[:6000]) for key, value in params.items()]
        for start in range(0, len(entries), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=entries[start:start + 100])

    def write(self, row: Mapping[str, Any]) -> None:
        timestamp = int(time.time() * 1000)
        metrics = [self._entities.Metric(key, value, timestamp, int(row["epoch"]))
                   for key, value in metric_values(row).items()]
        if metrics:
            self._client.log_batch(self.run_id, metrics=metrics)

    def log_result(self, result: Mapping[str, Any]) -> None:
        self._client.log_dict(self.run_id, json.loads(json.dumps(json_safe(dict(result)), default=str)),
                              "result.json")
        self._client.set_tag(self.run_id, "status", str(result.get("status")))

    def close(self, *, ok: bool = True) -> None:
        self._client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")


def default_experiment_name(cfg: DictConfig) -> str:
    """A search's study name; else a multirun's sweep folder relative to
    ``paths.output_dir`` (every job of one sweep shares it); else ``experiment_name``;
    else ``"dp_sweeps"``."""
    search = cfg.get("search") or {}
    if search.get("study"):
        return str(search["study"])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep_dir = Path(str(hydra_cfg.sweep.dir)).resolve()
            base = Path(str(cfg.paths.output_dir)).resolve()
            return str(sweep_dir.relative_to(base)) if sweep_dir.is_relative_to(base) else str(sweep_dir)
    except ValueError:  # composed outside a Hydra run
        pass
    return str(cfg.get("experiment_name") or "dp_sweeps")


class RunLoggers:
    """The loggers ``cfg.logger`` selects, as one: what the training loop receives as
    ``metrics`` (``write(row)``, ``close()``), plus ``log_params`` and ``log_result``.

    The sinks are built on first use (see the module docstring); a logger that fails
    while the run goes on is reported and then left out, so that a full disk or an
    unreachable MLflow server cannot fail a run whose ``result.json`` is fine."""

    def __init__(self, cfg: DictConfig, *, run_dir: str | os.PathLike) -> None:
        self._cfg = cfg
        self._run_dir = Path(run_dir)
        selected = cfg.get("logger") or {}
        unknown = sorted(set(selected) - set(LOGGERS))
        if unknown:
            raise ConfigError(f"logger.{unknown[0]}: unknown logger; known: {', '.join(sorted(LOGGERS))}")
        self._settings = {name: {} if selected[name] is None else OmegaConf.to_container(selected[name], resolve=True)
                          for name in selected}
        for name, settings in self._settings.items():
            accepted = set(inspect.signature(LOGGERS[name]).parameters) - {"run_dir", "cfg"}
            for key in settings:
                if key not in accepted:
                    raise ConfigError(f"logger.{name}.{key}: unknown setting; known: {', '.join(sorted(accepted))}")
        self._sinks: Optional[dict[str, RunLogger]] = None

    @property
    def names(self) -> list[str]:
        return list(self._settings)

    def _open(self) -> dict[str, RunLogger]:
        if self._sinks is None:
            self._sinks = {}
            for name, settings in self._settings.items():
                try:
                    self._sinks[name] = LOGGERS[name](run_dir=self._run_dir, cfg=self._cfg, **settings)
                except Exception as err:
                    if LOGGERS[name].essential:
                        raise
                    log.error("logger %s could not start and is left out: %s", name, err)
        return self._sinks

    def __enter__(self) -> "RunLoggers":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(ok=exc_type is None)

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for name, sink in list(self._open().items()):
            try:
                getattr(sink, method)(*args, **kwargs)
            except Exception as err:
                if sink.essential:
                    raise
                log.error("logger %s failed in %s and is left out: %s", name, method, err)
                self._sinks.pop(name, None)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def write(self, row: Mapping[str, Any]) -> None:
        self._each("write", row)

    def log_result(self, result: Mapping[str, Any]) -> None:
        """The final record, to the sinks the run opened: a run that trained nothing through
        these loggers (a dry run, a classical model) gets no logger files for its record."""
        if self._sinks:
            self._each("log_result", result)

    def close(self, *, ok: bool = True) -> None:
        """Close every sink that was opened (nothing is created here)."""
        for name, sink in (self._sinks or {}).items():
            try:
                sink.close(ok=ok)
            except Exception as err:
                log.error("logger %s failed to close: %s", name, err)
        self._sinks = {}


def open_loggers(cfg: DictConfig, *, run_dir: str | os.PathLike) -> RunLoggers:
    """The loggers of ``cfg.logger`` for the run in ``run_dir``: unknown names and missing
    extras are refused here (a :class:`ConfigError`, one line), before any training;
    nothing is written until the first call."""
    loggers = RunLoggers(cfg, run_dir=run_dir)
    for name in loggers.names:
        if name in EXTRAS:  # the extra of the same name (tensorboard, mlflow)
            require_extra(name, what=f"logger={name}")
    return loggers

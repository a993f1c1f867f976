"""Optuna search through Hydra's Optuna sweeper, made resumable and shareable.

The stock ``hydra-optuna-sweeper`` (1.4.0rc3) runs ``n_trials`` *more* trials on every
invocation, cannot open a sqlite file whose folder does not exist yet, silently reuses
a study whose directions differ, and re-samples the same points when a seeded search is
resumed. :class:`ResumableOptunaSweeper` keeps its configuration keys and its search
space syntax and changes only the loop:

- ``n_trials`` is the size of the *study*: a search run again asks only for the trials
  it still lacks, so an interrupted search resumes where it stopped and a finished one
  does nothing. Trials of every state count (complete, failed, pruned, running).
- Several processes (or machines) on one storage share that budget: each counts the
  study's trials before every batch it asks for, and the count and the ask are atomic
  (:func:`ask_lock`: a file lock on a sqlite file, an advisory lock on PostgreSQL, a
  symlink lock beside a journal file), so together they run exactly ``n_trials``. The
  storage numbers trials uniquely. Storages: ``sqlite:///PATH`` (one machine), any
  SQLAlchemy database URL (``postgresql://...``: several machines), and
  ``journal:///PATH`` (Optuna's journal file, for a shared file system without a
  database server; :func:`storage_for`).
  On a database, running trials send a heartbeat; a trial whose process died is marked
  failed after :data:`GRACE_SECONDS`, so it neither blocks the budget nor stays "running"
  forever (a journal file has no heartbeats).
- Each worker's sampler gets its own seed: ``seed`` + the number of the first trial the
  worker asks for (:class:`WorkerSeededSampler`). Trial numbers are unique in a storage,
  so no two workers propose the same points, and a resumed seeded search does not replay
  its first suggestions.
- A trial whose run failed, diverged or returned a non-finite value is told ``FAIL``
  (with the run's status and error as user attributes) and the search goes on.
- ``hydra.sweeper.pruner`` (``median``, ``hyperband``, or ``{_target_: optuna.pruners.X}``)
  lets each trial report its per-epoch validation metric and stop early
  (:mod:`dp_sweeps.sweeps.pruning`); a trial that stopped so is told ``PRUNED``. Refused
  for two objectives.
- ``search.batch_scale`` k > 1 (reduced-batch search, :mod:`dp_sweeps.sweeps.reduced_batch`):
  trials run at B/k with σ/k; once the study is complete the best hyperparameters are
  trained once at full scale into ``trial_full_scale/``.
- Each trial runs with the overrides ``search.study=<name> search.trial=<number>``, so its
  folder (``hydra.sweep.subdir``) and its ``.hydra/overrides.yaml`` name it; the trial
  records its ``run_dir`` in turn. :mod:`dp_sweeps.analysis.report` joins the two.

Hydra finds sweepers only under ``hydra_plugins/`` or through entry points, so the
search configs list :class:`RegisterSweeper` under ``hydra.callbacks``: Hydra builds
callbacks before the sweeper, and building this one registers the class (and the
launchers of :mod:`dp_sweeps.sweeps.launcher`, whose configs list it too).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import logging
import math
import os
import socket
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import MissingExtraError, extra, missing_extra_message
from dp_sweeps.sweeps.pruning import PRUNED, build_pruner, check_pruning
from dp_sweeps.sweeps.reduced_batch import FULL_SCALE_TRIAL, batch_scale
from dp_sweeps.sweeps.storage_urls import journal_path
from dp_sweeps.training.results import RESULT_FILE
from dp_sweeps.validation import check_tuning_metric

with extra("search", what="an Optuna search (hparams_search=..., dp_sweeps.sweeps.search)"):
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
    from optuna.trial import TrialState

log = logging.getLogger(__name__)

# sqlite allows one writer at a time; a process waits this long for the lock.
SQLITE_TIMEOUT_SECONDS = 120
# A running trial records a heartbeat this often; one silent for GRACE_SECONDS is failed.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# The states that use up a study's budget of n_trials.
COUNTED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.RUNNING)
SAMPLER_WHITELIST = ("hydra_plugins.hydra_optuna_sweeper.*", "optuna.samplers.*")

# The PostgreSQL advisory lock that serialises "count the trials, ask for one" (any 64-bit key).
PG_ASK_LOCK_KEY = zlib.crc32(b"dp_sweeps.sweeps.search.ask_lock")


def storage_for(url: str | None) -> optuna.storages.BaseStorage | None:
    """An Optuna storage for ``url``: ``None`` (in memory, lost at exit) stays ``None``.

    - ``sqlite:///PATH``: the folder of PATH is created, and writers wait
      :data:`SQLITE_TIMEOUT_SECONDS` for the file lock instead of failing.
    - ``journal:///PATH`` (PATH relative, or absolute as ``journal:////abs/path.log``, as
      for sqlite): Optuna's journal file storage (``JournalStorage(JournalFileBackend)``,
      with its NFS-safe symlink lock), for workers on a shared file system where no
      database server is at hand. Its folder is created.
    - any other SQLAlchemy URL (``postgresql://USER@HOST:PORT/DB``, the password in
      ``~/.pgpass`` or ``PGPASSWORD`` rather than in the URL, which runs record): a database
      server that every worker reaches (:func:`database_url` picks the installed driver).

    Database storages get heartbeats (:data:`HEARTBEAT_SECONDS`), so trials of a dead
    process can be failed; the journal storage has none.
    """
    if url is None:
        return None
    url = str(url)
    if (journal := journal_path(url)) is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    url = database_url(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        if (path := _sqlite_path(url)) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_SECONDS}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a database server may drop idle connections
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                                          grace_period=GRACE_SECONDS)


def database_url(url: str) -> str:
    """``url`` with the PostgreSQL driver that is installed: SQLAlchemy >= 2.1 reads a bare
    ``postgresql://`` as psycopg 3, but dp_sweeps depends on psycopg2 (``psycopg2-binary``).
    An explicit driver (``postgresql+psycopg://``) is kept. With neither driver installed,
    a one-line :class:`~dp_sweeps.extras.MissingExtraError` names the ``cluster`` extra."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        if importlib.util.find_spec("psycopg2") is None:
            raise MissingExtraError(missing_extra_message("cluster", what="a PostgreSQL storage (postgresql://...)"))
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


@contextlib.contextmanager
def ask_lock(url: str | None) -> Iterator[None]:
    """Make "count the study's trials, then ask for one" atomic across every process that
    shares the storage ``url``, so that together they run exactly ``n_trials``:

    - sqlite: an exclusive ``flock`` on ``<file>.lock`` (the processes of one machine);
    - PostgreSQL: a session advisory lock (:data:`PG_ASK_LOCK_KEY`) on the server, released
      by the server if the process dies;
    - journal file: Optuna's symlink lock on ``<file>.ask.lock`` (works on NFS; a lock left
      by a dead process is broken after 30 s).

    Other databases get no lock: workers asking at the same instant may then add one trial
    each beyond ``n_trials`` (the storage still numbers trials uniquely).
    """
    if (journal := journal_path(url)) is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        lock = optuna.storages.journal.JournalFileSymlinkLock(f"{journal}.ask")
        lock.acquire()
        try:
            yield
        finally:
            with contextlib.suppress(RuntimeError):  # broken by another process after its grace period
                lock.release()
        return
    if url is not None and str(url).startswith("postgresql"):
        import sqlalchemy

        with _lock_engine(str(url)).connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": PG_ASK_LOCK_KEY})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": PG_ASK_LOCK_KEY})
                connection.commit()
        return
    path = _sqlite_path(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def _lock_engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(database_url(url), pool_pre_ping=True, pool_size=1)


def _sqlite_path(url: str | None) -> Path | None:
    if url is None or not str(url).startswith("sqlite:///"):
        return None
    path = str(url)[len("sqlite:///"):]
    return None if not path or path == ":memory:" else Path(path)


def worker_name() -> str:
    """``host:pid`` of this process, recorded on each trial it runs (user attribute ``worker``)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerSeededSampler(optuna.samplers.BaseSampler):
    """A sampler built at this worker's first trial and seeded ``base_seed`` + that trial's
    number; then it delegates every call to it.

    Workers with the same seed propose the same points, so a seed given once to several
    workers must become one seed per worker. The storage numbers trials uniquely and
    atomically, so the number of a worker's first trial is a worker id that needs no
    coordination: two workers on one study never share a seed, a worker alone on a new
    study gets exactly ``base_seed`` (reproducible), and a resumed search (first trial
    number = the trials it already has) does not replay its first suggestions.
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], *, base_seed: int) -> None:
        self._build = build
        self.base_seed = int(base_seed)
        self.seed: int | None = None
        self._sampler: optuna.samplers.BaseSampler | None = None

    @property
    def sampler(self) -> optuna.samplers.BaseSampler:
        if self._sampler is None:
            raise RuntimeError("the sampler is built at this worker's first trial (before_trial)")
        return self._sampler

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self._sampler is None:
            self.seed = self.base_seed + trial.number
            self._sampler = self._build(self.seed)
            log.info("sampler %s seeded %d (hydra.sweeper.sampler.seed=%d + first trial %d)",
                     type(self._sampler).__name__, self.seed, self.base_seed, trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial):
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space):
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution):
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if self._sampler is not None:
            self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._sampler is not None:
            self._sampler.reseed_rng()


def open_study(*, storage: optuna.storages.BaseStorage | str | None, study_name: str | None,
               directions: Sequence[str], sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    """Create the study, or load it with its trials; refuse one whose directions differ
    (Optuna would silently keep the stored ones and mix two searches)."""
    directions = [str(d).lower() for d in directions]
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler,
                                directions=directions, load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise ConfigError(f"hydra.sweeper.direction={directions} but study {study.study_name!r} in that "
                          f"storage was created with {stored}: choose another hydra.sweeper.study_name")
    return study


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget, after failing those whose process stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return len(study.get_trials(deepcopy=False, states=COUNTED_STATES))


def trial_outcome(return_value: Any, *, n_objectives: int) -> tuple[TrialState, list[float] | None, str | None]:
    """(state, values, reason) for a task's return value: ``FAIL`` unless it holds
    ``n_objectives`` finite numbers (the task returns NaN for failed or diverged runs)."""
    raw = [return_value] if n_objectives == 1 else return_value
    try:
        values = [float(v) for v in raw]
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"objective {return_value!r} is not {n_objectives} number(s)"
    if len(values) != n_objectives:
        return TrialState.FAIL, None, f"objective {return_value!r} has {len(values)} values, expected {n_objectives}"
    if not all(math.isfinite(v) for v in values):
        return TrialState.FAIL, None, f"non-finite objective {values} (the run failed or diverged)"
    return TrialState.COMPLETE, values, None


def last_override_wins(overrides: Sequence[str]) -> list[str]:
    """Keep the last override of each key, as Hydra does (the stock sweeper lets a fixed
    value beat a search range whatever their order, so ``trainer.batch_size=64
    'trainer.batch_size=choice(32,64)'`` would not search)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    last = {o.get_key_element(): i for i, o in enumerate(parsed) if not o.is_delete()}
    return [o.input_line for i, o in enumerate(parsed)
            if o.is_delete() or last[o.get_key_element()] == i]


class _Heartbeat:
    """Records a heartbeat for ``trial_ids`` every ``heartbeat_interval`` of the study's
    storage (:data:`HEARTBEAT_SECONDS` for :func:`storage_for`) while open."""

    def __init__(self, study: optuna.Study, trial_ids: Sequence[int]) -> None:
        storage = study._storage  # Optuna wraps an RDBStorage in a cache that forwards heartbeats
        self._interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        self._storage = storage if self._interval else None
        self._trial_ids = list(trial_ids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="optuna-heartbeat")

    def _beat(self) -> None:
        while True:
            for trial_id in self._trial_ids:
                try:
                    self._storage.record_heartbeat(trial_id)
                except Exception as err:  # a missed beat must not kill the trial
                    log.debug("heartbeat for trial %d failed: %s", trial_id, err)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "_Heartbeat":
        if self._storage is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _run_record(ret: Any) -> dict[str, Any]:
    """The trial's run folder and what its result.json says: status, error, the ε spent and
    whether it is valid, the mechanism (σ, q, C, δ, accountant), the test accuracy. Shown
    as the trial's user attributes, e.g. by optuna-dashboard (docs/logging.md)."""
    try:
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
    except Exception:
        return {}
    record: dict[str, Any] = {"run_dir": str(run_dir.resolve())}
    try:
        result = OmegaConf.to_container(OmegaConf.load(run_dir / RESULT_FILE))
    except Exception:
        return record
    for key in ("status", "error", "epsilon", "epsilon_valid", "mechanism", "noise_multiplier", "sample_rate",
                "max_grad_norm", "delta", "accountant", "batch_scale", "epochs_completed", "test_accuracy"):
        if result.get(key) is not None:
            record[key] = str(result[key])[:500] if key == "error" else result[key]
    return record


class _ResumableSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler_config: DictConfig | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(None, *args, **kwargs)
        self.sampler_config = sampler_config
        self.pruner_config: Any | None = None  # hydra.sweeper.pruner

    def _make_sampler(self, *, search_space: dict) -> optuna.samplers.BaseSampler | None:
        """The configured sampler; a seeded one becomes a :class:`WorkerSeededSampler`, so
        that each worker (and each resumption) samples with its own seed."""
        if self.sampler_config is None:
            return None
        grid: dict[str, list] | None = None

        def build(seed: int | None) -> optuna.samplers.BaseSampler:
            overrides = {} if seed is None else {"seed": seed}
            sampler = instantiate(self.sampler_config, _execution_whitelist_=SAMPLER_WHITELIST, **overrides)
            return sampler(grid) if grid is not None else sampler

        probe = instantiate(self.sampler_config, _execution_whitelist_=SAMPLER_WHITELIST)
        if getattr(probe, "func", None) is optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(dist) for name, dist in search_space.items()}
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        seed = self.sampler_config.get("seed")
        return build(None) if seed is None else WorkerSeededSampler(build, base_seed=int(seed))

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except ConfigError as err:  # bad search input: one line, before any trial
            raise SystemExit(f"dp_sweeps: error: {err}") from None

    def _sweep(self, arguments: list[str]) -> None:
        check_tuning_metric(self.config)
        self._process_searchspace_config()
        params_conf = last_override_wins(self._parse_sweeper_params_config() + list(arguments))
        search_space, fixed_params, fixed_overrides = create_params_from_overrides(params_conf)
        for name in fixed_params:
            search_space.pop(name, None)
        directions = self._get_directions()
        check_pruning(pruner=self.pruner_config, directions=directions, storage=self.storage,
                      optimized_metric=self.config.get("optimized_metric"),
                      val_size=self.config.data.get("val_size") if "data" in self.config else None)
        with ask_lock(self.storage):  # processes starting together would race to create the tables
            study = open_study(storage=storage_for(self.storage), study_name=self.study_name, directions=directions)
        existing = len(study.get_trials(deepcopy=False))
        self.sampler = self._make_sampler(search_space=search_space) or study.sampler
        study.sampler = self.sampler
        if self.pruner_config is not None:  # the trials' jobs build the same pruner (dp_sweeps.sweeps.pruning)
            study.pruner = build_pruner(self.pruner_config)
        self._name_metrics(study, len(directions))
        if existing:
            self._warn_on_changed_settings(study, fixed_params)
        log.info("Study %r (%s), %d trial(s) so far; budget n_trials=%d; directions %s; sampler %s",
                 study.study_name, self.storage or "in memory", existing, self.n_trials, directions,
                 type(self.sampler).__name__)

        launched, crash = 0, None
        while True:
            with ask_lock(self.storage), warnings.catch_warnings():
                # Heartbeats with ask/tell are deliberate here (Optuna expects optimize()).
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                remaining = self.n_trials - counted_trials(study)
                trials = [study.ask() for _ in range(min(max(remaining, 0), self.n_jobs))]
            if not trials:
                break
            for trial in trials:  # which worker ran it, and with which sampler seed
                trial.set_user_attr("worker", worker_name())
                if isinstance(self.sampler, WorkerSeededSampler):
                    trial.set_user_attr("sampler_seed", self.sampler.seed)
            with _Heartbeat(study, [t._trial_id for t in trials]):
                overrides = [tuple(o) + (f"search.study={study.study_name}", f"search.trial={t.number}")
                             for o, t in zip(self._configure_trials(trials, search_space, fixed_params,
                                                                    fixed_overrides), trials)]
                try:
                    returns = list(self.launcher.launch(overrides, initial_job_idx=self.job_idx))
                except Exception as err:  # e.g. a search-space value that does not compose
                    log.error("launching trial(s) %s failed: %s", [t.number for t in trials], err)
                    returns = []
                    crash = err
            self.job_idx += len(trials)
            launched += len(trials)
            crashes = 0
            for index, trial in enumerate(trials):
                if index < len(returns):
                    ret = returns[index]
                    try:
                        value = ret.return_value
                    except Exception as err:  # the task raised
                        value, crashes = err, crashes + 1
                    record = _run_record(ret)
                else:
                    value, record, crashes = crash, {}, crashes + 1
                state, values, reason = (trial_outcome(value, n_objectives=len(directions))
                                         if not isinstance(value, BaseException)
                                         else (TrialState.FAIL, None, f"{type(value).__name__}: {value}"))
                if record.get("status") == PRUNED:  # stopped by the pruner: Optuna keeps its last report
                    state, values, reason = TrialState.PRUNED, None, None
                for key, item in {**record, **({"fail_reason": reason[:500]} if reason else {})}.items():
                    trial.set_user_attr(key, item)
                if state == TrialState.FAIL:
                    log.warning("trial %d failed: %s", trial.number, reason)
                try:
                    study.tell(trial, values=values, state=state)
                except RuntimeError as err:  # GridSampler asks the study to stop once the grid is done
                    if "Study.stop" not in str(err):
                        raise
            if crashes / len(trials) > self.max_failure_rate:
                raise RuntimeError(f"{crashes} of {len(trials)} trial(s) crashed, more than "
                                   f"hydra.sweeper.max_failure_rate={self.max_failure_rate}")
        log.info("This process ran %d trial(s); the study has %d", launched, len(study.trials))
        full_scale = self._run_full_scale(study, fixed_params, fixed_overrides, n_objectives=len(directions))
        self._save_results(study, len(directions), full_scale=full_scale)

    def _run_full_scale(self, study: optuna.Study, fixed_params: dict[str, Any], fixed_overrides: list[str], *,
                        n_objectives: int) -> dict[str, Any] | None:
        """A reduced-batch search (``search.batch_scale`` > 1) whose budget is spent trains its
        best hyperparameters once at full scale (``search.batch_scale=1``) into
        ``trial_full_scale/``; a finished one is not run again. Returns its record."""
        if batch_scale(self.config) == 1 or n_objectives != 1:
            return None
        if counted_trials(study) < self.n_trials or not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return None  # other workers' trials still running, or nothing to scale up
        run_dir = Path(str(self.config.hydra.sweep.dir)) / f"trial_{FULL_SCALE_TRIAL}"
        result_path = run_dir / RESULT_FILE
        if not (result_path.is_file() and OmegaConf.load(result_path).get("status") == "completed"):
            best = study.best_trial
            params = {**best.params, **fixed_params}
            overrides = (tuple(f"{name}={value}" for name, value in params.items()) + tuple(fixed_overrides)
                         + (f"search.study={study.study_name}", f"search.trial={FULL_SCALE_TRIAL}",
                            "search.batch_scale=1"))
            log.info("reduced-batch search: training the best trial %d's hyperparameters at full scale", best.number)
            self.launcher.launch([overrides], initial_job_idx=self.job_idx)
            self.job_idx += 1
        if not result_path.is_file():
            return {"run_dir": str(run_dir.resolve()), "status": "no_result"}
        result = OmegaConf.to_container(OmegaConf.load(result_path))
        return {"run_dir": str(run_dir.resolve()), "best_trial": study.best_trial.number,
                **{key: result.get(key) for key in ("status", "val_accuracy", "test_accuracy", "epsilon",
                                                    "batch_size", "epochs", "noise_multiplier")}}

    def _name_metrics(self, study: optuna.Study, n_objectives: int) -> None:
        metric = self.config.get("optimized_metric")
        names = [metric] if isinstance(metric, str) else list(metric or [])
        if len(names) == n_objectives and not study.metric_names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names([str(n) for n in names])

    @staticmethod
    def _warn_on_changed_settings(study: optuna.Study, fixed_params: dict[str, Any]) -> None:
        earlier = next((t.user_attrs for t in reversed(study.get_trials(deepcopy=False))), {})
        changed = {k: (earlier.get(k), v) for k, v in fixed_params.items()
                   if k in earlier and str(earlier[k]) != str(v)}
        if changed:
            log.warning("resuming study %r with other fixed settings than its last trial %s: its trials "
                        "are then not comparable; pick a new hydra.sweeper.study_name unless intended",
                        study.study_name, {k: f"{a} -> {b}" for k, (a, b) in changed.items()})

    def _save_results(self, study: optuna.Study, n_objectives: int, *, full_scale: dict | None = None) -> None:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        summary: dict[str, Any] = {"name": "optuna", "study_name": study.study_name,
                                   "storage": str(self.storage), "n_trials": len(study.trials),
                                   "n_complete": len(completed),
                                   "n_pruned": len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
                                   "note": "each trial's epsilon is its own run's; the search's cost is not included"}
        if not completed:
            log.warning("no trial of study %r completed", study.study_name)
        elif n_objectives == 1:
            best = study.best_trial
            summary.update(best_trial=best.number, best_params=best.params, best_value=best.value)
            log.info("Best trial %d: value %s, params %s", best.number, best.value, best.params)
        else:
            summary["solutions"] = [{"trial": t.number, "params": t.params, "values": t.values}
                                    for t in study.best_trials]
            log.info("Pareto set: %d trial(s)", len(summary["solutions"]))
        if full_scale is not None:  # reduced-batch search: the best trial trained at full scale
            summary["full_scale_run"] = full_scale
            summary["note"] += ("; trials ran at search.batch_scale, their epsilon is not the full-scale run's "
                                "(compute saving, not a privacy one)")
        path = Path(str(self.config.hydra.sweep.dir)) / "optimization_results.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(summary), path)


class ResumableOptunaSweeper(OptunaSweeper):
    """``hydra/sweeper: optuna`` with the resumable, shared-budget loop described above.
    Same keys as the stock sweeper (``n_trials`` counts the whole study)."""

    def __init__(self, sampler: Any, direction: Any, storage: Any | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, custom_search_space: str | None,
                 params: DictConfig | None, pruner: Any | None = None) -> None:
        # The sampler is built in sweep(), once the study size (its seed offset) is known.
        self.sweeper = _ResumableSweeperImpl(sampler, direction, storage, study_name, n_trials, n_jobs,
                                             max_failure_rate, custom_search_space, params)
        self.sweeper.pruner_config = pruner


class RegisterSweeper(Callback):
    """A Hydra callback whose construction registers dp_sweeps' Hydra plugins:
    :class:`ResumableOptunaSweeper` and the launchers of :mod:`dp_sweeps.sweeps.launcher` (the
    search configs and ``hydra/launcher=slurm|local`` list it under ``hydra.callbacks``)."""

    def __init__(self) -> None:
        from dp_sweeps.sweeps.launcher import LAUNCHERS

        for plugin in (ResumableOptunaSweeper, *LAUNCHERS):
            Plugins.instance().register(plugin)

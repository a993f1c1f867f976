"""Cluster launchers: hydra-submitit-launcher's, with requeued jobs that resume.

``hydra/launcher=slurm`` and ``hydra/launcher=local`` (conf/hydra/launcher/) run each job
of a sweep or search as a submitit job: a SLURM job array, or processes on this machine.
When SLURM preempts a job, or the job nears its time limit, submitit signals it, asks the
launcher's ``checkpoint()`` for the job to resubmit, and requeues it (time-outs at most
``max_num_timeout`` times; preemptions always). The stock ``checkpoint()`` resubmits the
job exactly as it was, so a training run would start again from its first epoch. Here:

- ``checkpoint()`` resubmits the job with ``trainer.resume=true`` added: the requeued job
  continues its own run folder from its last checkpoint, and one that had finished is not
  run again (:func:`dp_sweeps.run.run`).
- ``launch()`` gives every job ``trainer.checkpoint_every=1`` unless the config or the
  job's overrides set it, so that there is a checkpoint to continue from.

No privacy is spent twice: a checkpoint holds every random-generator state
(:mod:`dp_sweeps.training.checkpoint`), so the steps redone after the last checkpoint replay the
computation whose result the interrupted job never released, and the ε of the resumed
run is the accountant's for the steps of one run.

A job that dies without writing its result (killed, out of memory, a crashed
interpreter) does not stop the sweep: the launcher waits for every job of the batch,
writes ``status: failed`` with submitit's reason into the lost job's ``result.json``, and
hands the sweeper the same value as for any failed run (the plugin's own ``launch()``
raised at the first such job and dropped the rest). A sweep in which every job failed
exits non-zero (:mod:`dp_sweeps.sweeps.outcome`).

``hydra/launcher=local`` runs the jobs handed over at once side by side on one machine
(``hydra.sweeper.max_batch_size`` of a grid, ``n_jobs`` of a search), sharing its device:
``trainer.device=auto`` is resolved once, here, and every job gets that device as an
override (``trainer.device=cuda`` when this machine has a GPU), so a job that cannot reach
the GPU fails instead of training on the CPU. On a CPU the jobs split the cores
(``OMP_NUM_THREADS``, unless set). docs/cluster.md says when running jobs side by side pays.

Jobs are single-process: ``tasks_per_node`` and ``nodes`` must be 1 (a multi-GPU run is
one ``torchrun`` command; see docs/cluster.md).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from dp_sweeps.extras import extra

with extra("cluster", what="hydra/launcher=local|slurm (dp_sweeps.sweeps.launcher)"):
    import submitit  # noqa: F401 (the plugin imports it only when it launches: checked here)
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

log = logging.getLogger(__name__)

RESUME_OVERRIDE = "trainer.resume=true"
CHECKPOINT_KEY = "trainer.checkpoint_every"


DEVICE_KEY = "trainer.device"


def pinned_device(configured: Any) -> str | None:
    """The device every local job gets: ``auto`` resolved on this machine (``cuda`` when
    torch sees a GPU, else ``cpu``); None when the config names a device itself."""
    if configured != "auto":
        return None
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def with_device(overrides: Sequence[str], device: str) -> list[str]:
    """``overrides`` plus ``trainer.device=<device>`` unless they set it."""
    if any(_key(o) == DEVICE_KEY for o in overrides):
        return list(overrides)
    return [*overrides, f"{DEVICE_KEY}={device}"]


def failed_objective(optimized_metric: Any) -> Any:
    """What :func:`dp_sweeps.run.objective` gives a sweeper for a failed run: NaN per metric."""
    if optimized_metric is None or isinstance(optimized_metric, str):
        return math.nan
    return tuple(math.nan for _ in optimized_metric)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_resume(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``trainer.resume=true`` (replacing any other ``trainer.resume``)."""
    return [o for o in overrides if _key(o) != "trainer.resume"] + [RESUME_OVERRIDE]


def with_checkpoints(overrides: Sequence[str], *, config_checkpoint_every: Any) -> list[str]:
    """``overrides`` plus ``trainer.checkpoint_every=1`` when neither they nor the config
    (``config_checkpoint_every``) ask for checkpoints."""
    if config_checkpoint_every or any(_key(o) == CHECKPOINT_KEY for o in overrides):
        return list(overrides)
    return [*overrides, f"{CHECKPOINT_KEY}=1"]


class _ResumeOnRequeue:
    """Mixin for hydra-submitit-launcher's launchers (see the module docstring)."""

    params: dict[str, Any]
    config: DictConfig | None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        tasks = int(self.params.get("tasks_per_node") or 1) * int(self.params.get("nodes") or 1)
        if tasks != 1:
            raise SystemExit(f"dp_sweeps: error: hydra.launcher.tasks_per_node={self.params.get('tasks_per_node')} "
                             f"and nodes={self.params.get('nodes')}: each job is one process; for a multi-GPU "
                             f"run use torchrun --nproc_per_node=N -m dp_sweeps ...")
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)  # type: ignore[misc]
        # The plugin resolved submitit_folder (${hydra.sweep.dir}/...) when it was built, apart
        # from the run's config, so a ${now:...} in the sweep folder got another time stamp and
        # the logs landed in a sibling folder: resolve it again against the run's config.
        folder = OmegaConf.select(config, "hydra.launcher.submitit_folder")
        if folder is not None:
            self.params["submitit_folder"] = str(folder)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        every = OmegaConf.select(self.config, CHECKPOINT_KEY, default=0)
        job_overrides = [with_checkpoints(o, config_checkpoint_every=every) for o in job_overrides]
        job_overrides = self.job_overrides(job_overrides)
        jobs = self._submit(job_overrides, initial_job_idx)
        returns = []
        for k, (job, overrides) in enumerate(zip(jobs, job_overrides)):
            try:
                returns.append(job.results()[0])
            except Exception as err:  # submitit's UncompletedJobError / FailedJobError: the job died
                returns.append(self._record_lost_job(overrides, initial_job_idx + k, err))
        return returns

    def job_overrides(self, job_overrides: list[list[str]]) -> list[list[str]]:
        """Per-launcher additions to each job's overrides (none here)."""
        return job_overrides

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """Submit the jobs as the plugin's ``launch()`` does; return submitit's jobs
        without waiting for them (the plugin's ``launch()`` waits and raises at the first
        job that died)."""
        import submitit

        assert self.config is not None
        init_keys = {"max_num_timeout", "python"}
        init_params = {"folder": self.params["submitit_folder"],
                       **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)  # type: ignore[attr-defined]
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base_keys else f"{self._EXECUTOR}_{k}": v  # type: ignore[attr-defined]
                                      for k, v in self.params.items() if k not in init_keys | {"submitit_folder"}})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)  # type: ignore[attr-defined]
        job_params = []
        for k, overrides in enumerate(job_overrides):
            idx = initial_job_idx + k
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        return executor.map_array(self, *zip(*job_params))

    def _record_lost_job(self, overrides: Sequence[str], job_num: int, err: Exception) -> JobReturn:
        """A job that died without returning: ``status: failed`` in its ``result.json``
        (unless it wrote its own failure), and the value a failed run gives the sweeper."""
        from dp_sweeps.training.results import RESULT_FILE, read_result, write_result

        reason = f"job died: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))  # type: ignore
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
            config.hydra.job.id = f"job_id_for_{job_num}"
        job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        previous = read_result(job_dir) if (job_dir / RESULT_FILE).is_file() else {}
        if previous.get("status") != "failed":
            write_result(job_dir, {"status": "failed", "error": reason[:2000],
                                   "model": OmegaConf.select(config, "model.name")})
        log.error("job #%d (%s) died: %s", job_num, " ".join(filter_overrides(overrides)), reason[:500])
        return JobReturn(overrides=list(overrides), cfg=config, working_dir=str(job_dir), status=JobStatus.COMPLETED,
                         _return_value=failed_objective(config.get("optimized_metric")))

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """Called by submitit in a job about to be requeued: the same job, resuming."""
        return super().checkpoint(with_resume(sweep_overrides), *args, **kwargs)  # type: ignore[misc]


class SlurmLauncher(_ResumeOnRequeue, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: a SLURM job array whose requeued jobs resume."""


class LocalLauncher(_ResumeOnRequeue, submitit_launcher.LocalLauncher):
    """``hydra/launcher=local``: jobs as processes on this machine (submitit's local
    executor: the same code path as on SLURM, requeue included), side by side on one
    device (module docstring)."""

    def job_overrides(self, job_overrides: list[list[str]]) -> list[list[str]]:
        device = pinned_device(OmegaConf.select(self.config, DEVICE_KEY, default="auto"))
        if device is not None:
            job_overrides = [with_device(o, device) for o in job_overrides]
        if device == "cpu" and len(job_overrides) > 1 and "OMP_NUM_THREADS" not in os.environ:
            # The jobs inherit this process's environment: split the cores between them.
            os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(job_overrides)))
        return job_overrides


LAUNCHERS = (SlurmLauncher, LocalLauncher)

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

Jobs are single-process: ``tasks_per_node`` and ``nodes`` must be 1 (a multi-GPU run is
one ``torchrun`` command; see docs/cluster.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.extras import extra

with extra("cluster", what="hydra/launcher=local|slurm (dp_sweeps.sweeps.launcher)"):
    import submitit  # noqa: F401 (the plugin imports it only when it launches: checked here)
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher

RESUME_OVERRIDE = "trainer.resume=true"
CHECKPOINT_KEY = "trainer.checkpoint_every"


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
        return super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        """Called by submitit in a job about to be requeued: the same job, resuming."""
        return super().checkpoint(with_resume(sweep_overrides), *args, **kwargs)  # type: ignore[misc]


class SlurmLauncher(_ResumeOnRequeue, submitit_launcher.SlurmLauncher):
    """``hydra/launcher=slurm``: a SLURM job array whose requeued jobs resume."""


class LocalLauncher(_ResumeOnRequeue, submitit_launcher.LocalLauncher):
    """``hydra/launcher=local``: jobs as processes on this machine (submitit's local
    executor: the same code path as on SLURM, requeue included)."""


LAUNCHERS = (SlurmLauncher, LocalLauncher)

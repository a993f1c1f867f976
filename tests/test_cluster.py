"""Sweeps through dp_sweeps' submitit launchers (``hydra/launcher=local|slurm``): a real
two-job sweep on submitit's local executor in which one job is preempted after its first
checkpoint, requeued by submitit and resumed; the SLURM config turned into its sbatch
script (without a cluster); and the requeue hook itself."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import submitit
from omegaconf import OmegaConf

from dp_sweeps.sweeps import launcher as dp_launcher
from dp_sweeps.training.results import read_result
from tests.helpers.processes import pid_holding_open
from tests.helpers.runs import compose_config, run_main, tiny_sweep_overrides


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the job's process through /proc")
def test_local_launcher_sweep_with_a_preempted_job_that_resumes(tiny_cifar, tmp_path, monkeypatch, capsys):
    """Two identical jobs (they differ only in experiment_name, which training never reads)
    run as submitit local jobs. Job 1 gets SIGUSR2 (submitit's preemption/time-out signal)
    after its first checkpoint: submitit calls the launcher's checkpoint(), requeues the job,
    and the job resumes from its checkpoint. It must end exactly where job 0 ended: same
    steps, same ε, same accuracy (every random stream continued, nothing drawn twice)."""
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs' processes inherit it
    monkeypatch.chdir(tmp_path)
    preempted: dict = {}
    sweep_over = threading.Event()

    def preempt_job_1_after_its_first_checkpoint() -> None:
        while not (found := list(out.glob("multiruns/*/*/1/checkpoints/last.pt"))):
            if sweep_over.wait(0.02):
                return
        preempted["job_dir"] = job_dir = found[0].parents[1]
        preempted["pid"] = pid = pid_holding_open(job_dir / "metrics.csv")
        if pid is not None:
            os.kill(pid, signal.SIGUSR2)

    watcher = threading.Thread(target=preempt_job_1_after_its_first_checkpoint, daemon=True)
    watcher.start()
    # The sweep itself runs in this process (the CLI's main); its jobs are submitit processes.
    try:
        # A shared noise_seed makes the two jobs the same run (debugging replay, epsilon_valid=false).
        log = run_main([*tiny_sweep_overrides(tiny_cifar, out), "trainer.epochs=4", "experiment_name=full,requeued",
                        "privacy.noise_seed=11", "trainer.non_private_stats=true", "hydra/launcher=local", "-m"],
                       capsys)
    finally:
        sweep_over.set()
        watcher.join(timeout=5)
    assert preempted.get("pid") is not None, f"job 1 was not found and preempted: {preempted}\n{log[-3000:]}"
    job_dir = preempted["job_dir"]

    sweep_dir = job_dir.parent
    assert [p.name for p in (out / "multiruns").glob("*/*")] == [sweep_dir.name]  # one sweep folder
    full, requeued = read_result(sweep_dir / "0"), read_result(sweep_dir / "1")
    assert full["status"] == requeued["status"] == "completed"
    assert (full["experiment"], requeued["experiment"]) == ("full", "requeued")
    assert full["resumed_from_epoch"] is None and 2 <= requeued["resumed_from_epoch"] <= 4
    assert requeued["steps"] == full["steps"] == requeued["planned_steps"] == 4 * 8
    assert requeued["epsilon"] == full["epsilon"] <= requeued["target_epsilon"]
    assert requeued["test_accuracy"] == full["test_accuracy"]
    assert requeued["non_private"]["train_loss"] == full["non_private"]["train_loss"]
    assert requeued["epsilon_valid"] is full["epsilon_valid"] is False
    # The requeued attempt ran with trainer.resume=true; every job got checkpoints.
    overrides = {n: OmegaConf.load(sweep_dir / n / ".hydra" / "overrides.yaml") for n in ("0", "1")}
    assert "trainer.resume=true" in overrides["1"] and "trainer.resume=true" not in overrides["0"]
    assert all("trainer.checkpoint_every=1" in o for o in overrides.values())
    # submitit's own record of the requeue, in the sweep folder's .submitit/.
    submitit_logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").glob("*/*_log.*"))
    assert "Requeued job" in submitit_logs


def _launcher(**params) -> dp_launcher.LocalLauncher:
    return dp_launcher.LocalLauncher(**{"submitit_folder": "x/%j", "tasks_per_node": 1, "nodes": 1, **params})


def test_a_requeued_job_is_the_same_job_resuming():
    launcher = _launcher()
    state = {"singleton": "state"}
    delayed = launcher.checkpoint(["seed=3", "trainer.resume=false"], "hydra.sweep.dir", 7, "job_id_for_7", state)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function is launcher
    assert delayed.args == (["seed=3", "trainer.resume=true"], "hydra.sweep.dir", 7, "job_id_for_7", state)


def test_jobs_get_checkpoints_unless_they_ask_for_their_own():
    assert dp_launcher.with_checkpoints(["seed=1"], config_checkpoint_every=0) == [
        "seed=1", "trainer.checkpoint_every=1"]
    assert dp_launcher.with_checkpoints(["seed=1"], config_checkpoint_every=5) == ["seed=1"]
    assert dp_launcher.with_checkpoints(["trainer.checkpoint_every=2"], config_checkpoint_every=0) == [
        "trainer.checkpoint_every=2"]


def test_multi_process_jobs_are_refused_with_one_line():
    with pytest.raises(SystemExit, match=r"^dp_sweeps: error: hydra.launcher.tasks_per_node=2 .* use torchrun"):
        _launcher(tasks_per_node=2).setup(hydra_context=None, task_function=None, config=OmegaConf.create({}))


def _compose_hydra(*overrides: str):
    return compose_config(list(overrides), return_hydra_config=True)


def test_slurm_config_becomes_the_sbatch_script(tmp_path, monkeypatch):
    """The slurm launcher config, composed with a search, through the plugin's own
    parameter mapping into submitit's SlurmExecutor, up to the sbatch script (a stub
    ``srun`` on PATH stands in for the cluster; nothing is submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = _compose_hydra("hparams_search=frontier", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                         "hydra.launcher.timeout_min=240", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert cfg.hydra.callbacks.register_sweeper._target_ == "dp_sweeps.sweeps.search.RegisterSweeper"
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_") == "dp_sweeps.sweeps.launcher.SlurmLauncher"
    launcher = dp_launcher.SlurmLauncher(**params)
    launcher.config = cfg

    captured = {}

    def capture(executor, fn, *iterables):
        slurm = executor._executor
        slurm.parameters["map_count"] = len(iterables[0])
        captured.update(script=slurm._make_submission_file_text(slurm._submitit_command_str, "uid"),
                        max_num_timeout=slurm.max_num_timeout, overrides=iterables[0], fn=fn,
                        array_parallelism=slurm.parameters["array_parallelism"])
        raise KeyboardInterrupt  # stop before anything is submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(KeyboardInterrupt):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    script = captured["script"]
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB", "#SBATCH --time=240",
                 "#SBATCH --signal=USR2@120", "#SBATCH --array=0-1%2", "#SBATCH --nodes=1"):
        assert line in script, f"{line!r} not in\n{script}"
    assert f"{tmp_path / 'sweep'}/.submitit/" in script
    assert captured["array_parallelism"] == 16  # at most 16 jobs of an array at once (here 2 jobs)
    assert captured["max_num_timeout"] == 10  # time-outs requeue (and resume) up to 10 times
    assert captured["fn"] is launcher
    assert [list(o) for o in captured["overrides"]] == [["seed=0", "trainer.checkpoint_every=1"],
                                                        ["seed=1", "trainer.checkpoint_every=1"]]


def test_local_config_leaves_the_trainer_settings_to_the_user():
    cfg = _compose_hydra("hydra/launcher=local", "trainer.checkpoint_every=3")
    assert cfg.hydra.launcher._target_ == "dp_sweeps.sweeps.launcher.LocalLauncher"
    assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.trainer.checkpoint_every == 3  # the trainer's settings stay the user's

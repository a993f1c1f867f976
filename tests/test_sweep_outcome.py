"""A sweep's outcome (dp_sweeps.sweeps.outcome) and the local launcher's lost jobs:
a sweep whose every job failed exits non-zero with the first error; a failed or killed
job is recorded and leaves the others running; local jobs get the device pinned."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from dp_sweeps.sweeps.outcome import all_failed_message, results_written_since
from dp_sweeps.training.results import read_result, write_result
from tests.helpers.processes import pid_holding_open
from tests.helpers.runs import cli_in_process, run_main, tiny_sweep_overrides


def test_only_this_invocations_results_count_and_all_failed_names_the_first(tmp_path):
    old = tmp_path / "old"
    write_result(old, {"status": "completed"})
    os.utime(old / "result.json", (time.time() - 3600, time.time() - 3600))
    since = time.time() - 1
    write_result(tmp_path / "a", {"status": "failed", "error": "first error\nmore"})
    time.sleep(0.02)
    write_result(tmp_path / "b", {"status": "failed", "error": "second error"})
    results = results_written_since(tmp_path, since)
    assert [folder.name for folder, _ in results] == ["a", "b"]
    expected = f"every job of the sweep failed (2 runs); the first, in {tmp_path / 'a'}: first error"
    assert all_failed_message(results) == expected
    write_result(tmp_path / "c", {"status": "completed"})
    assert all_failed_message(results_written_since(tmp_path, since)) is None
    assert all_failed_message([]) is None  # nothing ran (all skipped as finished): not a failure


@pytest.mark.slow
def test_a_sweep_in_which_every_job_failed_exits_non_zero_with_the_first_error(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*tiny_sweep_overrides(tmp_path / "no_data", out), "seed=0,1", "-m"]
    result = cli_in_process(args, capsys)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dp_sweeps: error: every job of the sweep failed (2 runs); the first, in ")
    assert "CIFAR-10 not found" in last
    assert sorted(read_result(p.parent)["status"] for p in out.rglob("result.json")) == ["failed", "failed"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the job's process through /proc")
def test_a_killed_local_job_is_recorded_and_the_other_finishes(tiny_cifar, tmp_path, monkeypatch, capsys):
    """Two jobs side by side (hydra/launcher=local, max_batch_size 2): job 1 is SIGKILLed
    while training; job 0 finishes, the sweep exits 0, job 1's result.json says it died.
    Neither job sets trainer.device: the launcher pins the device it resolved."""
    out = tmp_path / "out"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    killed: dict = {}
    done = threading.Event()

    def kill_job_1() -> None:
        while not (found := list(out.glob("multiruns/*/*/1/metrics.csv"))):
            if done.wait(0.02):
                return
        while (pid := pid_holding_open(found[0])) is None:
            if done.wait(0.02):
                return
        killed["pid"] = pid
        os.kill(pid, signal.SIGKILL)

    watcher = threading.Thread(target=kill_job_1, daemon=True)
    watcher.start()
    overrides = [o for o in tiny_sweep_overrides(tiny_cifar, out) if not o.startswith("trainer.device=")]
    try:
        log = run_main([*overrides, "trainer.epochs=1,200", "hydra/launcher=local",
                        "hydra.sweeper.max_batch_size=2", "-m"], capsys)
    finally:
        done.set()
        watcher.join(timeout=5)
    assert killed.get("pid"), log[-2000:]
    (sweep_dir,) = {p.parent for p in out.glob("multiruns/*/*/0")}
    assert read_result(sweep_dir / "0")["status"] == "completed"
    lost = read_result(sweep_dir / "1")
    assert lost["status"] == "failed" and lost["error"].startswith("job died"), lost
    for job in ("0", "1"):
        overrides_file = (sweep_dir / job / ".hydra" / "overrides.yaml").read_text()
        assert "trainer.device=cpu" in overrides_file
    assert json.loads((sweep_dir / "0" / "result.json").read_text())["device"] == "cpu"

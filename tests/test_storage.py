"""Shared Optuna storage: two worker processes (the real CLI) on one study on a throwaway
PostgreSQL server on loopback, and on an Optuna journal file; each worker's own sampler
seed; the lock that makes "count the trials, ask for one" atomic across workers.

The server is started from the PostgreSQL binaries of the machine (Debian's ``postgresql``
package on CI: /usr/lib/postgresql/*/bin), as the ``postgres`` user when the tests run as
root (the server refuses to run as root), with its data and sockets in a temporary folder
and trust authentication on 127.0.0.1 only."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from dp_sweeps.errors import ConfigError
from dp_sweeps.sweeps.search import WorkerSeededSampler, ask_lock, journal_path, open_study, storage_for
from dp_sweeps.training.results import read_result
from tests.helpers.runs import TINY_FRONTIER, search_overrides

TrialState = optuna.trial.TrialState
N_TRIALS = 4


def _postgres_bin_dir() -> Path | None:
    """A folder with initdb, pg_ctl and postgres: the one of pg_ctl on PATH, else Debian's
    newest /usr/lib/postgresql/<version>/bin."""
    candidates = []
    if pg_ctl := shutil.which("pg_ctl"):
        candidates.append(Path(pg_ctl).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                         key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in candidates:
        if all((folder / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 for this module, stopped and deleted afterwards."""
    bin_dir = _postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine; "
                    "on Debian: apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="dp_sweeps_pg_"))
    as_server_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_server_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_server_user, *args], cwd=root, check=True, capture_output=True, text=True, timeout=120)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "--username=postgres", "--no-sync")
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
    except subprocess.CalledProcessError as err:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {err.stderr}\n{log}") from err
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_server_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       cwd=root, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _two_workers(url: str, data_root: Path, tmp_path: Path) -> tuple[optuna.Study, list[str], float]:
    """Two ``python -m dp_sweeps`` processes started together on one study at ``url``, with
    the same sampler seed; returns the study, their logs and the wall time."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dp_sweeps",
            *search_overrides(data_root, out, "frontier", *TINY_FRONTIER, f"hydra.sweeper.n_trials={N_TRIALS}",
                     f"hydra.sweeper.storage={url}", "hydra.sweeper.sampler.seed=7")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    start = time.perf_counter()
    workers = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for _ in range(2)]
    logs = [w.communicate(timeout=400)[0] for w in workers]
    wall = time.perf_counter() - start
    assert [w.returncode for w in workers] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    return optuna.load_study(study_name="frontier_convnet", storage=storage_for(url)), logs, wall


def _check_shared_study(study: optuna.Study, logs: list[str], wall: float, *, storage: str, out: Path) -> None:
    trials = study.get_trials()
    params = [tuple(sorted(t.params.items())) for t in trials]
    workers = {t.user_attrs["worker"] for t in trials}
    seeds = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in trials}
    ran = [int(re.search(r"This process ran (\d+) trial", log).group(1)) for log in logs]
    print(f"\n{storage}: {len(trials)} trials ({sum(t.state == TrialState.COMPLETE for t in trials)} complete), "
          f"{len(trials) - len(set(params))} duplicate parameter sets, per worker {ran}, "
          f"sampler seeds {sorted(seeds.values())}, wall {wall:.1f} s")
    # Exactly the budget: the count-and-ask is atomic across the two workers.
    assert sorted(t.number for t in trials) == list(range(N_TRIALS)) and sum(ran) == N_TRIALS
    assert all(t.state == TrialState.COMPLETE for t in trials)
    # Same configured seed, yet each worker sampled with its own: no parameter set twice.
    assert len(set(params)) == N_TRIALS
    assert len(set(seeds.values())) == len(workers)
    assert all(seed == 7 + min(t.number for t in trials if t.user_attrs["worker"] == w) for w, seed in seeds.items())
    for trial in trials:  # every trial ran in its own folder and recorded what it did
        result = read_result(trial.user_attrs["run_dir"])
        assert Path(trial.user_attrs["run_dir"]).name == f"trial_{trial.number}"
        assert Path(trial.user_attrs["run_dir"]).is_relative_to(out.resolve())
        assert trial.values == pytest.approx([result["val_accuracy"], result["epsilon"]])


@pytest.mark.slow
def test_two_workers_share_one_study_on_postgresql(postgres_url, tiny_cifar, tmp_path):
    study, logs, wall = _two_workers(postgres_url, tiny_cifar, tmp_path)
    _check_shared_study(study, logs, wall, storage="PostgreSQL", out=tmp_path / "out")


@pytest.mark.slow
def test_two_workers_share_one_study_on_a_journal_file(tiny_cifar, tmp_path):
    journal = tmp_path / "shared" / "optuna" / "study.log"  # its folder does not exist yet
    study, logs, wall = _two_workers(f"journal:///{journal}", tiny_cifar, tmp_path)
    assert journal.is_file() and journal.stat().st_size > 0
    _check_shared_study(study, logs, wall, storage="journal file", out=tmp_path / "out")


def _random_sampler(seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


def _suggest(study: optuna.Study) -> tuple[int, float]:
    trial = study.ask()
    return trial.number, trial.suggest_float("x", 0.0, 1.0)


def test_each_worker_samples_with_its_own_seed(tmp_path):
    url = f"journal:///{tmp_path / 'study.log'}"
    storage = storage_for(url)
    # Two workers load the same study with the same configured seed and ask in turn.
    a, b = (WorkerSeededSampler(_random_sampler, base_seed=7) for _ in range(2))
    study_a = open_study(storage=storage, study_name="s", directions=["maximize"], sampler=a)
    study_b = open_study(storage=storage_for(url), study_name="s", directions=["maximize"], sampler=b)
    (n_a, x_a), (n_b, x_b) = _suggest(study_a), _suggest(study_b)
    assert (n_a, n_b) == (0, 1) and (a.seed, b.seed) == (7, 8) and x_a != x_b
    # Unwrapped, the same seed proposes the same point: what the per-worker seed prevents.
    same = [optuna.create_study(sampler=_random_sampler(7)) for _ in range(2)]
    assert _suggest(same[0])[1] == _suggest(same[1])[1] == x_a  # a lone worker is reproducible
    # A worker that joins (or resumes) a study with trials gets the seed of its first one.
    c = WorkerSeededSampler(_random_sampler, base_seed=7)
    study_c = open_study(storage=storage_for(url), study_name="s", directions=["maximize"], sampler=c)
    assert _suggest(study_c)[0] == 2 and c.seed == 9


def test_journal_urls_name_a_file_like_sqlite_urls(tmp_path):
    assert journal_path("journal:///outputs/optuna/s.log") == Path("outputs/optuna/s.log")
    assert journal_path(f"journal:///{tmp_path}/s.log") == tmp_path / "s.log"
    assert journal_path("sqlite:///x.db") is None and journal_path(None) is None
    with pytest.raises(ConfigError, match="journal:///"):
        journal_path("journal:///")
    storage = storage_for(f"journal:///{tmp_path}/new/s.log")
    assert isinstance(storage, optuna.storages.JournalStorage) and (tmp_path / "new" / "s.log").is_file()


def _holds_exclusively(url: str) -> None:
    """Two threads enter ``ask_lock(url)``; the second gets in only after the first left."""
    events: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with ask_lock(url):
            events.append("first in")
            first_in.set()
            time.sleep(0.5)
            events.append("first out")

    def second() -> None:
        first_in.wait(30)
        with ask_lock(url):
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert events == ["first in", "first out", "second in"]


def test_ask_lock_is_exclusive_on_a_journal_file(tmp_path):
    _holds_exclusively(f"journal:///{tmp_path / 'study.log'}")


def test_ask_lock_is_exclusive_on_postgresql(postgres_url):
    _holds_exclusively(postgres_url)

"""The ``logger`` group (csv, tensorboard, mlflow, several at once) read back with the
libraries' own readers, and the Optuna dashboard on our studies: the trials' user
attributes (ε, σ, q, run folder) through optuna-dashboard's own API, on sqlite, journal
and PostgreSQL storages."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import MissingExtraError
from dp_sweeps.privacy import randomness
from dp_sweeps.run import run
from dp_sweeps.sweeps.search import database_url, storage_for
from dp_sweeps.training.loggers import open_loggers
from dp_sweeps.training.results import read_result
from tests.helpers.runs import TINY_FRONTIER, compose_config, run_main, search_overrides, tiny_sweep_overrides
from tests.test_storage import postgres_url  # noqa: F401  (the fixture: a throwaway PostgreSQL server)

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator
mlflow = pytest.importorskip("mlflow")

THREE = "logger=[csv,tensorboard,mlflow]"


def _csv_rows(run_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))


def _csv_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.csv as {column: {epoch: value}}, for the finite measured values."""
    series: dict[str, dict[int, float]] = {}
    for row in _csv_rows(run_dir):
        for key, value in row.items():
            if key not in ("epoch", "step") and value not in ("", None) and math.isfinite(float(value)):
                series.setdefault(key, {})[int(row["epoch"])] = float(value)
    return series


def _tensorboard(run_dir: Path):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events


def _mlflow_run(out: Path):
    """The one MLflow run in the default store under ``out`` (paths.output_dir)."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([e.experiment_id for e in experiments])
    return client, experiments, runs


@pytest.mark.slow
def test_three_loggers_hold_what_metrics_csv_and_result_json_hold(tiny_cfg, tmp_path):
    """A two-epoch DP run with every logger: the TensorBoard scalars and the MLflow
    metrics are metrics.csv's columns (ε among them, non-private ones as asked for), the
    parameters carry the mechanism of result.json, and result.json itself is logged."""
    cfg = tiny_cfg(THREE, "trainer.epochs=2", "privacy.accountant=rdp", "trainer.non_private_stats=true",
                   f"paths.output_dir={tmp_path}")
    result = run(cfg, tmp_path)
    assert result["status"] == "completed"
    expected = _csv_series(tmp_path)
    assert {"epsilon", "test_accuracy", "non_private_train_loss"} <= set(expected)
    assert expected["epsilon"][2] == pytest.approx(result["epsilon"])

    events = _tensorboard(tmp_path)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, values in expected.items():
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(values, rel=1e-6)  # event files hold float32
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["mechanism.noise_multiplier"].number_value == pytest.approx(result["noise_multiplier"])
    assert start.hparams["mechanism.accountant"].string_value == "rdp"
    (text,) = events.Tensors("result.json/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode()) == read_result(tmp_path)

    client, experiments, runs = _mlflow_run(tmp_path)
    assert [e.name for e in experiments] == ["dp_sweeps"] and len(runs) == 1
    (mlrun,) = runs
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["status"] == "completed"
    assert mlrun.data.tags["run_dir"] == str(tmp_path.resolve())
    for key, values in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)} == values
    assert set(mlrun.data.metrics) == set(expected)
    params = mlrun.data.params
    for key in ("noise_multiplier", "sample_rate", "max_grad_norm", "delta", "accountant", "grad_sample_mode"):
        assert params[f"mechanism.{key}"] == str(result[key])
    assert params["optimizer.lr"] == str(cfg.optimizer.lr) and params["trainer.epochs"] == "2"
    artifact = Path(mlflow.artifacts.download_artifacts(
        run_id=mlrun.info.run_id, artifact_path="result.json", tracking_uri=client.tracking_uri,
        dst_path=str(tmp_path / "dl")))
    assert json.loads(artifact.read_text()) == read_result(tmp_path)


@pytest.mark.slow
def test_no_logger_holds_the_mechanism_seeds_or_unasked_non_private_figures(tiny_cfg, tmp_path, monkeypatch,
                                                                              caplog):
    """The secret seeds of the mechanism are looked for in every file the loggers write
    (event files, the MLflow database and artifacts) and in every value read back; under
    DP by default no training loss or accuracy (non-private) reaches any logger."""
    drawn = []
    real = randomness.secrets.randbits
    monkeypatch.setattr(randomness.secrets, "randbits", lambda k: drawn.append(real(k)) or drawn[-1])
    with caplog.at_level(logging.DEBUG):
        run(tiny_cfg("logger=many", "privacy.accountant=rdp", f"paths.output_dir={tmp_path}"), tmp_path)
    assert len(drawn) == 2
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in written)
    assert any(p.name == "mlflow.db" for p in written)
    client, _, (mlrun,) = _mlflow_run(tmp_path)
    events = _tensorboard(tmp_path)
    read_back = json.dumps([mlrun.data.params, mlrun.data.tags, mlrun.data.metrics,
                            {k: [e.value for e in events.Scalars(k)] for k in events.Tags()["scalars"]}])
    blobs = [p.read_bytes().decode("latin-1") for p in written] + [read_back]
    for value in drawn:
        for form in (str(value), format(value, "x")):
            assert not any(form in blob for blob in blobs), form
    # Not computed under DP unless asked for: empty in metrics.csv, absent from every logger.
    assert all(not row["non_private_train_loss"] for row in _csv_rows(tmp_path))
    assert not [k for k in [*mlrun.data.metrics, *events.Tags()["scalars"]] if k.startswith("non_private")]


def test_unknown_loggers_and_settings_are_refused_before_training(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"logger.wandb: unknown logger; known: csv, mlflow, tensorboard"):
        run(tiny_cfg("+logger.wandb={}"), tmp_path)
    with pytest.raises(ConfigError, match=r"logger.tensorboard.dir: unknown setting"):
        run(tiny_cfg("logger=tensorboard", "+logger.tensorboard.dir=x"), tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_logger_extra_is_named_in_one_line(name, module, tmp_path, monkeypatch):
    cfg = compose_config([f"logger=[csv,{name}]"])
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(MissingExtraError) as err:
        open_loggers(cfg, run_dir=tmp_path)
    assert str(err.value) == f"logger={name} needs the {name!r} extra: pip install 'dp_sweeps[{name}]'"


def test_the_logger_group_composes_one_several_or_none():
    assert list(compose_config([]).logger) == ["csv"]
    assert list(compose_config([THREE]).logger) == ["csv", "tensorboard", "mlflow"]
    assert compose_config(["logger=many"]).logger == compose_config([THREE]).logger
    assert compose_config(["logger=[]"]).get("logger") is None  # the key is gone


@pytest.mark.slow
def test_a_run_without_loggers_writes_only_its_record(tiny_cfg, tmp_path):
    result = run(tiny_cfg("logger=[]", "privacy.accountant=rdp", "data.train_subset=128"), tmp_path)
    assert result["status"] == "completed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def _dashboard_get(storage, path: str) -> dict:
    """GET ``path`` from optuna-dashboard's own WSGI app on ``storage`` (no server, no port)."""
    app = pytest.importorskip("optuna_dashboard").wsgi(storage)
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


def _dashboard_trials(storage, study_name: str) -> list[dict]:
    studies = _dashboard_get(storage, "/api/studies")["study_summaries"]
    (study_id,) = [s["study_id"] for s in studies if s["study_name"] == study_name]
    return _dashboard_get(storage, f"/api/studies/{study_id}")["trials"]


def _user_attrs(trial: dict) -> dict:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


@pytest.mark.slow
def test_a_search_shows_epsilon_sigma_q_and_run_folder_in_the_dashboard(tiny_cifar, tmp_path, capsys):
    """A tiny frontier search with logger=mlflow: optuna-dashboard, given the study's
    sqlite URL as on the command line, shows each trial's ε, σ, q and run folder (those
    of its result.json); the trials' MLflow runs share one experiment named after the study."""
    out = tmp_path / "out"
    run_main([*search_overrides(tiny_cifar, out, "frontier", *TINY_FRONTIER), "hydra.sweeper.n_trials=2",
              "logger=mlflow"], capsys)
    url = f"sqlite:///{out / 'optuna' / 'frontier_convnet.db'}"
    trials = _dashboard_trials(url, "frontier_convnet")
    assert len(trials) == 2
    for trial in trials:
        attrs = _user_attrs(trial)
        result = read_result(attrs["run_dir"])
        assert Path(attrs["run_dir"]).name == f"trial_{trial['number']}"
        for key in ("epsilon", "noise_multiplier", "sample_rate", "max_grad_norm", "delta"):
            assert float(attrs[key]) == pytest.approx(result[key]), key
        assert attrs["accountant"] == "rdp" and attrs["status"] == "completed"
    client, experiments, runs = _mlflow_run(out)
    assert [e.name for e in experiments] == ["frontier_convnet"]
    assert sorted(r.data.tags["search.trial"] for r in runs) == ["0", "1"]
    assert sorted(r.info.run_name for r in runs) == ["trial_0", "trial_1"]


@pytest.mark.slow
def test_a_multirun_groups_its_runs_under_one_experiment_named_after_the_sweep(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    run_main([*tiny_sweep_overrides(tiny_cifar, out), "data.train_subset=128", "logger=mlflow",
              "privacy.epsilon=2,4", "-m"], capsys)
    (sweep,) = (out / "multiruns").glob("*/*")
    client, experiments, runs = _mlflow_run(out)
    assert [e.name for e in experiments] == [str(sweep.relative_to(out))]
    assert sorted(r.data.tags["run_dir"] for r in runs) == [str(sweep / "0"), str(sweep / "1")]
    assert sorted(float(r.data.params["privacy.epsilon"]) for r in runs) == [2.0, 4.0]


def _study_with_a_trial(storage) -> None:
    study = optuna.create_study(study_name="dash", storage=storage, directions=["maximize"])
    study.add_trial(optuna.trial.create_trial(
        params={"privacy.epsilon": 2.0}, distributions={"privacy.epsilon": optuna.distributions.FloatDistribution(
            0.5, 4, log=True)}, values=[0.5],
        user_attrs={"epsilon": 1.98, "noise_multiplier": 1.1, "sample_rate": 0.128, "run_dir": "/r/trial_0"}))


def _check_dashboard_reads(argument: str) -> None:
    """optuna-dashboard's own storage parsing (``optuna-dashboard ARGUMENT``) reads the study."""
    get_storage = pytest.importorskip("optuna_dashboard._storage_url").get_storage  # the CLI's argument parsing
    (trial,) = _dashboard_trials(get_storage(argument), "dash")
    assert _user_attrs(trial) == {"epsilon": "1.98", "noise_multiplier": "1.1", "sample_rate": "0.128",
                                  "run_dir": "/r/trial_0"}


def test_the_dashboard_reads_a_journal_storage_by_its_path(tmp_path):
    journal = tmp_path / "optuna" / "study.log"
    _study_with_a_trial(storage_for(f"journal:///{journal}"))
    _check_dashboard_reads(str(journal))  # optuna-dashboard takes the file's path, not journal:///


@pytest.mark.slow
def test_the_dashboard_reads_a_postgresql_storage(postgres_url):  # noqa: F811
    _study_with_a_trial(storage_for(postgres_url))
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3: the URL names the installed driver.
    _check_dashboard_reads(database_url(postgres_url))


@pytest.mark.slow
def test_a_plain_run_imports_no_logger_extra():
    import subprocess

    code = ("import sys, dp_sweeps.run, dp_sweeps.__main__\n"
            "print(sorted(m for m in ('tensorboard', 'mlflow', 'optuna_dashboard') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"

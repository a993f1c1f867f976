"""Gather runs, sweeps and Optuna studies into one table, a markdown report and figures.

``python -m dp_sweeps.analysis.report PATH... [--out DIR] [--storage URL]``

A *run* is a folder holding ``result.json`` or ``.hydra/config.yaml`` (a run without a
result was killed or is still running: it is listed with status ``no_result``). Its row
is its ``result.json``, its Hydra overrides (``overrides``) and its composed config
(``config.<key>`` columns). *Studies* are read from Optuna storages: sqlite files under
the paths, the storages named in ``optimization_results.yaml`` files of search folders,
and ``--storage`` URLs; each trial is joined to its run through ``search.study`` and
``search.trial`` (a trial without a run folder gets a row of its own).

Only completed runs are plotted; the others stay in the CSV with their status. Every ε
shown is the one that run's accountant computed for that run alone: it excludes the
privacy cost of the search that chose among runs (see :data:`HONEST_EPSILON`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sqlite3
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dp_sweeps.extras import MissingExtraError, extra, require
from dp_sweeps.sweeps.storage_urls import journal_path
from dp_sweeps.training.results import RESULT_FILE

with extra("report", what="dp_sweeps.analysis.report (make report)", script=__name__ == "__main__"):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import pandas as pd
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

log = logging.getLogger(__name__)

HONEST_EPSILON = (
    "Each ε is the privacy spent by that one training run, as its accountant computed it "
    "(for the δ listed). It does not include the privacy cost of the hyperparameter search "
    "or of picking the best run: choosing among runs trained on the same private data "
    "spends privacy too (Liu & Talwar 2019; Papernot & Steinke 2022).")
INVALID_MARK = "†"
INVALID_NOTE = (f"{INVALID_MARK} ε not a valid guarantee: the run did not use Poisson sampling "
                "(privacy.poisson_sampling=false).")
# Config keys that do not change what a run computes: ignored when runs are grouped
# into settings whose seeds are averaged.
NOT_A_SETTING = ("seed", "paths.", "search.", "data.root", "data.download", "data.verify_checksums",
                 "data.feature_cache", "trainer.device", "trainer.progress", "trainer.eval_batch_size",
                 "trainer.physical_batch_size", "trainer.checkpoint_every", "trainer.resume",
                 "privacy.grad_sample_mode", "dry_run", "optimized_metric")
# result.json keys that define a setting when a run has no saved config.
RESULT_SETTING_KEYS = ("data_name", "model", "optimizer", "lr", "private", "accountant", "target_epsilon", "delta",
                       "max_grad_norm", "batch_size", "epochs", "poisson_sampling", "num_train", "num_val")
TRIAL_STATUS = {"COMPLETE": "completed", "FAIL": "failed", "RUNNING": "running", "PRUNED": "pruned",
                "WAITING": "waiting"}
# The markdown table's columns (those present), with their headers.
MD_COLUMNS = {"run": "run", "model": "model", "status": "status", "epsilon_shown": "ε spent", "delta": "δ",
              "target_epsilon": "target ε", "noise_multiplier": "σ", "max_grad_norm": "C",
              "batch_size": "batch", "epochs": "epochs", "optimizer": "optimizer", "lr": "lr", "seed": "seed",
              "val_accuracy": "val acc (%)", "test_accuracy": "test acc (%)", "study": "study", "trial": "trial",
              "trial_state": "trial state"}


# --------------------------------------------------------------------------- runs

def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Folders under ``paths`` (or the paths themselves) that hold a run, each once."""
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            log.warning("%s does not exist: skipped", root)
            continue
        for marker in (RESULT_FILE, ".hydra/config.yaml"):
            for hit in root.rglob(marker):
                run_dir = hit.parent if marker == RESULT_FILE else hit.parent.parent
                found.add(run_dir.resolve())
    return sorted(found)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):
        return {prefix[:-1]: json.dumps(node)}
    return {prefix[:-1]: node}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One run's row: result.json (or status ``no_result``), overrides and config."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "source": "run"}
    result_path = run_dir / RESULT_FILE
    if result_path.is_file():
        try:
            row.update(json.loads(result_path.read_text()))
        except (OSError, ValueError) as err:
            row.update(status="unreadable", error=f"{RESULT_FILE}: {err}")
    else:
        row["status"] = "no_result"
    hydra_dir = run_dir / ".hydra"
    if (hydra_dir / "overrides.yaml").is_file():
        row["overrides"] = " ".join(str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml"))
    if (hydra_dir / "config.yaml").is_file():
        config = OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
        flat = _flatten(config)
        row.update({f"config.{k}": v for k, v in flat.items()})
        row["study"] = flat.get("search.study")
        row["trial"] = flat.get("search.trial")
        row.setdefault("model", flat.get("model.name"))
        row.setdefault("data_name", flat.get("data.name"))
    if row.get("released_by") == "private_tuning":
        # The model a private search released: its ε is the whole search's (tuning_privacy.json).
        row.update(source="released", per_run_epsilon=row.get("epsilon"), epsilon=row.get("tuning_epsilon"))
    # Runs recorded before other data sets existed (no data_name, no data.name) were CIFAR-10's.
    if row.get("data_name") is None and row.get("status") != "no_result":
        row["data_name"] = "cifar10"
    row["setting"] = _setting_id(row)
    return row


def secret_trial(row: dict[str, Any]) -> bool:
    """A trial of a private search (hparams_search=private_tuning): its figures are private
    (only the released copy is published; docs/private_tuning.md)."""
    return row.get("score_noise") is not None and row.get("released_by") is None


def _setting_id(row: dict[str, Any]) -> str:
    """Runs with equal ids differ only in their seed (and where/how they ran)."""
    if any(k.startswith("config.") for k in row):
        items = {k[len("config."):]: v for k, v in row.items() if k.startswith("config.")}
        items = {k: v for k, v in items.items() if not any(k == p or k.startswith(p) for p in NOT_A_SETTING)}
    else:
        items = {k: row.get(k) for k in RESULT_SETTING_KEYS}
    return hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------ studies

def _is_optuna_sqlite(path: Path) -> bool:
    # Opening a foreign sqlite file with Optuna would add its tables to it: look first.
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            query = "select 1 from sqlite_master where type='table' and name='studies'"
            return con.execute(query).fetchone() is not None
    except sqlite3.Error:
        return False


def find_storages(paths: Iterable[str | Path], storages: Iterable[str] = ()) -> list[str]:
    """Optuna storage URLs: the given ones, sqlite files under ``paths`` and the storages
    recorded in ``optimization_results.yaml`` files under ``paths``; each once."""
    urls: list[str] = list(storages)
    for root in map(Path, paths):
        if not root.exists():
            continue
        for db in sorted(p for pattern in ("*.db", "*.sqlite", "*.sqlite3") for p in root.rglob(pattern)):
            if _is_optuna_sqlite(db):
                urls.append(f"sqlite:///{db.resolve()}")
        for summary in sorted(root.rglob("optimization_results.yaml")):
            url = OmegaConf.load(summary).get("storage")
            if url and str(url) != "None":
                urls.append(str(url))
    seen, unique = set(), []
    for url in urls:
        key = url
        if url.startswith("sqlite:///") or journal_path(url) is not None:
            path = journal_path(url) or Path(url[len("sqlite:///"):])
            if not path.is_file():  # opening it would create an empty storage
                log.warning("Optuna storage %s: no such file (from %s): skipped", path, Path.cwd())
                continue
            key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(url)
    return unique


def collect_trials(storages: Iterable[str]) -> pd.DataFrame:
    """One row per trial of every study in ``storages``: its state, objective values
    (``objective.<metric>``), parameters (``param.<name>``), user attributes and whether
    it is in the study's best set (the Pareto set for several objectives). Optuna (the
    ``search`` extra) is needed only when there are storages to read."""
    storages = list(storages)
    if not storages:
        return pd.DataFrame()
    optuna = require("search", "optuna", what="reading Optuna studies (dp_sweeps.analysis.report)")
    from dp_sweeps.sweeps.search import storage_for

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows: list[dict[str, Any]] = []
    for url in storages:
        try:
            storage = storage_for(url)  # journal files, and PostgreSQL through psycopg2
            names = optuna.study.get_all_study_names(storage=storage)
        except Exception as err:
            log.warning("cannot read Optuna storage %s: %s", url, err)
            continue
        for name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            directions = [d.name.lower() for d in study.directions]
            metrics = study.metric_names or [f"objective{i}" for i in range(len(directions))]
            complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            best = {t.number for t in study.best_trials} if complete else set()
            for trial in study.get_trials(deepcopy=False):
                row: dict[str, Any] = {"study": name, "trial": trial.number, "storage": url,
                                       "trial_state": trial.state.name, "directions": ",".join(directions),
                                       "metrics": ",".join(metrics), "pareto": trial.number in best}
                for metric, value in zip(metrics, trial.values or []):
                    row[f"objective.{metric}"] = value
                row.update({f"param.{k}": v for k, v in trial.params.items()})
                row.update({f"trial.{k}": v for k, v in trial.user_attrs.items()})
                rows.append(row)
    return pd.DataFrame(rows)


# -------------------------------------------------------------------------- table

def collect_runs(paths: Iterable[str | Path], *, storages: Iterable[str] = (), studies: bool = True) -> pd.DataFrame:
    """Every run under ``paths`` and (with ``studies``) every trial of the Optuna studies
    found there or in ``storages``, as one table: one row per run, plus one per trial
    that has no run folder. ``status`` is the run's (or, for those, the trial's)."""
    paths = list(paths)
    rows = [read_run(d) for d in find_run_dirs(paths)]
    if secret := sum(map(secret_trial, rows)):
        log.info("%d trial(s) of private searches left out (private; their released model is shown)", secret)
    runs = pd.DataFrame([r for r in rows if not secret_trial(r)])
    for column in ("run_dir", "source", "study", "trial", "status"):
        if column not in runs:
            runs[column] = pd.Series(dtype=object)
    trials = collect_trials(find_storages(paths, storages)) if studies else pd.DataFrame()
    if trials.empty:
        table = runs
    else:
        runs["trial"] = pd.to_numeric(runs["trial"], errors="coerce").astype("Int64")
        trials["trial"] = trials["trial"].astype("Int64")
        # A study resumed elsewhere can share a name with a local one: the first storage wins.
        trials = trials.drop_duplicates(["study", "trial"])
        table = runs.merge(trials, on=["study", "trial"], how="outer", suffixes=("", "_trial"))
        orphan = table["source"].isna()
        table.loc[orphan, "source"] = "optuna"
        table.loc[orphan, "status"] = table.loc[orphan, "trial_state"].map(TRIAL_STATUS)
        table.loc[orphan, "run_dir"] = table.loc[orphan, "trial.run_dir"] if "trial.run_dir" in table else None
    if table.empty:
        return table
    table["epsilon_shown"] = [_epsilon_label(r) for r in table.to_dict("records")]
    first = [c for c in ("run_dir", "source", "status", "model", "study", "trial", "trial_state", "epsilon",
                         "epsilon_valid", "val_accuracy", "test_accuracy", "setting", "overrides") if c in table]
    return table[first + [c for c in table.columns if c not in first]].reset_index(drop=True)


def _epsilon_label(row: dict[str, Any]) -> str:
    eps = row.get("epsilon")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        return "non-private" if row.get("private") is False else ""
    return f"{eps:.3g}" + ("" if row.get("epsilon_valid") is not False else INVALID_MARK)


def plottable(table: pd.DataFrame) -> pd.DataFrame:
    """Completed runs only: the rows a figure may show as results."""
    if table.empty or "status" not in table:
        return table.iloc[0:0]
    return table[table["status"] == "completed"]


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Completed runs outside searches, grouped by setting: mean ± std of test accuracy
    and ε over seeds (std is NaN for a single seed)."""
    runs = plottable(table)
    if "study" in runs:
        runs = runs[runs["study"].isna()]
    if runs.empty or "test_accuracy" not in runs:
        return pd.DataFrame()
    runs = runs.copy()
    for column, default in (("private", True), ("epsilon_valid", True), ("epsilon", math.nan),
                            ("target_epsilon", math.nan), ("model", "unknown"), ("setting", ""),
                            ("data_name", "cifar10")):
        runs[column] = runs[column].fillna(default) if column in runs else default
    runs["epsilon"] = pd.to_numeric(runs["epsilon"], errors="coerce")
    # One group per data set, model and setting: accuracies of different data sets never mix.
    grouped = runs.groupby(["data_name", "model", "setting"], dropna=False)
    summary = grouped.agg(private=("private", "first"), target_epsilon=("target_epsilon", "first"),
                          epsilon_mean=("epsilon", "mean"), epsilon_valid=("epsilon_valid", "all"),
                          test_accuracy_mean=("test_accuracy", "mean"), test_accuracy_std=("test_accuracy", "std"),
                          seeds=("test_accuracy", "size")).reset_index()
    return summary.sort_values(["data_name", "model", "epsilon_mean"], na_position="last").reset_index(drop=True)


# ------------------------------------------------------------------------ figures

def _log_x(ax: Any) -> None:
    """A log ε axis labelled with plain numbers (0.5, 1, 2, 5), not powers of ten."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _percent(values: Any) -> Any:
    return np.asarray(values, dtype=float) * 100.0


def plot_accuracy_vs_epsilon(table: pd.DataFrame, path: str | Path) -> Path | None:
    """Test accuracy against ε per model, mean ± std over seeds, for completed runs
    outside searches; non-private runs as dashed lines. ``None`` if nothing to plot."""
    summary = seed_summary(table)
    if summary.empty:
        return None
    private = summary[summary["private"].astype(bool) & summary["epsilon_mean"].notna()]
    baseline = summary[~summary["private"].astype(bool)]
    if private.empty and baseline.empty:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    # One curve per data set and model (named "data: model" when there are several data sets).
    several = summary["data_name"].nunique() > 1
    curve = (summary["data_name"].astype(str) + ": " + summary["model"].astype(str)) if several \
        else summary["model"].astype(str)
    summary = summary.assign(curve=curve)
    private = summary[summary["private"].astype(bool) & summary["epsilon_mean"].notna()]
    baseline = summary[~summary["private"].astype(bool)]
    colours = {m: f"C{i}" for i, m in enumerate(sorted(summary["curve"].unique()))}
    completed = table.loc[table["status"] == "completed"]
    deltas = sorted({f"{d:g}" for d in completed.get("delta", pd.Series(dtype=float)).dropna()})
    for model, group in private.groupby("curve"):
        group = group.sort_values("epsilon_mean")
        seeds = int(group["seeds"].max())
        label = f"{model} (mean ± std, {seeds} seeds)" if seeds > 1 else model
        one_per_epsilon = group["target_epsilon"].nunique(dropna=False) == len(group)
        ax.errorbar(group["epsilon_mean"], _percent(group["test_accuracy_mean"]),
                    yerr=_percent(group["test_accuracy_std"].fillna(0.0)), fmt="o-" if one_per_epsilon else "o",
                    color=colours[model], capsize=3, label=label)
        invalid = group[~group["epsilon_valid"].astype(bool)]
        if not invalid.empty:
            ax.plot(invalid["epsilon_mean"], _percent(invalid["test_accuracy_mean"]), "o", markersize=11,
                    markerfacecolor="none", markeredgecolor="black",
                    label=f"{INVALID_MARK} ε not valid (no Poisson sampling)")
    for model, group in baseline.groupby("curve"):
        ax.axhline(_percent(group["test_accuracy_mean"].mean()), color=colours[model], linestyle="--",
                   label=f"{model}, non-private")
    if not private.empty:
        _log_x(ax)
    ax.set_xlabel("ε spent by the run" + (f" (δ = {', '.join(deltas)})" if deltas else ""))
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Test accuracy against privacy budget")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    return _save_with_footnote(fig, "Each ε is the run's own; the cost of choosing hyperparameters is not included.",
                               path)


def plot_accuracy_by_mechanism(table: pd.DataFrame, path: str | Path) -> Path | None:
    """Test accuracy against ε with one line per (model, noise mechanism), mean ± std over
    seeds, for completed private runs outside searches: the Gaussian against the Laplace
    mechanism at equal ε (``experiment=paper_mechanism``). ``None`` unless the runs use
    more than one mechanism."""
    runs = plottable(table)
    if "study" in runs:
        runs = runs[runs["study"].isna()]
    if runs.empty or "mechanism" not in runs or "test_accuracy" not in runs:
        return None
    runs = runs[runs["mechanism"].notna() & pd.to_numeric(runs["epsilon"], errors="coerce").notna()].copy()
    if runs["mechanism"].nunique() < 2:
        return None
    runs["epsilon"] = pd.to_numeric(runs["epsilon"], errors="coerce")
    runs["target"] = runs["target_epsilon"].fillna(runs["epsilon"]) if "target_epsilon" in runs else runs["epsilon"]
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    styles = {"gaussian": "o-", "laplace": "s--"}
    for i, ((model, mechanism), group) in enumerate(runs.groupby([runs["model"].astype(str), "mechanism"])):
        summary = group.groupby("target").agg(epsilon=("epsilon", "mean"), mean=("test_accuracy", "mean"),
                                              std=("test_accuracy", "std"), seeds=("test_accuracy", "size"))
        summary = summary.sort_values("epsilon")
        seeds = int(summary["seeds"].max())
        ax.errorbar(summary["epsilon"], _percent(summary["mean"]), yerr=_percent(summary["std"].fillna(0.0)),
                    fmt=styles.get(mechanism, "^:"), color=f"C{i}", capsize=3,
                    label=f"{model}, {mechanism}" + (f" (mean ± std, {seeds} seeds)" if seeds > 1 else ""))
    _log_x(ax)
    ax.set_xlabel("ε spent by the run")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title("Gaussian (L2 clipping) against Laplace (L1 clipping) at equal ε")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_with_footnote(fig, "Each ε is the run's own (Gaussian: the configured accountant; Laplace: PLD); "
                                    "the cost of choosing hyperparameters is not included.", path)


def plot_pareto(table: pd.DataFrame, study: str, path: str | Path) -> Path | None:
    """A two-objective study's trials and its Pareto set (validation accuracy against ε);
    the test accuracy of the Pareto runs is drawn beside it. ``None`` if not applicable."""
    trials = table[table["study"] == study] if "study" in table else table.iloc[0:0]
    if trials.empty or "metrics" not in trials or trials["metrics"].dropna().empty:
        return None
    metrics = str(trials["metrics"].dropna().iloc[0]).split(",")
    if len(metrics) != 2:
        return None
    # ε (or whichever is named so) on x, the accuracy on y.
    x_metric, y_metric = (metrics[1], metrics[0]) if "epsilon" not in metrics[0] else (metrics[0], metrics[1])
    complete = trials[trials["trial_state"] == "COMPLETE"].sort_values(f"objective.{x_metric}")
    if complete.empty:
        return None
    scale = _percent if "accuracy" in y_metric else (lambda v: np.asarray(v, dtype=float))
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    x, y = complete[f"objective.{x_metric}"], scale(complete[f"objective.{y_metric}"])
    ax.plot(x, y, "o", color="0.65", label=f"trials ({len(complete)})")
    front = complete[complete["pareto"].astype(bool)]
    ax.step(front[f"objective.{x_metric}"], scale(front[f"objective.{y_metric}"]), "o-", where="post",
            color="C3", label=f"Pareto set ({len(front)})")
    if "test_accuracy" in front and front["test_accuracy"].notna().any():
        ax.plot(front[f"objective.{x_metric}"], _percent(front["test_accuracy"]), "s", color="C3",
                markerfacecolor="none", label="test accuracy of the Pareto runs")
    if "epsilon_valid" in complete and (complete["epsilon_valid"] == False).any():  # noqa: E712
        invalid = complete[complete["epsilon_valid"] == False]  # noqa: E712
        ax.plot(invalid[f"objective.{x_metric}"], scale(invalid[f"objective.{y_metric}"]), "x", color="black",
                label=f"{INVALID_MARK} ε not valid (no Poisson sampling)")
    failed = int((trials["trial_state"] == "FAIL").sum())
    if failed:
        ax.plot([], [], " ", label=f"failed trials: {failed} (not shown)")
    if (x > 0).all():
        _log_x(ax)
    labels = {"epsilon": "ε spent by the trial's run", "val_accuracy": "Validation accuracy (%)",
              "test_accuracy": "Test accuracy (%)"}
    deltas = sorted({f"{d:g}" for d in complete.get("delta", pd.Series(dtype=float)).dropna()})
    delta_note = f" (δ = {', '.join(deltas)})" if deltas and "epsilon" in x_metric else ""
    ax.set_xlabel(labels.get(x_metric, x_metric) + delta_note)
    ax.set_ylabel(labels.get(y_metric, y_metric) if "accuracy" in y_metric or y_metric in labels else y_metric)
    ax.set_title(f"Privacy-accuracy frontier: study {study}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_with_footnote(fig, "Each ε is the trial's own; the privacy cost of the search itself is not included.",
                               path)


def _save_with_footnote(fig, footnote: str, path: str | Path) -> Path:
    """Every plot carries a footnote on what its ε does not include."""
    fig.text(0.01, 0.01, footnote, fontsize=6.5, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------- markdown

def _cell(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, headers: dict[str, str] | None = None) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional ``tabulate``)."""
    columns = [c for c in (headers or {c: c for c in frame.columns}) if c in frame]
    names = [(headers or {}).get(c, c) for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for record in frame[columns].itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in record) + " |")
    return "\n".join(lines) + "\n"


def _markdown(table: pd.DataFrame, figures: dict[str, Path], out_dir: Path) -> str:
    counts = table["status"].fillna("unknown").value_counts().to_dict() if "status" in table else {}
    parts = ["# dp_sweeps report\n", f"**Honest ε.** {HONEST_EPSILON}\n",
             f"{len(table)} rows: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ". "
             "Only completed runs are plotted or summarised; the others are listed with their status.\n"]
    summary = seed_summary(table)
    if not summary.empty:
        summary = summary.assign(
            epsilon=[("non-private" if not p else f"{e:.3g}" + ("" if v else INVALID_MARK))
                     for p, e, v in zip(summary["private"], summary["epsilon_mean"], summary["epsilon_valid"])],
            test_accuracy=[f"{100 * m:.2f} ± {100 * s:.2f}" if s == s else f"{100 * m:.2f}"
                           for m, s in zip(summary["test_accuracy_mean"], summary["test_accuracy_std"])])
        parts += ["## Test accuracy against ε (runs outside searches, mean ± std over seeds)\n",
                  markdown_table(summary, {"data_name": "data", "model": "model", "target_epsilon": "target ε",
                                           "epsilon": "ε spent",
                                           "test_accuracy": "test accuracy (%)", "seeds": "seeds",
                                           "setting": "setting"})]
    if "trial_state" in table and table["trial_state"].notna().any():
        # Pruned trials (hydra.sweeper.pruner) stopped early: counted here, never plotted as results.
        states = (table[table["trial_state"].notna()].groupby(["study", "trial_state"]).size()
                  .unstack(fill_value=0).reset_index())
        states.columns = [str(c).lower() if c != "study" else c for c in states.columns]
        parts += ["## Trials per study (pruned trials stopped early on validation accuracy)\n",
                  markdown_table(states)]
    if "pareto" in table:
        for study, group in table[table["pareto"] == True].groupby("study"):  # noqa: E712
            best = _as_percent(group.sort_values("trial"))
            objective_columns = {c: c[len("objective."):] + (" (%)" if "accuracy" in c else "")
                                 for c in best.columns if c.startswith("objective.") and best[c].notna().any()}
            best = best.assign(run=[_short(p) for p in best["run_dir"]])
            parts += [f"## Best trials of study `{study}` (the Pareto set for several objectives)\n",
                      markdown_table(best, {"trial": "trial", **objective_columns, "test_accuracy": "test acc (%)",
                                            "epsilon_shown": "ε spent", "run": "run"})]
    tuned = private_tuning_table(table)
    if not tuned.empty:
        parts += ["## Private hyperparameter searches (hparams_search=private_tuning)\n",
                  "Each search's released model at the ε of the whole search (Papernot & Steinke 2022), the "
                  "same model at its own run's ε (what papers usually print: the search not accounted), and the "
                  "baseline: one run at the centre of the space (hyperparameters fixed before seeing data, no "
                  "search) at the search's total ε (`tuning.baseline=true`). The other trials are private and "
                  "not shown.\n",
                  markdown_table(_as_percent(tuned), {"search": "search", "row": "", "epsilon": "ε", "delta": "δ",
                                                      "test_accuracy": "test acc (%)",
                                                      "noisy_val_accuracy": "noisy val acc (%)"})]
    if figures:
        parts += ["## Figures\n"] + [f"![{name}]({path.relative_to(out_dir)})\n" for name, path in figures.items()]
    listing = _as_percent(table).assign(run=[_short(p) for p in table.get("run_dir", pd.Series([None] * len(table)))])
    parts += ["## All runs\n", markdown_table(listing, MD_COLUMNS)]
    if "epsilon_valid" in table and ((table["epsilon_valid"] == False) & (table.get("private") == True)).any():  # noqa: E712
        parts.append(f"\n{INVALID_NOTE}\n")
    return "\n".join(parts)


def private_tuning_table(table: pd.DataFrame) -> pd.DataFrame:
    """Three rows per private search released in ``table``: the released model at the
    search's ε, the same model at its own run's ε, and the no-search baseline (if run)."""
    if table.empty or "source" not in table:
        return pd.DataFrame()
    rows: list[dict[str, Any]] = []
    for released in table[table["source"] == "released"].to_dict("records"):
        sweep = Path(str(released["run_dir"])).parent
        name, delta = "/".join(sweep.parts[-2:]), released.get("delta")
        accuracy, noisy = released.get("test_accuracy"), released.get("noisy_val_accuracy")
        rows.append({"search": name, "row": "released model, whole search accounted", "delta": delta,
                     "epsilon": released.get("epsilon"), "test_accuracy": accuracy, "noisy_val_accuracy": noisy})
        rows.append({"search": name, "row": "same model at its run's ε (search not accounted)", "delta": delta,
                     "epsilon": released.get("per_run_epsilon"), "test_accuracy": accuracy,
                     "noisy_val_accuracy": noisy})
        baseline = sweep / "baseline" / RESULT_FILE
        if baseline.is_file():
            result = json.loads(baseline.read_text())
            rows.append({"search": name, "row": "baseline: centre of the space, no search",
                         "delta": result.get("delta"), "epsilon": result.get("epsilon"),
                         "test_accuracy": result.get("test_accuracy")})
        else:
            rows.append({"search": name, "row": "baseline: not run (tuning.baseline=true)"})
    return pd.DataFrame(rows)


def _as_percent(frame: pd.DataFrame) -> pd.DataFrame:
    """Accuracy columns (fractions in result.json) as percentages, for the tables."""
    columns = [c for c in frame.columns if c.endswith("accuracy") and pd.api.types.is_numeric_dtype(frame[c])]
    return frame.assign(**{c: frame[c] * 100.0 for c in columns})


def _short(run_dir: Any) -> str:
    if not isinstance(run_dir, str):
        return ""
    parts = Path(run_dir).parts
    return "/".join(parts[-3:])


def write_report(table: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``runs.csv``, ``runs.md`` and the PNG figures into ``out_dir``; returns them by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    table.to_csv(out_dir / "runs.csv", index=False)
    written["runs.csv"] = out_dir / "runs.csv"
    figures: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. glyph warnings from fonts
        accuracy = plot_accuracy_vs_epsilon(table, out_dir / "accuracy_vs_epsilon.png")
        if accuracy is not None:
            figures["accuracy_vs_epsilon"] = accuracy
        by_mechanism = plot_accuracy_by_mechanism(table, out_dir / "accuracy_by_mechanism.png")
        if by_mechanism is not None:
            figures["accuracy_by_mechanism"] = by_mechanism
        if "metrics" in table:
            for study in sorted(table.loc[table["metrics"].notna(), "study"].dropna().unique()):
                path = plot_pareto(table, study, out_dir / f"pareto_{study}.png")
                if path is not None:
                    figures[f"pareto_{study}"] = path
    (out_dir / "runs.md").write_text(_markdown(table, figures, out_dir))
    written["runs.md"] = out_dir / "runs.md"
    written.update({f"{name}.png": p for name, p in figures.items()})
    return written


# ---------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp_sweeps.analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run, sweep or search folders to gather (searched recursively)")
    parser.add_argument("--out", default="outputs/report", help="folder for runs.csv, runs.md and the figures")
    parser.add_argument("--storage", action="append", default=[],
                        help="an Optuna storage URL to read studies from (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        table = collect_runs(args.paths, storages=args.storage)
    except MissingExtraError as err:  # Optuna studies found, and no search extra
        print(f"dp_sweeps.analysis.report: error: {err}", file=sys.stderr)
        return 1
    if table.empty:
        print(f"dp_sweeps.analysis.report: error: no runs or studies under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    written = write_report(table, args.out)
    counts = table["status"].fillna("unknown").value_counts().to_dict()
    print(f"{len(table)} rows ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})")
    for path in written.values():
        print(f"wrote {path}")
    print(HONEST_EPSILON)
    return 0


if __name__ == "__main__":
    sys.exit(main())

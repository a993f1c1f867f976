"""The paper's tables and plots (arXiv 2412.06689) from whatever has been run.

``python -m dp_sweeps.analysis.paper outputs/paper/<scale>`` reads the runs of each paper
experiment (``conf/experiment/paper_*.yaml``, one folder each) through
:func:`dp_sweeps.analysis.report.collect_runs`, and writes into the same folder, per experiment,
``<experiment>.csv`` / ``<experiment>.md`` (mean ± std of test accuracy over seeds,
per model and value of the varied parameter) and ``<experiment>.png`` (accuracy against
that parameter, one line per model), plus ``summary.md`` / ``summary.csv`` (model × ε,
with the paper's reported figure beside ours) and ``README.md`` linking them all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dp_sweeps.extras import extra

with extra("report", what="dp_sweeps.analysis.paper (make paper-table)", script=__name__ == "__main__"):
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    from matplotlib.figure import Figure

from dp_sweeps.analysis.report import HONEST_EPSILON, _log_x, collect_runs, markdown_table  # noqa: E402

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PaperExperiment:
    name: str
    column: str  # the collect_runs column holding the varied value
    label: str
    log_x: bool = False


EXPERIMENTS = (
    PaperExperiment("paper_epsilon", "target_epsilon", "target ε", log_x=True),
    PaperExperiment("paper_batch", "batch_size", "batch size", log_x=True),
    PaperExperiment("paper_clip", "max_grad_norm", "clipping threshold C"),
    PaperExperiment("paper_lr", "lr", "learning rate", log_x=True),
    PaperExperiment("paper_epochs", "epochs", "epochs"),
    PaperExperiment("paper_optimizer", "optimizer", "optimizer"),
    PaperExperiment("paper_classical", "target_epsilon", "target ε", log_x=True),
)

# Figures the paper reports, keyed by (model, ε) at its best setting otherwise
# (Adam, lr 1e-3, batch 256, δ=1e-5, C=1.0, 100 epochs). Only what it states.
PAPER_REPORTED_ACCURACY = {("efficientnet", 5.0): 0.5963}


def _fmt(mean: float, std: float) -> str:
    if mean != mean:
        return ""
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std == std else f"{100 * mean:.2f}"


def experiment_table(runs: pd.DataFrame, experiment: PaperExperiment) -> pd.DataFrame:
    """Mean ± std over seeds of test accuracy and ε, per model and varied value."""
    done = runs[(runs.get("status") == "completed")] if "status" in runs else runs.iloc[0:0]
    if done.empty or experiment.column not in done:
        return pd.DataFrame()
    done = done.assign(test_accuracy=pd.to_numeric(done["test_accuracy"], errors="coerce"),
                       epsilon=pd.to_numeric(done.get("epsilon"), errors="coerce"),
                       data_name=done["data_name"].fillna("cifar10") if "data_name" in done else "cifar10")
    # Per data set (experiment=paper_* runs on any data choice), then model and varied value.
    table = (done.groupby(["data_name", "model", experiment.column], dropna=False)
             .agg(test_accuracy_mean=("test_accuracy", "mean"), test_accuracy_std=("test_accuracy", "std"),
                  epsilon_mean=("epsilon", "mean"), seeds=("test_accuracy", "size"))
             .reset_index())
    table["test_accuracy"] = [_fmt(m, s) for m, s in zip(table["test_accuracy_mean"], table["test_accuracy_std"])]
    return table.sort_values(["data_name", "model", experiment.column]).reset_index(drop=True)


def plot_experiment(table: pd.DataFrame, experiment: PaperExperiment, path: Path) -> Optional[Path]:
    if table.empty:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=150)
    ax = fig.add_subplot()
    categorical = not pd.api.types.is_numeric_dtype(table[experiment.column])
    categories = sorted(table[experiment.column].astype(str).unique()) if categorical else None
    several = table["data_name"].nunique() > 1
    for i, ((data_name, model), group) in enumerate(table.groupby(["data_name", "model"])):
        x = ([categories.index(str(v)) for v in group[experiment.column]] if categorical
             else group[experiment.column].astype(float).to_numpy())
        y = group["test_accuracy_mean"].to_numpy() * 100
        err = np.nan_to_num(group["test_accuracy_std"].to_numpy() * 100)
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=f"C{i % 10}",
                    label=f"{data_name}: {model}" if several else str(model))
    if categorical:
        ax.set_xticks(range(len(categories)), categories)
    elif experiment.log_x:
        _log_x(ax)
    ax.set_xlabel(experiment.label)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{experiment.name}: test accuracy against {experiment.label}")
    ax.grid(alpha=0.3)
    ax.legend(title="model", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def summary_table(epsilon_table: pd.DataFrame) -> pd.DataFrame:
    """Data set and model × ε (test accuracy, %), with the paper's reported (CIFAR-10)
    figure beside ours."""
    if epsilon_table.empty:
        return pd.DataFrame()
    wide = epsilon_table.pivot(index=["data_name", "model"], columns="target_epsilon", values="test_accuracy")
    wide.columns = [f"ε={c:g}" for c in wide.columns]
    # The paper's figures are CIFAR-10's.
    reported = [", ".join(f"ε={eps:g}: {100 * acc:.2f}" for (m, eps), acc in PAPER_REPORTED_ACCURACY.items()
                          if m == model) if data_name == "cifar10" else "" for data_name, model in wide.index]
    return wide.assign(paper_reported=reported).reset_index()


def build_paper_tables(root: str | Path) -> dict[str, Path]:
    """Write every experiment's table and plot, and the summary, into ``root``."""
    root = Path(root)
    written: dict[str, Path] = {}
    sections = [f"# The paper's experiments ({root.name} scale)\n", f"**Honest ε.** {HONEST_EPSILON}\n",
                "Test accuracy in %, mean ± std over seeds (std is blank for one seed). Paper: "
                "arXiv 2412.06689; it reports EfficientNet 59.63% at ε=5 (Adam, batch 256, lr 1e-3, "
                "C=1.0, 100 epochs, δ=1e-5).\n"]
    tables: dict[str, pd.DataFrame] = {}
    for experiment in EXPERIMENTS:
        folder = root / experiment.name
        if not folder.is_dir():
            continue
        runs = collect_runs([folder], studies=False)
        table = experiment_table(runs, experiment)
        tables[experiment.name] = table
        counts = runs["status"].value_counts().to_dict() if "status" in runs else {}
        table.drop(columns=["test_accuracy_mean", "test_accuracy_std"], errors="ignore").to_csv(
            root / f"{experiment.name}.csv", index=False)
        md = markdown_table(table, {"data_name": "data", "model": "model", experiment.column: experiment.label,
                                    "test_accuracy": "test accuracy (%)", "epsilon_mean": "ε spent",
                                    "seeds": "seeds"}) if not table.empty else "_no completed runs yet_\n"
        (root / f"{experiment.name}.md").write_text(f"# {experiment.name}\n\n{md}")
        written[f"{experiment.name}.md"] = root / f"{experiment.name}.md"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            figure = plot_experiment(table, experiment, root / f"{experiment.name}.png")
        sections.append(f"## {experiment.name}: {experiment.label}\n\nRuns: "
                        + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "\n\n" + md
                        + (f"\n![{experiment.name}]({figure.name})\n" if figure else ""))
    summary = summary_table(tables.get("paper_epsilon", pd.DataFrame()))
    if not summary.empty:
        summary.to_csv(root / "summary.csv", index=False)
        (root / "summary.md").write_text("# Test accuracy (%), model × ε\n\n" + markdown_table(summary))
        written["summary.md"] = root / "summary.md"
        sections.insert(3, "## Summary: model × ε\n\n" + markdown_table(summary))
    (root / "README.md").write_text("\n".join(sections))
    written["README.md"] = root / "README.md"
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dp_sweeps.analysis.paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="outputs/paper/<scale>: the folder holding the paper_* experiment folders")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"dp_sweeps.analysis.paper: error: {args.root} does not exist (run `make paper` first)", file=sys.stderr)
        return 2
    for path in build_paper_tables(args.root).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m dp_sweeps.gpu_check`` (``make gpu-check``): the first hour on a CUDA GPU in
one command, at most about 8 minutes on one H200-class GPU. It writes
``outputs/gpu-check/report.md`` and ``report.json``:

- **Benchmark** (:mod:`dp_sweeps.bench`'s own measurement, reused): every paper model plus
  ``wrn16_4`` and ``scatter_cnn`` at logical batch 256 (``wrn16_4`` also at 4096), in the
  modes non-private, ``auto`` (the engine ``privacy.grad_sample_mode=auto`` picks) and
  Opacus's hooks as shipped, each in fp32 and bf16 (TF32 on). Samples/s, peak memory, and
  DP time per sample over non-private beside the target of 1.3x (fastDP reports < 1.25x).
- **One real epoch** of ConvNet and EfficientNet on a CIFAR-10 copy (``--data-root``; built
  there with ``../shared/data/cifar10/build.py`` when missing and the script exists):
  accuracy, ε (the accountant's), wall time. The runs are :func:`dp_sweeps.run.run`.
- **Cost estimates** in GPU-hours of ``make paper SCALE=full`` and of
  ``experiment=de_wrn16_4``, from the measured throughput, with the formula written out
  (:func:`paper_grid_runs`, :func:`cost_estimates`).

Failure handling: every item runs on its own; an exception (an engine that fails on CUDA,
out of memory, a missing copy of the data) is printed at once, kept in the report's
"Findings", and the check goes on. Nothing falls back to another device or mode: a mode
that fails is reported as failed, not replaced. Items that would overrun the time budget
are listed as skipped, not silently dropped.

``--smoke`` runs the same code on the CPU with tiny sizes (a synthetic CIFAR-10 copy when
there is none) in under 2 minutes: CI runs it. Its figures mean nothing; its point is that
every code path of the GPU run has run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import opacus
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dp_sweeps import bench
from dp_sweeps.classical import is_classical
from dp_sweeps.paths import CONFIG_DIR
from dp_sweeps.privacy import resolve_grad_sample_mode

log = logging.getLogger(__name__)

PAPER_MODELS = bench.DEEP_MODELS
EXTRA_MODELS = ("wrn16_4", "scatter_cnn")
# --smoke: every code path (image models, a feature-map model, two batch sizes), CPU-sized.
SMOKE_MODELS = ("convnet", "wrn16_4", "scatter_cnn")
PRECISIONS = ("fp32", "bf16")
# DP time per sample over non-private: the target, and what fastDP (Bu et al.) reports on GPU.
TARGET_RATIO = 1.3
FASTDP_RATIO = 1.25
PAPER_EXPERIMENTS = ("epsilon", "batch", "clip", "lr", "epochs", "optimizer", "classical")
# Evaluation is a forward pass only: taken as 3x the non-private training throughput.
EVAL_SPEEDUP = 3.0
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPTS = (REPO.parent / "shared" / "data" / "cifar10" / "build.py",
                 REPO / "shared" / "data" / "cifar10" / "build.py")


@dataclass(frozen=True)
class BenchItem:
    model: str
    batch_size: int
    physical_batch_size: int
    steps: int


@dataclass
class CheckPlan:
    """What one check measures; :func:`check_plan` gives the GPU and the smoke plans."""

    smoke: bool
    device: str
    bench_items: list[BenchItem]
    bf16_models: list[str]
    repeats: int
    warmup_batches: int
    epoch_models: list[str]
    epoch_overrides: list[str]
    budget_s: float


def check_plan(*, smoke: bool, models: Optional[Sequence[str]] = None,
               epoch_models: Optional[Sequence[str]] = None, budget_s: Optional[float] = None) -> CheckPlan:
    if smoke:  # the GPU plan's code paths on a CPU, in tiny sizes: one paper model and the two extras
        models = list(models or SMOKE_MODELS)
        # CPU bf16 is emulated on most CPUs (10x slower): one model shows the path works.
        return CheckPlan(smoke=True, device="cpu", bench_items=[BenchItem(m, 8, 8, 1) for m in models],
                         bf16_models=models[:1], repeats=1, warmup_batches=1,
                         epoch_models=list(epoch_models if epoch_models is not None else ("convnet", "efficientnet")),
                         epoch_overrides=["data.train_subset=256", "data.test_subset=128", "trainer.batch_size=64",
                                          "trainer.eval_batch_size=128", "privacy.accountant=rdp"],
                         budget_s=budget_s or 300.0)
    models = list(models or (*PAPER_MODELS, *EXTRA_MODELS))
    items = [BenchItem(m, 256, 256, 4) for m in models]
    if "wrn16_4" in models:
        items.append(BenchItem("wrn16_4", 4096, 1024, 2))
    return CheckPlan(smoke=False, device="cuda", bench_items=items, bf16_models=models, repeats=2, warmup_batches=2,
                     epoch_models=list(epoch_models if epoch_models is not None else ("convnet", "efficientnet")),
                     epoch_overrides=[], budget_s=budget_s or 450.0)


@dataclass
class Report:
    """Everything the check found; failures are findings, printed when they happen."""

    meta: dict
    bench: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    costs: dict = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def finding(self, item: str, err: BaseException | str) -> None:
        if isinstance(err, BaseException):
            entry = {"item": item, "error": bench._one_line(err),
                     "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))[-3000:]}
        else:
            entry = {"item": item, "error": err}
        self.findings.append(entry)
        print(f"[gpu-check] FINDING: {item}: {entry['error']}", file=sys.stderr, flush=True)

    def skip(self, item: str) -> None:
        self.skipped.append(item)
        print(f"[gpu-check] skipped (time budget): {item}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- benchmark

def _make_data(model: str, settings: bench.BenchSettings) -> Callable:
    """Random CIFAR-shaped images, or their features for a model that reads a feature map
    (ScatterNet: the map itself runs on the device, as in a real run)."""
    cfg = bench.compose_bench_config(model_name=model, mode=bench.NON_PRIVATE, settings=settings)
    if cfg.features.name is None:
        return bench.random_cifar
    from dp_sweeps.data.features import apply_feature_map

    spec = OmegaConf.to_container(cfg.features, resolve=True)

    def features(num_train: int, *, seed: int, device: torch.device):
        return apply_feature_map(bench.random_cifar(num_train, seed=seed, device=device), spec, cache_dir=None)
    return features


def bench_modes(model: str) -> tuple[str, list[str]]:
    """(the engine ``auto`` picks, the modes measured: non-private, auto, stock hooks)."""
    auto = resolve_grad_sample_mode("auto", model)
    return auto, list(dict.fromkeys([bench.NON_PRIVATE, auto, bench.STOCK_HOOKS]))


def run_benchmark(item: BenchItem, *, precision: str, plan: CheckPlan, report: Report) -> None:
    name = f"bench {item.model} batch {item.batch_size} {precision}"
    auto, modes = bench_modes(item.model)
    settings = bench.BenchSettings(batch_size=item.batch_size, physical_batch_size=item.physical_batch_size,
                                   steps=item.steps, repeats=plan.repeats, warmup_batches=plan.warmup_batches,
                                   device=plan.device,
                                   overrides=[f"trainer.precision={precision}", "trainer.tf32=true"])
    started = time.perf_counter()
    try:
        records = bench.bench_model(item.model, modes=modes, settings=settings,
                                    make_data=_make_data(item.model, settings))
    except Exception as err:  # the non-private baseline itself failed: nothing to compare with
        report.finding(name, err)
        return
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for record in records:
        record.update(precision=precision, auto_engine=auto, tf32=True,
                      label=f"auto ({auto})" if record["mode"] == auto else
                      ("non-private" if record["mode"] == bench.NON_PRIVATE else "Opacus hooks (stock)"))
        if record["status"] != "ok":
            report.finding(f"{name} {record['label']}", record.get("reason", "failed"))
        report.bench.append(record)
    print(f"[gpu-check] {name}: " + ", ".join(
        f"{r['label']} {bench._fmt(r['samples_per_second'], '.0f')}/s" for r in records)
        + f" ({time.perf_counter() - started:.0f}s)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one real epoch

def write_synthetic_cifar10(root: Path, *, per_batch: int = 100, test: int = 200, seed: int = 0) -> Path:
    """A tiny stand-in in CIFAR-10's official python format (random pixels, cycling
    labels), for the smoke when no copy exists: it exercises the loader, not learning."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, n: int, label: str) -> None:
        payload = {"batch_label": label, "labels": (np.arange(n) % 10).tolist(),
                   "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                   "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    for k in range(1, 6):
        dump(f"data_batch_{k}", per_batch, f"training batch {k} of 5")
    dump("test_batch", test, "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"num_cases_per_batch": per_batch, "num_vis": 3072,
                     "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, fh, protocol=2)
    return root


def ensure_cifar10(root: Path, *, smoke: bool, report: Report) -> Optional[tuple[Path, str]]:
    """(data root, what it is): the copy at ``root``; else one built there by the shared
    build script; else (smoke only) a synthetic stand-in. None, with a finding, otherwise."""
    if (root / "cifar-10-batches-py").is_dir():
        return root, f"CIFAR-10 copy at {root}"
    script = next((s for s in BUILD_SCRIPTS if s.is_file()), None)
    if script is not None:
        started = time.perf_counter()
        try:
            subprocess.run([sys.executable, str(script), str(root)], check=True, timeout=300,
                           capture_output=True, text=True)
            return root, f"CIFAR-10 built at {root} by {script} in {time.perf_counter() - started:.0f}s"
        except (subprocess.SubprocessError, OSError) as err:
            detail = getattr(err, "stderr", "") or ""
            report.finding(f"build CIFAR-10 with {script}", f"{bench._one_line(err)} {detail.strip()[-300:]}")
    if smoke:
        synthetic = write_synthetic_cifar10(Path(tempfile.mkdtemp(prefix="dp_sweeps_gpu_check_")))
        return synthetic, f"synthetic stand-in (random pixels) at {synthetic}: no copy at {root}"
    report.finding("one real epoch", f"no CIFAR-10 copy at {root} and no build script at "
                                     f"{' or '.join(map(str, BUILD_SCRIPTS))}: pass --data-root")
    return None


def compose_config(overrides: Sequence[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=list(overrides))


def run_epoch(model: str, *, data_root: Path, plan: CheckPlan, out: Path, report: Report) -> None:
    """One epoch of the real job (:func:`dp_sweeps.run.run`) at the default privacy."""
    from dp_sweeps.run import run

    name = f"one epoch {model}"
    overrides = [f"model={model}", "trainer.epochs=1", f"data.root={data_root}", "data.download=false",
                 "data.verify_checksums=false", f"trainer.device={plan.device}", "trainer.progress=false",
                 *plan.epoch_overrides]
    started = time.perf_counter()
    try:
        result = run(compose_config(overrides), out / "runs" / model)
    except Exception as err:
        report.finding(name, err)
        return
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    entry = {key: result.get(key) for key in (
        "model", "status", "test_accuracy", "epsilon", "target_epsilon", "delta", "noise_multiplier", "steps",
        "batch_size", "num_train", "num_test", "grad_sample_mode", "train_seconds", "wall_seconds",
        "peak_memory_mb", "train_expected_samples_per_second", "precision", "device")}
    entry["overrides"] = overrides
    entry["check_seconds"] = time.perf_counter() - started
    report.epochs.append(entry)
    if result.get("status") != "completed":
        report.finding(name, f"status {result.get('status')}: {result.get('error')}")
    print(f"[gpu-check] {name}: test accuracy {entry['test_accuracy']}, ε {entry['epsilon']}, "
          f"{entry['wall_seconds']:.0f}s wall", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cost estimates

def _sweep_values(value: Any) -> list[str]:
    text = str(value)
    if any(token in text for token in ("(", "[")):  # range(), choice(), glob(), lists: not a plain grid
        raise ValueError(f"sweep value {text!r} is not a comma-separated list")
    return [v.strip() for v in text.split(",") if v.strip()]


def paper_grid_runs(scale: str = "full") -> list[dict]:
    """Every run of ``make paper SCALE=<scale>``: (experiment, model, epochs, batch size,
    training-set size) from conf/experiment/paper_*.yaml's sweep parameters."""
    runs = []
    for experiment in PAPER_EXPERIMENTS:
        with initialize_config_dir(config_dir=str(CONFIG_DIR)):
            cfg = compose(config_name="config", overrides=[f"experiment=paper_{experiment}", f"scale={scale}"],
                          return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True) or {}
        keys = list(params)
        for combo in itertools.product(*(_sweep_values(params[k]) for k in keys)):
            chosen = dict(zip(keys, combo))
            model = chosen.get("model", cfg.model.name)
            subset = chosen.get("data.train_subset", cfg.data.train_subset)
            num_train = int(subset) if subset not in (None, "null") else CIFAR_TRAIN
            val_size = int(chosen.get("data.val_size", cfg.data.get("val_size", 0)) or 0)
            runs.append({"experiment": experiment, "model": model,
                         "epochs": int(chosen.get("trainer.epochs", cfg.trainer.epochs)),
                         "batch_size": int(chosen.get("trainer.batch_size", cfg.trainer.batch_size)),
                         "num_train": num_train - val_size, "num_eval": CIFAR_TEST + val_size,
                         "classical": is_classical(model)})
    return runs


def de_wrn16_4_runs() -> list[dict]:
    """The ``de_wrn16_4`` recipe at each ε it lists (epochs, batch 4096, augmult 16)."""
    base = compose_config(["experiment=de_wrn16_4"])
    runs = []
    for epsilon, epochs in OmegaConf.to_container(base.de_recipe.epochs_at_epsilon).items():
        runs.append({"epsilon": int(epsilon), "epochs": int(epochs), "batch_size": int(base.trainer.batch_size),
                     "augmult": int(base.trainer.augmult), "num_train": CIFAR_TRAIN - int(base.data.val_size or 0),
                     "num_eval": CIFAR_TEST + int(base.data.val_size or 0), "model": base.model.name})
    return runs


def run_gpu_hours(run: dict, *, dp_samples_per_second: float, non_private_samples_per_second: float) -> float:
    """epochs x (N_train x augmult / DP samples/s + N_eval / (3 x non-private samples/s)) / 3600."""
    train = run["num_train"] * run.get("augmult", 1) / dp_samples_per_second
    evaluation = run["num_eval"] / (EVAL_SPEEDUP * non_private_samples_per_second)
    return run["epochs"] * (train + evaluation) / 3600.0


def _throughput(records: list[dict], *, model: str, batch_size: int, precision: str) -> tuple[Optional[float], ...]:
    """(auto-engine DP samples/s, non-private samples/s) measured for one model."""
    def sps(mode_is_auto: bool) -> Optional[float]:
        for r in records:
            if (r["model"], r["batch_size"], r["precision"]) == (model, batch_size, precision) \
                    and (r["mode"] == r["auto_engine"] if mode_is_auto else r["mode"] == bench.NON_PRIVATE):
                return r.get("samples_per_second")
        return None
    return sps(True), sps(False)


FORMULA = ("GPU-hours = Σ over runs of epochs × (N_train × augmult / DP samples/s + N_eval / (3 × non-private "
           "samples/s)) / 3600, with each model's measured `auto` DP samples/s and non-private samples/s "
           "(evaluation taken as a forward pass at 3× the non-private training throughput)")


def cost_estimates(records: list[dict], *, paper_runs: list[dict], de_runs: list[dict],
                   paper_batch: int = 256, de_batch: int = 4096) -> dict:
    """GPU-hours of the paper grid and of the De et al. recipe, per precision, from the
    benchmark's records. Runs of a model without a measurement are counted, not costed."""
    out: dict[str, Any] = {"formula": FORMULA, "paper_runs": len(paper_runs),
                           "paper_classical_runs": sum(r["classical"] for r in paper_runs), "by_precision": {}}
    for precision in PRECISIONS:
        per_model: dict[str, dict] = {}
        missing: set[str] = set()
        for run in paper_runs:
            if run["classical"]:
                continue  # CPU classifiers (scikit-learn / diffprivlib): no GPU time
            dp, non_private = _throughput(records, model=run["model"], batch_size=paper_batch, precision=precision)
            if not dp or not non_private:
                missing.add(run["model"])
                continue
            entry = per_model.setdefault(run["model"], {"runs": 0, "epochs": 0, "gpu_hours": 0.0,
                                                        "dp_samples_per_second": dp,
                                                        "non_private_samples_per_second": non_private})
            entry["runs"] += 1
            entry["epochs"] += run["epochs"]
            entry["gpu_hours"] += run_gpu_hours(run, dp_samples_per_second=dp,
                                                non_private_samples_per_second=non_private)
        dp, non_private = _throughput(records, model="wrn16_4", batch_size=de_batch, precision=precision)
        de = [{**run, "gpu_hours": run_gpu_hours(run, dp_samples_per_second=dp,
                                                 non_private_samples_per_second=non_private)}
              for run in de_runs] if dp and non_private else []
        out["by_precision"][precision] = {
            "paper_gpu_hours": sum(e["gpu_hours"] for e in per_model.values()) if per_model else None,
            "paper_per_model": per_model, "paper_models_not_measured": sorted(missing),
            "de_wrn16_4": de, "de_wrn16_4_samples_per_second": dp}
    return out


# ---------------------------------------------------------------- report

def _f(value: Optional[float], spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(report: Report) -> str:
    meta = report.meta
    lines = ["# dp_sweeps GPU check", "",
             f"- **Date:** {meta['date']}", f"- **Machine:** {meta['host']}: {meta['device_name']} "
             f"({meta['device']}); {meta['cpu_count']} CPU cores", f"- **Command:** `{meta['command']}`",
             f"- **Versions:** torch {meta['torch']}, CUDA {meta['cuda']}, Opacus {meta['opacus']}; "
             f"bf16 supported: {meta['bf16_supported']}", f"- **Mode:** {meta['mode']}; "
             f"wall time {meta.get('wall_seconds', 0):.0f} s (budget {meta['budget_s']:.0f} s)", ""]
    if meta["mode"] == "smoke":
        lines += ["> Smoke run on the CPU with tiny sizes: it checks that every step of the GPU run works. "
                  "Its figures are not measurements of anything.", ""]
    lines += ["## Findings", ""]
    if report.findings:
        lines += [f"- **{f['item']}**: {f['error']}" for f in report.findings]
    else:
        lines.append("None: every item ran.")
    if report.skipped:
        lines += ["", "Skipped (time budget): " + "; ".join(report.skipped) + "."]
    lines += ["", "## Benchmark", "",
              f"`dp_sweeps.bench` records: samples/s (median of {report.meta['repeats']} repeats of "
              "the project's own training step on random CIFAR-shaped data), peak memory "
              "(`torch.cuda.max_memory_allocated` above the pre-run level on CUDA), DP time per sample over "
              f"non-private. Target: ≤ {TARGET_RATIO}× for every paper model "
              f"(fastDP reports < {FASTDP_RATIO}× on GPU). "
              "TF32 on. `auto` is the engine `privacy.grad_sample_mode=auto` picks.", "",
              "| model | batch (physical) | precision | mode | samples/s | peak MiB | DP / non-private time | "
              f"target ≤ {TARGET_RATIO}× | note |", "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in report.bench:
        ratio = r.get("time_ratio_vs_none")
        target = "" if r["mode"] == bench.NON_PRIVATE else (
            "—" if ratio is None else ("met" if ratio <= TARGET_RATIO else "missed"))
        if r["mode"] != bench.NON_PRIVATE and r["model"] not in PAPER_MODELS and target in ("met", "missed"):
            target += " (not a paper model)"
        lines.append(f"| {r['model']} | {r['batch_size']} ({r['physical_batch_size']}) | {r['precision']} | "
                     f"{r['label']} | {_f(r.get('samples_per_second'), '.1f')} | "
                     f"{_f(r.get('peak_memory_mb'), '.0f')} | "
                     f"{_f(ratio, '.2f')} | {target} | {str(r.get('reason', '')).replace('|', '/')} |")
    lines += ["", "## One real epoch", "",
              "| model | precision | data | test accuracy | ε (accountant) | δ | steps | train s | wall s | "
              "samples/s (expected batch) | peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in report.epochs:
        lines.append(f"| {e['model']} | {e.get('precision')} | {meta.get('data', '')} | "
                     f"{_f(e.get('test_accuracy'), '.4f')} | {_f(e.get('epsilon'), '.3f')} | {e.get('delta')} | "
                     f"{e.get('steps')} | {_f(e.get('train_seconds'), '.1f')} | {_f(e.get('wall_seconds'), '.1f')} | "
                     f"{_f(e.get('train_expected_samples_per_second'), '.0f')} | "
                     f"{_f(e.get('peak_memory_mb'), '.0f')} |")
    costs = report.costs
    lines += ["", "## Cost estimates", ""]
    if costs:
        lines += [f"Formula: {costs['formula']}.", "",
                  f"`make paper SCALE=full`: {costs['paper_runs']} runs, of which {costs['paper_classical_runs']} "
                  "classical (CPU, not costed). Batch sizes other than 256 (the batch experiment) are costed at "
                  "the batch-256 throughput. One run at a time; `JOBS=N` can overlap runs (docs/cluster.md).", "",
                  "| precision | paper grid GPU-hours | per model (runs, epochs, GPU-hours) | not measured | "
                  "de_wrn16_4 GPU-hours per ε (epochs) |", "|---|---:|---|---|---|"]
        for precision, c in costs["by_precision"].items():
            per_model = "; ".join(f"{m}: {v['runs']}, {v['epochs']}, {v['gpu_hours']:.1f}"
                                  for m, v in c["paper_per_model"].items())
            de = "; ".join(f"ε={r['epsilon']}: {r['gpu_hours']:.2f} ({r['epochs']})" for r in c["de_wrn16_4"]) or "—"
            lines.append(f"| {precision} | {_f(c['paper_gpu_hours'], '.1f')} | {per_model or '—'} | "
                         f"{', '.join(c['paper_models_not_measured']) or '—'} | {de} |")
    else:
        lines.append("Not computed (see Findings).")
    return "\n".join(lines) + "\n"


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# ---------------------------------------------------------------- main

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dp_sweeps.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the same check on the CPU, tiny sizes (< 2 minutes)")
    parser.add_argument("--out", default="outputs/gpu-check", help="folder for report.md and report.json")
    parser.add_argument("--data-root", default=os.environ.get("DP_SWEEPS_DATA", "/tmp/dp_sweeps_cifar10"),
                        help="a CIFAR-10 copy (DIR/cifar-10-batches-py), built there if missing and "
                             "../shared/data/cifar10/build.py exists; never inside the repository")
    parser.add_argument("--models", type=bench._csv, default=None,
                        help=f"benchmark only these (default: {','.join((*PAPER_MODELS, *EXTRA_MODELS))})")
    parser.add_argument("--epoch-models", type=bench._csv, default=None,
                        help="models trained for one real epoch (default: convnet,efficientnet; '' for none)")
    parser.add_argument("--precisions", type=bench._csv, default=list(PRECISIONS))
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget; items that would start after it are listed as skipped "
                             "(default 450 on a GPU; 300 for --smoke, a guard: it takes about 1 minute of 2 CPU cores)")
    args = parser.parse_args(argv)
    for bad in set(args.precisions) - set(PRECISIONS):
        parser.error(f"--precisions: unknown {bad!r}; known: {', '.join(PRECISIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: `make gpu-check` is for a GPU machine; `make gpu-check ARGS=--smoke` "
                     "runs the same check on the CPU")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the check; the logging level and thread count it sets are restored on return
    (it also runs in-process, from tests)."""
    quiet, threads = logging.getLogger("dp_sweeps"), torch.get_num_threads()
    level = quiet.level
    try:
        return _check(parse_args(argv), argv)
    finally:
        quiet.setLevel(level)
        torch.set_num_threads(threads)


def _check(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    started = time.perf_counter()
    plan = check_plan(smoke=args.smoke, models=args.models, epoch_models=args.epoch_models, budget_s=args.budget_s)
    deadline = started + plan.budget_s
    device = torch.device(plan.device)
    out = Path(args.out)
    report = Report(meta={
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "device": plan.device, "device_name": bench.device_name(device), "cpu_count": os.cpu_count(),
        "command": "python -m dp_sweeps.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "cuda": torch.version.cuda, "opacus": opacus.__version__,
        "bf16_supported": torch.cuda.is_bf16_supported() if plan.device == "cuda" else "CPU autocast",
        "mode": "smoke" if plan.smoke else "gpu", "budget_s": plan.budget_s, "repeats": plan.repeats,
        "plan": asdict(plan)})
    logging.getLogger("dp_sweeps").setLevel(logging.WARNING)  # the runs' per-epoch lines: not needed here
    if plan.smoke:
        torch.set_num_threads(1)  # a CI runner's few cores: no OpenMP threads spinning against each other

    took: dict[BenchItem, float] = {}  # fp32 durations: what the bf16 phase expects an item to take

    def bench_phase(precision: str, until: float) -> None:
        for item in plan.bench_items:
            if precision == "bf16" and item.model not in plan.bf16_models:
                continue
            if time.perf_counter() + took.get(item, 0.0) > until:
                report.skip(f"bench {item.model} batch {item.batch_size} {precision}")
                continue
            item_started = time.perf_counter()
            run_benchmark(item, precision=precision, plan=plan, report=report)
            took.setdefault(item, time.perf_counter() - item_started)

    # Most informative first: fp32 benchmark, the real epochs, then bf16; each phase has its share.
    precisions = args.precisions
    if "fp32" in precisions:
        bench_phase("fp32", started + 0.45 * plan.budget_s if "bf16" in precisions else deadline - 60)
    if plan.epoch_models:
        data = ensure_cifar10(Path(args.data_root), smoke=plan.smoke, report=report)
        if data is not None:
            report.meta["data"] = data[1]
            for model in plan.epoch_models:
                if time.perf_counter() > started + 0.75 * plan.budget_s:
                    report.skip(f"one epoch {model}")
                    continue
                run_epoch(model, data_root=data[0], plan=plan, out=out, report=report)
    if "bf16" in precisions:
        bench_phase("bf16", deadline)
    try:
        report.costs = cost_estimates(report.bench, paper_runs=paper_grid_runs("full"), de_runs=de_wrn16_4_runs(),
                                      paper_batch=256 if not plan.smoke else 8,
                                      de_batch=4096 if not plan.smoke else 8)
    except Exception as err:
        report.finding("cost estimates", err)
    report.meta["wall_seconds"] = time.perf_counter() - started
    json_path, md_path = write_report(report, out)
    print(md_path.read_text())
    print(f"wrote {md_path} and {json_path} ({report.meta['wall_seconds']:.0f}s, {len(report.findings)} findings)")
    # Findings are the check's result, not a crash: the report is complete either way, and
    # the exit status says whether there are any (so CI's smoke fails on one).
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())

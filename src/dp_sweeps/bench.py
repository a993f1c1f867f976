"""``python -m dp_sweeps.bench``: training throughput and peak memory of every deep
model, non-private and under each Opacus per-example gradient engine.

What is timed is the project's own training step: each measurement composes the real
Hydra config (``model=<name>``, ``privacy=dp`` or ``privacy=none``), builds the model
and optimizer as :func:`dp_sweeps.run.run` does, plans privacy with
:func:`dp_sweeps.privacy.plan_privacy` and runs :func:`dp_sweeps.training.fit` for
one epoch over ``steps`` logical batches of random CIFAR-shaped tensors (the
validation and test sets are empty, so no evaluation is timed). Throughput is
``samples seen / fit's training seconds`` (set-up, accounting and evaluation are
outside that clock).

Method: one process, one data set, every model/mode warmed up first with a short run
of ``warmup_batches`` physical batches (a mode that raises there, or later, is
recorded as ``unsupported`` with its one-line reason: a record, not a crash),
then ``repeats`` rounds that run every supported mode once each, interleaved, so that
a change in machine load hits all modes alike; the median of the repeats is reported.
Ratios between modes of one model are therefore measured under the same conditions;
absolute figures depend on the machine and its load (recorded with each record).

Peak memory (``peak_memory_mb``, the largest over the repeats, above the memory in use
just before ``fit`` starts, when the data and a fresh model already exist):
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's resident set size,
sampled every few milliseconds from ``/proc/self/statm`` after returning freed heap
to the OS (``malloc_trim``). The CPU figure is the training step's working memory as
the OS sees it (activations, per-sample gradients, optimizer state). Without
``/proc`` (not Linux) it is the process's lifetime peak RSS, which earlier modes inflate;
``memory_method`` in each record says which.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import resource
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import opacus
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.classical import is_classical
from dp_sweeps.data import ImageData
from dp_sweeps.grad_sample import samplers as grad_samplers
from dp_sweeps.paths import CONFIG_DIR
from dp_sweeps.privacy import GRAD_SAMPLE_MODES, plan_privacy, resolve_grad_sample_mode
from dp_sweeps.run import build_model, seed_everything
from dp_sweeps.training.backend import configure_backend, resolve_device
from dp_sweeps.training.loop import fit
from dp_sweeps.training.network import build_optimizer, loop_settings
from dp_sweeps.validation import validate_config

log = logging.getLogger(__name__)

DEEP_MODELS = ("convnet", "resnet18", "efficientnet", "vit", "densenet121")
# "none" is privacy=none (the non-private baseline); the rest are Opacus engines.
NON_PRIVATE = "none"
# Opacus's hooks engine exactly as Opacus ships it (without dp_sweeps.grad_sample.samplers): the
# baseline that "hooks" (ours) and every other engine must not be slower than.
STOCK_HOOKS = "opacus_hooks"
ENGINES = tuple(m for m in GRAD_SAMPLE_MODES if m != "auto")
MODES = (NON_PRIVATE, STOCK_HOOKS, *ENGINES)
# σ does not change the cost of a step; a fixed one skips calibration.
BENCH_NOISE_MULTIPLIER = 1.0
NUM_CLASSES = 10


@dataclass
class BenchSettings:
    batch_size: int = 256
    physical_batch_size: Optional[int] = 64
    steps: int = 3
    repeats: int = 3
    warmup_batches: int = 2
    device: str = "auto"
    seed: int = 0
    overrides: list[str] = field(default_factory=list)


def compose_bench_config(*, model_name: str, mode: str, settings: BenchSettings) -> DictConfig:
    """The project's own config for one model and mode (``none`` = ``privacy=none``)."""
    overrides = [f"model={model_name}", f"trainer.batch_size={settings.batch_size}",
                 f"trainer.device={settings.device}", "trainer.progress=false", f"seed={settings.seed}"]
    if settings.physical_batch_size is not None:
        overrides.append(f"trainer.physical_batch_size={settings.physical_batch_size}")
    if mode == NON_PRIVATE:
        overrides.append("privacy=none")
    else:
        overrides += ["privacy=dp", f"privacy.grad_sample_mode={'hooks' if mode == STOCK_HOOKS else mode}",
                      f"privacy.noise_multiplier={BENCH_NOISE_MULTIPLIER}",
                      # the accountant runs once per epoch, outside the timed steps: the fastest one
                      "privacy.accountant=rdp"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=overrides + list(settings.overrides))


def random_cifar(num_train: int, *, seed: int, device: torch.device) -> ImageData:
    """Standard-normal images of CIFAR-10's shape and uniform labels; no val/test split."""
    generator = torch.Generator().manual_seed(seed)
    empty_x, empty_y = torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.long)
    data = ImageData(train_x=torch.randn(num_train, 3, 32, 32, generator=generator),
                     train_y=torch.randint(0, NUM_CLASSES, (num_train,), generator=generator),
                     val_x=empty_x, val_y=empty_y, test_x=empty_x, test_y=empty_y, num_classes=NUM_CLASSES)
    return data.to(device)


class _PeakMemory:
    """Peak memory of the enclosed block above its starting level, in MiB (see module doc)."""

    interval_s = 0.005

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated above the pre-run allocation"
        if not os.path.exists("/proc/self/statm"):
            return "process lifetime peak RSS (ru_maxrss; no /proc on this OS)"
        return (f"process RSS peak above the pre-run RSS (sampled every {self.interval_s * 1000:g} ms, "
                "after malloc_trim)")

    @staticmethod
    def _rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # no /proc: the lifetime peak (kilobytes on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak if sys.platform == "darwin" else peak * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max_rss = max(self._max_rss, self._rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "_PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:  # give freed heap back to the OS, so the baseline is what is really in use
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._start = self._max_rss = self._rss_bytes()
        if not os.path.exists("/proc/self/statm"):
            self._start = 0  # a lifetime peak has no meaningful baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._max_rss, self._rss_bytes())
        self.peak_mb = max(0, peak - self._start) / 2**20


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip()[:300]


def run_fit(*, cfg: DictConfig, data: ImageData, device: torch.device,
            stock_opacus: bool = False) -> tuple[float, float, int]:
    """One epoch of the real loop on ``data`` with a fresh model: (seconds, samples, steps).
    ``stock_opacus``: with Opacus's own per-example gradient code (the baseline)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model, num_classes=data.num_classes)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    plan = plan_privacy(cfg.privacy, num_train=data.num_train, batch_size=cfg.trainer.batch_size, epochs=1)
    mode = resolve_grad_sample_mode(cfg.privacy.grad_sample_mode, cfg.model.name) if plan.private else "hooks"
    # The run's own trainer settings (memory format, augmentation, ...), for one epoch, nothing saved.
    settings = replace(loop_settings(cfg, grad_sample_mode=mode), epochs=1, progress=False,
                       checkpoint_every=0, resume=False)
    configure_backend(device, tf32=cfg.trainer.tf32,
                      reuse_cpu_memory=cfg.trainer.reuse_cpu_memory)
    with warnings.catch_warnings(), (grad_samplers.stock_opacus() if stock_opacus else contextlib.nullcontext()):
        warnings.simplefilter("ignore")  # Opacus's secure-RNG and functorch batching hints
        outcome = fit(model=model, optimizer=optimizer, data=data, plan=plan, settings=settings, device=device)
    if outcome.status != "completed":
        raise RuntimeError(f"training {outcome.status}")
    return outcome.train_seconds, outcome.samples_seen, outcome.steps


def bench_model(model_name: str, *, modes: Sequence[str], settings: BenchSettings,
                make_data: Callable[..., ImageData] = random_cifar) -> list[dict]:
    """Warm up each mode, then interleave ``repeats`` timed rounds; one record per mode.
    ``make_data(num_train, seed=, device=)``: the inputs (random CIFAR-shaped images by
    default; a feature-map model needs its features)."""
    device = resolve_device(settings.device)
    data = make_data(settings.steps * settings.batch_size, seed=settings.seed, device=device)
    # Warm-up: a short run over a few physical batches (kernels, allocator, Opacus hooks).
    physical = settings.physical_batch_size or settings.batch_size
    warmup = make_data(settings.warmup_batches * physical, seed=settings.seed + 1, device=device)
    configs = {mode: compose_bench_config(model_name=model_name, mode=mode, settings=settings) for mode in modes}
    reasons: dict[str, str] = {}
    runs: dict[str, list[tuple[float, float, int, float]]] = {mode: [] for mode in modes}
    for mode in modes:
        try:
            run_fit(cfg=configs[mode], data=warmup, device=device, stock_opacus=mode == STOCK_HOOKS)
        except Exception as err:  # torch.cuda.OutOfMemoryError included: recorded, not fatal
            if mode == NON_PRIVATE:
                raise  # the loop itself is broken: nothing to compare against
            reasons[mode] = _one_line(err)
            log.info("%s/%s unsupported: %s", model_name, mode, reasons[mode])
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    working = [m for m in modes if m not in reasons]
    load_before = os.getloadavg()
    for repeat in range(settings.repeats):
        for mode in working:
            if mode in reasons:  # failed in an earlier repeat
                continue
            try:
                with _PeakMemory(device) as memory:
                    seconds, samples, steps = run_fit(cfg=configs[mode], data=data, device=device,
                                                      stock_opacus=mode == STOCK_HOOKS)
            except Exception as err:
                if mode == NON_PRIVATE:
                    raise
                reasons[mode] = _one_line(err)
                continue
            runs[mode].append((seconds, samples, steps, memory.peak_mb))
            log.info("%s/%s repeat %d: %.1f samples/s, %.0f MiB", model_name, mode, repeat + 1,
                     samples / seconds, memory.peak_mb)
    load_after = os.getloadavg()
    common = {"device": str(device), "device_name": device_name(device), "batch_size": settings.batch_size,
              "physical_batch_size": settings.physical_batch_size or settings.batch_size,
              "steps": settings.steps, "repeats": settings.repeats, "warmup_batches": settings.warmup_batches,
              "torch_threads": torch.get_num_threads(), "load_average_before": round(load_before[0], 2),
              "load_average_after": round(load_after[0], 2), "memory_method": _PeakMemory(device).method,
              "torch_version": torch.__version__, "opacus_version": opacus.__version__,
              "overrides": list(settings.overrides), "host": platform.node()}
    records = []
    for mode in modes:
        record = {"model": model_name, "mode": mode, **common}
        if mode in reasons:
            record.update(status="unsupported", reason=reasons[mode], samples_per_second=None,
                          peak_memory_mb=None)
        else:
            throughputs = [samples / seconds for seconds, samples, _, _ in runs[mode]]
            record.update(status="ok", samples_per_second=statistics.median(throughputs),
                          samples_per_second_runs=throughputs,
                          seconds_per_step=statistics.median(s / n for s, _, n, _ in runs[mode]),
                          peak_memory_mb=max(m for *_, m in runs[mode]))
        records.append(record)
    add_ratios(records)
    return records


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def add_ratios(records: list[dict]) -> None:
    """``time_ratio_vs_none``: time per sample relative to non-private training of the same
    model (1.0 = no DP overhead); ``speedup_vs_hooks``: how much faster than Opacus's hooks
    engine as Opacus ships it (``opacus_hooks``) when measured, else than ``hooks``."""
    by_key = {(r["model"], r["device"], r["mode"]): r for r in records}
    for r in records:
        none = by_key.get((r["model"], r["device"], NON_PRIVATE), {}).get("samples_per_second")
        hooks = (by_key.get((r["model"], r["device"], STOCK_HOOKS), {}).get("samples_per_second")
                 or by_key.get((r["model"], r["device"], "hooks"), {}).get("samples_per_second"))
        mine = r.get("samples_per_second")
        r["time_ratio_vs_none"] = none / mine if mine and none else None
        r["speedup_vs_hooks"] = mine / hooks if mine and hooks and r["mode"] != NON_PRIVATE else None


def fastest_engine(records: list[dict], model_name: str, device: str) -> Optional[str]:
    """The Opacus engine with the highest measured throughput for a model, if any ran."""
    candidates = [r for r in records if r["model"] == model_name and r["device"] == device
                  and r["mode"] in ENGINES and r.get("samples_per_second")]
    return max(candidates, key=lambda r: r["samples_per_second"])["mode"] if candidates else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(records: list[dict]) -> str:
    """One row per model and mode, with the DP/non-private time ratio and the speed-up over hooks."""
    lines = ["# dp_sweeps benchmark", ""]
    for device in dict.fromkeys(r["device"] for r in records):
        rows = [r for r in records if r["device"] == device]
        first = rows[0]
        lines += [f"## {device} ({first['device_name']})", "",
                  f"torch {first['torch_version']}, opacus {first['opacus_version']}, {first['torch_threads']} "
                  f"torch threads. samples/s: median of the repeats. DP/non-private: time per sample "
                  f"relative to privacy=none for the same model (1.00 = no overhead). "
                  f"Peak memory: {first['memory_method']}.", "",
                  f"{STOCK_HOOKS}: Opacus's hooks engine as shipped; hooks: the same engine with "
                  f"dp_sweeps.grad_sample.samplers and dp_sweeps.grad_sample.bookkeeping "
                  "(same clipped, noised gradients). "
                  f"Speed-up: vs {STOCK_HOOKS} where measured.", "",
                  "| model | mode | samples/s | DP/non-private time | speed-up vs hooks | peak MiB | "
                  "auto picks | batch (physical) | steps x repeats | load avg | note |",
                  "|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
        for r in rows:
            auto = resolve_grad_sample_mode("auto", r["model"])
            lines.append(
                f"| {r['model']} | {r['mode']} | {_fmt(r['samples_per_second'], '.1f')} | "
                f"{_fmt(r['time_ratio_vs_none'], '.2f')} | {_fmt(r['speedup_vs_hooks'], '.2f')} | "
                f"{_fmt(r['peak_memory_mb'], '.0f')} | {'yes' if r['mode'] == auto else ''} | "
                f"{r['batch_size']} ({r['physical_batch_size']}) | {r['steps']} x {r['repeats']} | "
                f"{r['load_average_before']}→{r['load_average_after']} | "
                f"{r.get('reason', '').replace('|', '/')} |")
        fastest = {m: fastest_engine(rows, m, device) for m in dict.fromkeys(r["model"] for r in rows)}
        lines += ["", "Fastest measured engine per model (auto also asks for >= 10% over hooks, and "
                  "that the engine runs every physical batch size): "
                  + ", ".join(f"{m}: {e or '—'}" for m, e in fastest.items()) + ".", ""]
    return "\n".join(lines)


def write_outputs(records: list[dict], out_dir: str | os.PathLike, *, merge: bool = False) -> tuple[Path, Path]:
    """Write ``bench.json`` (a list of records) and ``bench.md``. With ``merge``, records
    of other models/devices already in ``bench.json`` are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "bench.json", out / "bench.md"
    if merge and json_path.is_file():
        fresh = {(r["model"], r["device"]) for r in records}
        kept = [r for r in json.loads(json_path.read_text()) if (r["model"], r["device"]) not in fresh]
        records = kept + records
    json_path.write_text(json.dumps(records, indent=2) + "\n")
    md_path.write_text(markdown_table(records))
    return json_path, md_path


# docs/benchmarks.md's generated section lies between these lines (the rest is hand-written).
DOCS_BEGIN = "<!-- generated by `python -m dp_sweeps.bench --docs`: begin -->"
DOCS_END = "<!-- generated by `python -m dp_sweeps.bench --docs`: end -->"


def docs_section(bench_md: str, *, command: str, date: str, machine: str) -> str:
    """The benchmarks page's generated section: ``bench.md`` under its stamp (date,
    machine, command), its title levels pushed below the page's."""
    body = "\n".join(("#" + line if line.startswith("#") else line) for line in bench_md.splitlines()[2:])
    return "\n".join([DOCS_BEGIN, "", "## Latest `make bench` run (generated)", "",
                      f"- **Date:** {date}", f"- **Machine:** {machine}", f"- **Command:** `{command}`", "",
                      body.strip(), "", DOCS_END])


def write_docs_page(page: str | os.PathLike, section: str) -> Path:
    """Replace the generated section of ``page`` (append it when the page has none)."""
    path = Path(page)
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if DOCS_BEGIN in text and DOCS_END in text:
        head, rest = text.split(DOCS_BEGIN, 1)
        text = head + section + rest.split(DOCS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    return path


def machine_description(records: list[dict]) -> str:
    first = records[0] if records else {}
    return (f"{platform.node()}, {os.cpu_count()} CPU cores, {first.get('device_name', '?')}; "
            f"torch {first.get('torch_version', torch.__version__)}, opacus {first.get('opacus_version', '?')}")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dp_sweeps.bench",
        description="Samples/s and peak memory of the training step, per model and per-example gradient engine.")
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides applied to every measured config (e.g. model.width=8)")
    parser.add_argument("--models", type=_csv, default=list(DEEP_MODELS),
                        help=f"comma-separated (default: {','.join(DEEP_MODELS)})")
    parser.add_argument("--modes", type=_csv, default=list(MODES),
                        help=f"comma-separated, 'none' = privacy=none (default: {','.join(MODES)})")
    parser.add_argument("--steps", type=int, default=3, help="logical batches per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    parser.add_argument("--warmup-batches", type=int, default=2,
                        help="physical batches run per mode before timing")
    parser.add_argument("--batch-size", type=int, default=256, help="logical batch")
    parser.add_argument("--physical-batch-size", type=int, default=64,
                        help="memory cap per forward/backward (0 = the logical batch)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op CPU threads (0 = torch's default); on a shared machine 1 "
                             "avoids OpenMP threads spinning against other processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/bench", help="folder for bench.json and bench.md")
    parser.add_argument("--docs", default=None, metavar="PAGE",
                        help="also write bench.md, stamped with date, machine and command, into PAGE's generated "
                             "section (e.g. docs/benchmarks.md)")
    parser.add_argument("--merge", action="store_true",
                        help="keep other models' records already in OUT/bench.json")
    args = parser.parse_args(argv)
    for bad in set(args.modes) - set(MODES):
        parser.error(f"--modes: unknown mode {bad!r}; known: {', '.join(MODES)}")
    for name, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--batch-size", args.batch_size),
                        ("--warmup-batches", args.warmup_batches)):
        if value < 1:
            parser.error(f"{name}={value} must be >= 1")
    for name in args.models:
        path = CONFIG_DIR / "model" / f"{name}.yaml"
        if not path.is_file():
            parser.error(f"--models: no config conf/model/{name}.yaml; the paper's: {', '.join(DEEP_MODELS)}")
        model_cfg = OmegaConf.load(path)
        if is_classical(name) or "defaults" in model_cfg:  # classical, or a model that reads a feature map
            parser.error(f"--models: {name} does not train on images with DP-SGD (classical or feature-map "
                         f"model); the bench measures image models")
    if args.threads < 0:
        parser.error(f"--threads={args.threads} must be >= 0")
    if args.physical_batch_size < 0:
        parser.error(f"--physical-batch-size={args.physical_batch_size} must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda but no CUDA device is available")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if not log.handlers:  # progress lines on stderr (a dependency already configured the root logger)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[bench] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings(batch_size=args.batch_size, physical_batch_size=args.physical_batch_size or None,
                             steps=args.steps, repeats=args.repeats, warmup_batches=args.warmup_batches,
                             device=args.device, seed=args.seed, overrides=args.overrides)
    try:  # bad overrides fail here, in one line, before anything is timed
        for model_name in args.models:
            for mode in args.modes:
                validate_config(compose_bench_config(model_name=model_name, mode=mode, settings=settings))
    except Exception as err:
        raise SystemExit(f"dp_sweeps.bench: error: {_one_line(err)}") from None
    records: list[dict] = []
    for model_name in args.models:
        started = time.perf_counter()
        records += bench_model(model_name, modes=args.modes, settings=settings)
        log.info("%s done in %.0fs", model_name, time.perf_counter() - started)
    json_path, md_path = write_outputs(records, args.out, merge=args.merge)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if args.docs:
        command = "python -m dp_sweeps.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        page = write_docs_page(args.docs, docs_section(md_path.read_text(), command=command, date=date,
                                                        machine=machine_description(records)))
        print(f"wrote the generated section of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

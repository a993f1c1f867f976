"""Configs composed in-process and shrunk to seconds (CPU, tiny data, one epoch), the CLI
run in this process or as ``python -m dp_sweeps``, and a run's saved weights evaluated
again (what a test compares a reported accuracy with)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from dp_sweeps.paths import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]

# The smallest convnet: a run of one epoch on the tiny set takes about a second.
TINY_CONVNET = ["model=convnet", "model.width=4", "model.hidden=16"]
# The frontier search's space, shrunk to the tiny data.
TINY_FRONTIER = ("privacy.epsilon=tag(log, interval(0.5, 4))", "trainer.batch_size=choice(32,64)")


def tiny_overrides(data_root: str | os.PathLike) -> list[str]:
    """Tiny data at ``data_root`` (no download, no checksums), one epoch on the CPU."""
    return [f"data.root={data_root}", "data.download=false", "data.verify_checksums=false",
            "trainer.epochs=1", "trainer.batch_size=64", "trainer.device=cpu", "trainer.progress=false",
            "trainer.eval_batch_size=256"]


def compose_config(overrides: list[str], *, return_hydra_config: bool = False) -> DictConfig:
    """conf/config.yaml with ``overrides``, composed in this process (no run folder)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def tiny_sweep_overrides(data_root: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """A tiny convnet run into ``out``, with the RDP accountant (its σ calibration takes
    milliseconds, PRV's seconds: the sweep machinery is what these runs test)."""
    return tiny_overrides(data_root) + [*TINY_CONVNET, "privacy.accountant=rdp", f"paths.output_dir={out}"]


def search_overrides(data_root: str | os.PathLike, out: str | os.PathLike, name: str, *extra: str) -> list[str]:
    """``hparams_search=name`` on tiny runs, with a validation split of 100 held out of the
    500 tiny training images; a later override of a key replaces the search range (or
    fixed value) that came before it."""
    return [f"hparams_search={name}", *tiny_sweep_overrides(data_root, out), "data.val_size=100", *extra, "-m"]


def run_cli(args: list[str], *, cwd: Path, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m dp_sweeps ARGS`` in a subprocess: the real entrypoint, end to end."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dp_sweeps", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def _spare_captured_streams() -> None:
    """absl's logging handler (absl comes with Google's dp_accounting) writes to the
    ``sys.stderr`` of its import, under pytest a capture file, and closes that stream when
    Hydra reconfigures logging unless it is the ``sys.stderr`` of that moment (with
    ``capsys``, another file): pytest's capture then fails on a closed file. Point the
    handler at the process's own stderr, which it never closes."""
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


@contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """``sys.argv`` set to ``dp_sweeps ARGS``; the root logger (which Hydra points at its
    job logs) and the argv restored afterwards."""
    _spare_captured_streams()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv, sys.argv = sys.argv, ["dp_sweeps", *args]
    try:
        yield
    finally:
        sys.argv = argv
        root.handlers[:] = handlers
        root.setLevel(level)


def run_main(args: list[str], capsys) -> str:
    """``python -m dp_sweeps ARGS`` in this process (the CLI's own ``main``, without the
    seconds of interpreter and import start-up); returns what it logged. An exit
    (``SystemExit``) propagates."""
    from dp_sweeps.__main__ import main

    with _argv(args):
        main()
    captured = capsys.readouterr()
    return captured.out + captured.err


def cli_in_process(args: list[str], capsys) -> subprocess.CompletedProcess:
    """:func:`run_cli` without the subprocess: the CLI's ``main`` in this process, with its
    exit turned into what the process would have given (status, and the message that
    Python prints for ``SystemExit("...")`` as the last line of stderr)."""
    from dp_sweeps.__main__ import main

    code: int | str | None = 0
    with _argv(args):
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code
    captured = capsys.readouterr()
    stderr = captured.err
    if code is None:
        code = 0
    elif not isinstance(code, int):
        stderr, code = f"{stderr}{code}\n", 1
    return subprocess.CompletedProcess(["dp_sweeps", *args], code, captured.out, stderr)


def reevaluate(cfg: DictConfig, run_dir: str | os.PathLike) -> tuple[float, float]:
    """(loss, accuracy) on the test split of the weights that ``run(cfg, run_dir)`` saved
    in its last checkpoint (``trainer.checkpoint_every`` > 0), loaded into a model built
    afresh from ``cfg`` and evaluated with :func:`dp_sweeps.training.evaluate.evaluate`:
    what a run reports as its test loss and accuracy. With ``trainer.ema_decay`` the
    weights are the EMA copy's, which is what such a run evaluates."""
    from omegaconf import OmegaConf

    from dp_sweeps.data.features import apply_feature_map
    from dp_sweeps.run import build_model, load_data
    from dp_sweeps.training.checkpoint import checkpoint_path, load_checkpoint
    from dp_sweeps.training.evaluate import evaluate

    data = load_data(cfg.data)
    if cfg.trainer.eval_flip:
        data = data.with_mirrors()
    if cfg.features.name is not None:
        data = apply_feature_map(data, OmegaConf.to_container(cfg.features, resolve=True),
                                 cache_dir=cfg.data.feature_cache)
    model = build_model(cfg.model, data.facts)
    saved = load_checkpoint(checkpoint_path(run_dir))
    if cfg.trainer.ema_decay is None:
        weights = saved["model"]
    else:  # torch's AveragedModel: the copy under "module.", and its update counter
        weights = {k[len("module."):]: v for k, v in saved["ema"].items() if k.startswith("module.")}
    model.load_state_dict(weights)
    return evaluate(model, data.test_x, data.test_y, batch_size=cfg.trainer.eval_batch_size,
                    x_mirror=data.test_x_mirror)

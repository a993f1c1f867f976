"""Public pretraining for the offline proxy: train a timm backbone *non-privately* with
the one job (:func:`dp_sweeps.run.run`, ``privacy=none``) and save its weights as a
timm-format state dict, which ``model.checkpoint=<file>`` then loads.

    python -m dp_sweeps.pretrain --out /path/backbone.pth -- \\
        model.arch=resnet10t data.classes=[0,1,2,3,4] trainer.epochs=5 ...

This is a proxy for public pretraining (an ImageNet or in21k checkpoint) on a machine
with no network: classes 0-4 of CIFAR-10 play the "public" data and classes 5-9 the
private task (docs/finetuning.md). The pretraining data must be public, and here are
disjoint *classes* of the same data set, not a different distribution: it is not the
published setting, and its figures measure only the mechanics.

Defaults (each overridable after ``--``): ``model=timm``, ``model.batchnorm=batch_stats``
(ordinary BatchNorm: the run is non-private), ``privacy=none``, and a checkpoint at the
last epoch, from which the backbone's weights are taken. The run folder (``--run-dir``)
keeps the pretraining's own ``result.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from hydra import compose, initialize_config_dir

from dp_sweeps.errors import ConfigError
from dp_sweeps.paths import CONFIG_DIR

log = logging.getLogger(__name__)

PRETRAIN_DEFAULTS = ("model=timm", "model.batchnorm=batch_stats", "privacy=none", "optimized_metric=null")


def pretrain(*, out: str | Path, overrides: Sequence[str], run_dir: str | Path) -> dict:
    """Run the non-private job described by :data:`PRETRAIN_DEFAULTS` + ``overrides`` into
    ``run_dir`` and write the backbone's timm-format state dict to ``out``. Returns the
    job's record."""
    from dp_sweeps.run import run
    from dp_sweeps.training import checkpoint as ckpt

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=[*PRETRAIN_DEFAULTS, *overrides])
    if cfg.model.name != "timm":
        raise ConfigError(f"dp_sweeps.pretrain saves timm backbones: model={cfg.model.name!r} is not model=timm")
    if cfg.privacy.enabled:
        raise ConfigError("dp_sweeps.pretrain is the *public*, non-private pretraining: use privacy=none")
    cfg.trainer.checkpoint_every = int(cfg.trainer.epochs)  # one checkpoint, after the last epoch
    cfg.trainer.resume = False
    result = run(cfg, run_dir)
    if result.get("status") != "completed":
        raise RuntimeError(f"pretraining ended with status {result.get('status')!r}")
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(run_dir))
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in saved["model"].items() if k.startswith(prefix)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    log.info("pretrained %s: test accuracy %.4f on its classes; weights in %s", cfg.model.arch,
             result.get("test_accuracy") or float("nan"), out)
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dp_sweeps.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the backbone's state dict (.pth)")
    parser.add_argument("--run-dir", default=None, help="the pretraining run's folder (default: <out>.run/)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the job, e.g. model.arch=resnet10t")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    run_dir = Path(args.run_dir) if args.run_dir else Path(f"{args.out}.run")
    try:
        pretrain(out=args.out, overrides=args.overrides, run_dir=run_dir)
    except ConfigError as err:
        raise SystemExit(f"dp_sweeps.pretrain: error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])

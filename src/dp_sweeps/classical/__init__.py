"""Classical classifiers under DP (linear SVM, k-nearest neighbours, Gaussian Naive
Bayes), run by :func:`dp_sweeps.run.run` for model configs with ``family: classical``.

Each classifier is one module that registers itself with :func:`register_classifier`
(a runner and the dataclass of its ``model.*`` settings); :func:`run_classical` is the
only door, and nothing branches on a classifier's name. Every module's docstring states
its guarantee: which mechanism, what is released, how ε is spent and split. All of them
are DP with respect to adding or removing one training example, like DP-SGD in
:mod:`dp_sweeps.privacy`; the reported ``epsilon`` is what the composition computes for
the mechanisms actually run, never the configured target.

Features (the ``features`` config group) are applied by :func:`dp_sweeps.run.run` before any of this: only
data-independent maps (:mod:`dp_sweeps.data.features`), which cost no privacy.

Optional dependencies: a classifier that needs packages beyond the core install (the
``classical`` extra: scikit-learn, diffprivlib) imports them in its ``imports`` hook and
where it uses them, never at module import, so every classifier registers without them
and :func:`load_classifier` (run before any data is read) names the missing extra in one
line. diffprivlib is imported through :func:`import_diffprivlib` only, which installs its
scikit-learn shim (:mod:`dp_sweeps.compat.sklearn_tree`) first: explicitly, idempotently,
and not before a classifier that uses it is run.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import platform
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.data import ImageData
from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import extra
from dp_sweeps.training.results import NON_PRIVATE, non_private_stats_enabled

log = logging.getLogger(__name__)

# The keys of a model config that train() reads; every other key is a classifier setting.
COMMON_MODEL_KEYS = ("name",)

# runner(cfg, settings, *, data, device, output_dir) -> the classifier's result fields.
Runner = Callable[..., Dict[str, Any]]


@dataclass(frozen=True)
class Classifier:
    name: str
    settings: type  # a dataclass: its fields are the model.* keys, validated in __post_init__
    run: Runner
    # Imports the packages it needs beyond the core install (MissingExtraError if one is missing).
    imports: Optional[Callable[[], Any]] = None


_CLASSIFIERS: Dict[str, Classifier] = {}
_BUILTIN_MODULES = ("naive_bayes", "knn", "svm")


def register_classifier(name: str, *, settings: type,
                        imports: Optional[Callable[[], Any]] = None) -> Callable[[Runner], Runner]:
    """Register ``run`` under ``name`` with its settings dataclass (Opacus/timm style), and
    ``imports``, which imports its optional dependencies (see the module docstring)."""
    def decorator(run: Runner) -> Runner:
        if name in _CLASSIFIERS:
            raise ValueError(f"classifier {name!r} is registered twice")
        if not dataclasses.is_dataclass(settings):
            raise TypeError(f"settings of classifier {name!r} must be a dataclass")
        _CLASSIFIERS[name] = Classifier(name=name, settings=settings, run=run, imports=imports)
        return run
    return decorator


def import_diffprivlib(*, model: str) -> types.ModuleType:
    """diffprivlib for ``model``, imported after its scikit-learn shim, which this call
    installs (:func:`dp_sweeps.compat.sklearn_tree.patch_sklearn_tree`; idempotent).
    Without the ``classical`` extra: a one-line MissingExtraError naming it."""
    from dp_sweeps.compat import sklearn_tree

    with extra("classical", what=f"model={model}"):
        return sklearn_tree.import_diffprivlib()


def _import_builtin() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")


def list_classifiers() -> list[str]:
    _import_builtin()
    return sorted(_CLASSIFIERS)


def is_classical(name: str) -> bool:
    """Whether ``name`` is a classical classifier (else a network from dp_sweeps.models)."""
    return name in _BUILTIN_MODULES or name in _CLASSIFIERS


def get_classifier(name: str) -> Classifier:
    _import_builtin()
    if name not in _CLASSIFIERS:
        raise ConfigError(f"model.name={name!r} is not a classical classifier; known: {', '.join(list_classifiers())}")
    return _CLASSIFIERS[name]


def load_classifier(name: str) -> Classifier:
    """:func:`get_classifier`, with the classifier's optional dependencies imported: a
    missing extra is a one-line :class:`~dp_sweeps.extras.MissingExtraError` (a ConfigError)."""
    classifier = get_classifier(name)
    if classifier.imports is not None:
        classifier.imports()
    return classifier


def read_settings(model_cfg: DictConfig | dict, settings_cls: type, *, model: str) -> Any:
    """The classifier's settings from ``model.*`` (minus name/family/features); an unknown
    key or a bad value is a :class:`ConfigError` naming it."""
    values = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    for key in COMMON_MODEL_KEYS:
        values.pop(key, None)
    known = [f.name for f in dataclasses.fields(settings_cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"model.{key} is not a setting of model={model} (its settings: {', '.join(known)})")
    return settings_cls(**values)


def as_matrix(x: torch.Tensor) -> np.ndarray:
    """Examples as rows of a float64 NumPy matrix (N x features), whatever their shape."""
    return x.detach().to("cpu", torch.float64).reshape(len(x), -1).numpy()


def accuracy(predicted: np.ndarray, labels: torch.Tensor) -> Optional[float]:
    """Fraction of ``predicted`` equal to ``labels``; None for an empty split."""
    if len(labels) == 0:
        return None
    return float(np.mean(np.asarray(predicted) == labels.cpu().numpy()))


def target_epsilon(cfg: DictConfig, *, model: str) -> float:
    """``privacy.epsilon`` for a mechanism calibrated to a target ε (all but DP-SGD):
    a given ``privacy.noise_multiplier`` (a DP-SGD setting) is refused, not ignored."""
    if cfg.privacy.get("noise_multiplier") is not None:
        raise ConfigError(f"privacy.noise_multiplier={cfg.privacy.noise_multiplier!r} is a DP-SGD setting; "
                          f"model={model} spends privacy.epsilon (set noise_multiplier=null)")
    return float(cfg.privacy.epsilon)


def run_classical(cfg: DictConfig, *, data: ImageData, device: torch.device, output_dir: str | Path) -> dict[str, Any]:
    """Fit (or, with ``cfg.dry_run``, only plan) the classifier ``cfg.model.name`` on
    ``data`` and return the run's full result record (``result.json``).

    Bad settings raise :class:`ConfigError` before anything is fitted or written.
    """
    classifier = load_classifier(cfg.model.name)
    settings = read_settings(cfg.model, classifier.settings, model=classifier.name)
    private = bool(cfg.privacy.enabled)
    features = cfg.features if cfg.features.name is not None else None
    record: dict[str, Any] = {
        "model": classifier.name, "family": "classical", "private": private,
        "features": OmegaConf.to_container(features, resolve=True) if features else None,
        "num_features": int(np.prod(data.train_x.shape[1:])),
        "settings": dataclasses.asdict(settings),
        "target_epsilon": float(cfg.privacy.epsilon) if private and cfg.privacy.get("epsilon") is not None else None,
        "seed": cfg.seed, "num_train": data.num_train, "num_val": len(data.val_y), "num_test": len(data.test_y),
        "device": str(device), "host": platform.node(),
    }
    fields = classifier.run(cfg, settings, data=data, device=device, output_dir=Path(output_dir))
    record.update(fields)
    record.setdefault("status", "planned" if cfg.dry_run else "completed")
    # Only DP-SGD's ε rests on an assumption a config can break (Poisson sampling).
    # (and privacy.noise_seed, which makes the mechanism's noise replayable).
    record.setdefault("epsilon_valid", private and cfg.privacy.noise_seed is None)
    # Training accuracy is a function of the private training set outside the mechanism.
    train_accuracy = record.pop("train_accuracy", None)
    if non_private_stats_enabled(cfg.trainer.non_private_stats, private=private):
        record[NON_PRIVATE] = {"train_accuracy": train_accuracy}
    if not private:
        record.update(epsilon=None, delta=None)
    log.info("%s (%s): test_accuracy=%s epsilon=%s delta=%s", classifier.name, record["status"],
             record.get("test_accuracy"), record.get("epsilon"), record.get("delta"))
    return record

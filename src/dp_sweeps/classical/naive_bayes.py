"""Gaussian Naive Bayes with pure ε-DP (diffprivlib's mechanism; Vaidya et al. 2013).

Guarantee: the released model (class priors, per-class means and variances of every
feature) is ε-DP with respect to adding or removing one training example, with δ = 0
(``privacy.delta`` is not used). ε = ``privacy.epsilon`` is split in three equal parts:

- ε/3: the class counts, one geometric mechanism per class (sensitivity 1; an example
  is in one class, so the histogram costs ε/3 by parallel composition);
- ε/3: the per-class feature sums, Laplace with sensitivity ``upper - lower`` of the
  feature, ε/(3d) for each of the d features;
- ε/3: the per-class sums of squared deviations from the noisy mean, Laplace with
  sensitivity ``max(mean - lower, upper - mean)^2``, ε/(3d) per feature.

Classes are disjoint, so each feature's mean (and variance) mechanisms over all classes
cost ε/(3d) together. The reported ``epsilon`` is the total of a diffprivlib
``BudgetAccountant`` charged with each mechanism's ε as it runs.

Bounds are never read from the data: they come from the feature map's definition and
the data set's public normalisation constants (:func:`dp_sweeps.data.features.pixels.feature_bounds`),
and every feature is clipped to them before fitting. The add/remove sensitivity of a
sum is ``max(|lower|, |upper|)``, which diffprivlib's ``upper - lower`` covers only when
``lower <= 0 <= upper``: checked.

What differs from calling ``diffprivlib.models.GaussianNB.fit`` (its mechanisms and its
``_update_mean_variance`` are used as they are): diffprivlib rescales the noisy counts
to sum to the true N and only estimates classes present in ``y``. Under add/remove-one
both leak (N exactly; whether a class is empty), so here the counts are left as drawn
(clipped to ≥ 1, post-processing) and every class of the public label set gets noisy
statistics, present or not.

``privacy=none``: scikit-learn's ``GaussianNB`` (the non-private baseline).

scikit-learn and diffprivlib (the ``classical`` extra) are imported on first use, not at
module import: :func:`_import_dependencies` (run by the registry's ``imports`` hook, by
the runner, or by asking this module for :class:`PublicDomainGaussianNB` or another of
:data:`_DEPENDENT_NAMES`) imports them, diffprivlib after its scikit-learn shim, and
defines those names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from dp_sweeps.classical import accuracy, as_matrix, import_diffprivlib, register_classifier, target_epsilon
from dp_sweeps.data.features.pixels import feature_bounds
from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy.randomness import mechanism_random_state
from dp_sweeps.validation import require_number

# ε is split evenly between counts, means and variances (diffprivlib's split).
BUDGET_PARTS = ("class_counts", "means", "variances")
# The module attributes that _import_dependencies() defines (see the module docstring).
_DEPENDENT_NAMES = ("PublicDomainGaussianNB", "BudgetAccountant", "GeometricTruncated", "DiffprivlibGaussianNB",
                    "SklearnGaussianNB", "check_random_state", "validate_data")


@dataclass(frozen=True)
class NaiveBayesSettings:
    # Added to every variance. DP: absolute (diffprivlib), guards against noisy variances
    # near 0. privacy=none: scikit-learn's, times the largest feature variance.
    var_smoothing: float = 1e-2

    def __post_init__(self) -> None:
        require_number("model.var_smoothing", self.var_smoothing, low=0, low_open=False)


class _PublicDomain:
    """The methods of :class:`PublicDomainGaussianNB`, which is this class on top of
    diffprivlib's GaussianNB, defined once diffprivlib is imported (:func:`_import_dependencies`)."""

    def __init__(self, *, epsilon=1.0, bounds=None, classes=None, var_smoothing=1e-9, random_state=None,
                 accountant=None):
        super().__init__(epsilon=epsilon, bounds=bounds, var_smoothing=var_smoothing, random_state=random_state,
                         accountant=accountant)
        self.classes = classes

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        raise NotImplementedError("each call would spend ε again: fit once")

    def _partial_fit(self, X, y, classes=None, _refit=False, sample_weight=None):
        # sklearn's fit passes classes=np.unique(y) (read from the data): ignored for self.classes.
        if self.bounds is None or self.classes is None:
            raise ValueError("public bounds and classes are required (never read from the data)")
        if sample_weight is not None:
            raise ValueError("sample weights are not supported")
        self.accountant.check(self.epsilon, 0)
        X, y = validate_data(self, X, y, reset=True)
        lower, upper = self._check_bounds(self.bounds, shape=X.shape[1])
        if np.any(lower > 0) or np.any(upper < 0):
            raise ValueError("every feature's bounds must contain 0 (add/remove sensitivity of a sum)")
        self.bounds = (lower, upper)
        X = np.clip(X, lower, upper)
        self.classes_ = np.asarray(self.classes)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"labels {unknown} are not among the public classes {self.classes_}")
        random_state = check_random_state(self.random_state, secure=True)
        n_features = X.shape[1]

        counts = self._noisy_class_counts(y, random_state=random_state)
        self.accountant.spend(self.epsilon / 3, 0)  # one histogram: parallel over classes
        theta = np.zeros((len(self.classes_), n_features))
        var = np.zeros((len(self.classes_), n_features))
        zeros = np.zeros(n_features)
        for i, label in enumerate(self.classes_):
            # diffprivlib's mechanisms: Laplace on sums and squared deviations, ε/(3d) per feature.
            theta[i], var[i] = self._update_mean_variance(0, zeros, zeros, X[y == label], random_state=random_state,
                                                          n_noisy=counts[i])
        for _ in range(n_features):  # classes are disjoint: one mean and one variance charge per feature
            self.accountant.spend(self.epsilon / 3 / n_features, 0)
            self.accountant.spend(self.epsilon / 3 / n_features, 0)

        self.epsilon_ = self.var_smoothing
        self.theta_, self.var_ = theta, var + self.epsilon_
        self.class_count_ = counts.astype(np.float64)
        self.class_prior_ = self.class_count_ / self.class_count_.sum()
        return self

    def _noisy_class_counts(self, y, random_state):
        """Geometric noise (ε/3, sensitivity 1) on each public class's count, clipped to ≥ 1."""
        mechanism = GeometricTruncated(epsilon=self.epsilon / 3, sensitivity=1, lower=1, upper=math.inf,
                                       random_state=random_state)
        return np.array([mechanism.randomise(int(np.sum(y == label))) for label in self.classes_])


def _import_dependencies() -> None:
    """Import scikit-learn and diffprivlib (after its shim, :func:`dp_sweeps.classical.import_diffprivlib`)
    and define :data:`_DEPENDENT_NAMES` in this module; idempotent. Without the ``classical``
    extra: a one-line MissingExtraError naming it."""
    global BudgetAccountant, GeometricTruncated, DiffprivlibGaussianNB, check_random_state
    global SklearnGaussianNB, validate_data, PublicDomainGaussianNB
    if "PublicDomainGaussianNB" in globals():
        return
    import_diffprivlib(model="naive_bayes")
    from diffprivlib.accountant import BudgetAccountant
    from diffprivlib.mechanisms import GeometricTruncated
    from diffprivlib.models import GaussianNB as DiffprivlibGaussianNB
    from diffprivlib.utils import check_random_state
    from sklearn.naive_bayes import GaussianNB as SklearnGaussianNB
    from sklearn.utils.validation import validate_data

    class PublicDomainGaussianNB(_PublicDomain, DiffprivlibGaussianNB):
        """diffprivlib's GaussianNB for the add/remove-one relation: public ``classes`` and
        ``bounds`` are required; ``fit`` spends ``epsilon`` on ``accountant`` (module docstring)."""

        __qualname__ = "PublicDomainGaussianNB"


def __getattr__(name: str) -> Any:
    """PEP 562: the names that need diffprivlib, defined on first access."""
    if name in _DEPENDENT_NAMES:
        _import_dependencies()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def epsilon_split(epsilon: float, *, num_features: int) -> dict[str, Any]:
    """How :class:`PublicDomainGaussianNB` divides ``epsilon`` (module docstring)."""
    part = epsilon / len(BUDGET_PARTS)
    return {"class_counts": part, "means": part, "variances": part,
            "per_feature_mean": part / num_features, "per_feature_variance": part / num_features}


@register_classifier("naive_bayes", settings=NaiveBayesSettings, imports=_import_dependencies)
def run_naive_bayes(cfg, settings: NaiveBayesSettings, *, data, device, output_dir) -> dict[str, Any]:
    _import_dependencies()
    private = bool(cfg.privacy.enabled)
    num_features = int(np.prod(data.train_x.shape[1:]))
    fields: dict[str, Any] = {"mechanism": "none (scikit-learn GaussianNB)"}
    if private:
        epsilon = target_epsilon(cfg, model="naive_bayes")
        spec = OmegaConf.to_container(cfg.features, resolve=True) if cfg.features.name is not None else None
        lower, upper = feature_bounds(spec, data_facts=data.facts)
        if len(lower) != num_features:
            raise ConfigError(f"features={spec}: stated bounds cover {len(lower)} features, "
                              f"the map gives {num_features}")
        fields = {"mechanism": "diffprivlib GaussianNB: geometric counts, Laplace means and variances",
                  "guarantee": "pure ε-DP (δ=0), add/remove one training example",
                  "delta": 0.0, "epsilon_split": epsilon_split(epsilon, num_features=num_features),
                  "feature_bounds": [float(lower.min()), float(upper.max())]}
    if cfg.dry_run:
        planned = sum(fields["epsilon_split"][part] for part in BUDGET_PARTS) if private else None
        return {**fields, "status": "planned", "epsilon": planned}
    train_x, train_y = as_matrix(data.train_x), data.train_y.numpy()
    if private:
        accountant = BudgetAccountant()
        model = PublicDomainGaussianNB(epsilon=epsilon, bounds=(lower, upper), classes=list(range(data.num_classes)),
                                       var_smoothing=settings.var_smoothing,
                                       random_state=mechanism_random_state(
                                           "classical", noise_seed=cfg.privacy.noise_seed),
                                       accountant=accountant)
        model.fit(train_x, train_y)
        epsilon_spent, _delta_spent = accountant.total()
        fields["epsilon"] = float(epsilon_spent)
    else:
        model = SklearnGaussianNB(var_smoothing=settings.var_smoothing).fit(train_x, train_y)
    return {**fields,
            "train_accuracy": accuracy(model.predict(train_x), data.train_y),
            "val_accuracy": accuracy(model.predict(as_matrix(data.val_x)), data.val_y) if len(data.val_y) else None,
            "test_accuracy": accuracy(model.predict(as_matrix(data.test_x)), data.test_y)}

"""Classical classifiers under DP (dp_sweeps.classical) and the pixel feature maps:
real tiny runs through run(), the mechanisms themselves (vote sensitivity, the
exponential mechanism's distribution, diffprivlib's budget split, the composition),
and bad input refused with one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dp_sweeps.classical import list_classifiers, register_classifier
from dp_sweeps.classical.knn import composed_epsilon, epsilon_per_query_for, neighbour_votes, noisy_votes
from dp_sweeps.classical.naive_bayes import PublicDomainGaussianNB
from dp_sweeps.data.cifar10 import normalise
from dp_sweeps.data.features.pixels import feature_bounds, pixels, random_projection
from dp_sweeps.errors import ConfigError
from dp_sweeps.run import run
from tests.helpers.runs import compose_config, run_cli, tiny_overrides

# Tiny, fast settings per classifier (RDP: Opacus's PRV calibration costs seconds per call).
TINY = {"naive_bayes": [],
        "knn": ["model.k=10"],
        "svm": ["trainer.epochs=3", "privacy.accountant=rdp", "optimizer.lr=0.01"]}
CHANCE = 0.1


def _cfg(tiny_cifar, name, *overrides):
    return compose_config(tiny_overrides(tiny_cifar) + [f"model={name}", *TINY[name], *overrides])


def test_registry_lists_the_three_classifiers():
    assert list_classifiers() == ["knn", "naive_bayes", "svm"]
    with pytest.raises(ValueError, match="registered twice"):
        register_classifier("knn", settings=type(None))(lambda *a, **k: {})


@pytest.mark.parametrize("name", list(TINY))
def test_private_classifier_learns_above_chance_at_large_epsilon(name, tiny_cifar, tmp_path):
    # The largest ε accepted, and a fixed draw of the noise (privacy.noise_seed): the bar is not a coin toss.
    result = run(_cfg(tiny_cifar, name, "privacy.epsilon=30", "privacy.noise_seed=5"), tmp_path)
    assert result["status"] == "completed" and result["private"] is True
    assert result["family"] == "classical" and result["model"] == name
    assert result["test_accuracy"] > 3 * CHANCE, result
    assert 0 < result["epsilon"] <= 30 * (1 + 1e-9)
    assert result["guarantee"] and result["mechanism"]
    assert json.loads((tmp_path / "result.json").read_text())["epsilon"] == pytest.approx(result["epsilon"])


@pytest.mark.parametrize("name", list(TINY))
def test_privacy_none_gives_the_non_private_baseline(name, tiny_cifar, tmp_path):
    result = run(_cfg(tiny_cifar, name, "privacy=none"), tmp_path)
    assert result["status"] == "completed" and result["private"] is False
    assert result["epsilon"] is None and result["delta"] is None
    assert result["test_accuracy"] > 5 * CHANCE


@pytest.mark.parametrize("name", list(TINY))
def test_dry_run_plans_without_fitting(name, tiny_cifar, tmp_path):
    result = run(_cfg(tiny_cifar, name, "privacy.epsilon=2", "dry_run=true"), tmp_path)
    assert result["status"] == "planned"
    assert result.get("test_accuracy") is None
    assert 0 < result["epsilon"] <= 2 * (1 + 1e-9)
    assert not (tmp_path / "metrics.csv").exists()


# --- Naive Bayes: diffprivlib's mechanisms, the split, public bounds and classes --------------

def test_naive_bayes_split_sums_to_the_target_and_matches_the_mechanisms_run(monkeypatch):
    """Record the ε and sensitivity of every diffprivlib mechanism that fit() constructs."""
    import diffprivlib.models.naive_bayes as dpl_nb

    import dp_sweeps.classical.naive_bayes as nb

    runs = []

    def recording(cls, kind):
        class Recording(cls):
            def __init__(self, **kwargs):
                runs.append((kind, kwargs["epsilon"], kwargs["sensitivity"]))
                super().__init__(**kwargs)
        return Recording

    monkeypatch.setattr(dpl_nb, "LaplaceTruncated", recording(dpl_nb.LaplaceTruncated, "mean"))
    monkeypatch.setattr(dpl_nb, "LaplaceBoundedDomain", recording(dpl_nb.LaplaceBoundedDomain, "var"))
    monkeypatch.setattr(nb, "GeometricTruncated", recording(nb.GeometricTruncated, "count"))
    rng = np.random.default_rng(0)
    num_classes, num_features, epsilon = 4, 6, 3.0
    x = rng.uniform(-1, 1, size=(200, num_features))
    y = rng.integers(0, num_classes - 1, size=200)  # class 3 is absent: still estimated
    lower, upper = np.full(num_features, -1.0), np.full(num_features, 2.0)
    model = PublicDomainGaussianNB(epsilon=epsilon, bounds=(lower, upper), classes=list(range(num_classes)),
                                   random_state=0).fit(x, y)
    kinds = [k for k, _, _ in runs]
    assert kinds.count("count") == 1  # one geometric mechanism, drawn once per class (a histogram)
    assert kinds.count("mean") == kinds.count("var") == num_classes * num_features
    # Classes are disjoint: per feature, the charge is one mechanism's ε (parallel composition).
    count_eps = {e for k, e, _ in runs if k == "count"}
    mean_eps = {e for k, e, _ in runs if k == "mean"}
    var_eps = {e for k, e, _ in runs if k == "var"}
    assert len(count_eps) == len(mean_eps) == len(var_eps) == 1
    total = count_eps.pop() + num_features * (mean_eps.pop() + var_eps.pop())
    assert total == pytest.approx(epsilon, rel=1e-12)
    assert sum(model.accountant.spent_budget[i][0] for i in range(len(model.accountant.spent_budget))) == \
        pytest.approx(epsilon, rel=1e-12)
    # The sum's sensitivity is the diameter, which covers add/remove since 0 is inside the bounds.
    assert {s for k, _, s in runs if k == "mean"} == {3.0}
    assert list(model.classes_) == [0, 1, 2, 3] and model.class_count_[3] >= 1
    assert np.isfinite(model.theta_).all() and (model.var_ > 0).all()
    assert (model.theta_ >= -1 - 1e-9).all() and (model.theta_ <= 2 + 1e-9).all()


def test_naive_bayes_counts_are_not_rescaled_to_the_true_n():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-1, 1, size=(300, 3)), rng.integers(0, 3, size=300)
    sums = {PublicDomainGaussianNB(epsilon=0.3, bounds=(-1.0, 1.0), classes=[0, 1, 2], random_state=seed)
            .fit(x, y).class_count_.sum() for seed in range(5)}
    assert sums != {300.0}  # diffprivlib's own fit forces the sum to N (a leak under add/remove)


def test_naive_bayes_refuses_missing_bounds_and_bounds_without_zero():
    x, y = np.zeros((10, 2)), np.arange(10) % 2
    with pytest.raises(ValueError, match="public bounds and classes"):
        PublicDomainGaussianNB(epsilon=1.0, classes=[0, 1]).fit(x, y)
    with pytest.raises(ValueError, match="contain 0"):
        PublicDomainGaussianNB(epsilon=1.0, bounds=(0.5, 1.0), classes=[0, 1]).fit(x, y)


def test_naive_bayes_uses_the_maps_stated_bounds_not_the_data(tiny_cifar, tmp_path):
    result = run(_cfg(tiny_cifar, "naive_bayes", "privacy.epsilon=5", "features.grey=true"), tmp_path)
    lower, upper = feature_bounds({"name": "pixels", "size": 8, "grey": True})
    assert result["feature_bounds"] == [pytest.approx(lower.min()), pytest.approx(upper.max())]
    assert result["num_features"] == 64
    split = result["epsilon_split"]
    assert split["class_counts"] + split["means"] + split["variances"] == pytest.approx(5.0)
    assert split["per_feature_mean"] * 64 == pytest.approx(split["means"])
    assert result["delta"] == 0.0 and "pure" in result["guarantee"]


# --- Feature maps and their stated bounds -----------------------------------------------------

def _extreme_images() -> torch.Tensor:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 32, 32, 3)).astype(np.uint8)
    images[0], images[1] = 0, 255
    images[2, ..., 0], images[2, ..., 1:] = 255, 0  # saturated red
    return normalise(images)


@pytest.mark.parametrize("spec", [None, {"name": "pixels", "size": 8, "grey": False},
                                  {"name": "pixels", "size": 5, "grey": True},
                                  {"name": "random_projection", "dim": 32, "seed": 3, "clip": 2.0}])
def test_feature_maps_stay_inside_their_stated_bounds(spec):
    x = _extreme_images()
    if spec is None:
        out = x
    else:
        settings = {k: v for k, v in spec.items() if k != "name"}
        out = {"pixels": pixels, "random_projection": random_projection}[spec["name"]](x, **settings)
    flat = out.reshape(len(out), -1).double().numpy()
    lower, upper = feature_bounds(spec)
    assert flat.shape[1] == len(lower) == len(upper)
    assert (lower <= 0).all() and (upper >= 0).all()
    assert (flat >= lower - 1e-5).all() and (flat <= upper + 1e-5).all()
    # The extremes are reached (the bounds are not looser than the map).
    assert np.isclose(flat.min(0), lower, atol=1e-4).any() and np.isclose(flat.max(0), upper, atol=1e-4).any()


def test_random_projection_is_fixed_by_its_seed():
    x = _extreme_images()[:4]
    assert torch.equal(random_projection(x, dim=16, seed=1), random_projection(x, dim=16, seed=1))
    assert not torch.equal(random_projection(x, dim=16, seed=1), random_projection(x, dim=16, seed=2))
    assert pixels(x, size=4, grey=True).shape == (4, 1, 4, 4)


def test_a_map_without_stated_bounds_is_refused_for_naive_bayes():
    with pytest.raises(ConfigError, match="features.name='scattering' states no public bounds"):
        feature_bounds({"name": "scattering", "J": 2})


# --- KNN: the vote sensitivity, the exponential mechanism, the composition ---------------------

def _reference_votes(train_x, train_y, query, k, num_classes):
    distance = ((train_x - query) ** 2).sum(1)
    order = np.lexsort((np.arange(len(train_x)), distance))[:k]  # by distance, then index
    return np.bincount(train_y[order], minlength=num_classes)


def test_neighbour_votes_follow_distance_then_index():
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 3, size=(60, 2)).astype(np.float32)  # many exact ties
    train_y = rng.integers(0, 4, size=60)
    queries = rng.integers(0, 3, size=(15, 2)).astype(np.float32)
    votes = neighbour_votes(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(queries),
                            k=7, num_classes=4, batch_size=4)
    for q, v in zip(queries, votes):
        np.testing.assert_array_equal(v, _reference_votes(train_x, train_y, q, 7, 4))


def test_adding_or_removing_one_example_moves_each_vote_by_at_most_one():
    """The sensitivity the mechanism is calibrated to, checked on data full of ties."""
    rng = np.random.default_rng(1)
    worst = 0
    for trial in range(200):
        n, k = int(rng.integers(3, 30)), int(rng.integers(1, 8))
        train_x = torch.from_numpy(rng.integers(0, 3, size=(n, 2)).astype(np.float32))
        train_y = torch.from_numpy(rng.integers(0, 3, size=n))
        query = torch.from_numpy(rng.integers(0, 3, size=(1, 2)).astype(np.float32))
        base = neighbour_votes(train_x, train_y, query, k=k, num_classes=3)
        drop = int(rng.integers(0, n))
        keep = torch.arange(n) != drop
        removed = neighbour_votes(train_x[keep], train_y[keep], query, k=k, num_classes=3)
        at = int(rng.integers(0, n + 1))  # an added example may come anywhere in the order
        new_x = torch.from_numpy(rng.integers(0, 3, size=(1, 2)).astype(np.float32))
        added = neighbour_votes(torch.cat([train_x[:at], new_x, train_x[at:]]),
                                torch.cat([train_y[:at], torch.tensor([trial % 3]), train_y[at:]]), query,
                                k=k, num_classes=3)
        worst = max(worst, np.abs(base - removed).max(), np.abs(base - added).max())
    assert worst == 1


def test_noisy_vote_is_the_exponential_mechanism():
    """Empirical label frequencies match P(c) ∝ exp(ε v_c / 2) (Δ = 1, non-monotone)."""
    votes = np.array([5, 3, 0, 1])
    epsilon = 0.8
    draws = noisy_votes(np.tile(votes, (20000, 1)), epsilon_per_query=epsilon, random_state=np.random.RandomState(0))
    expected = np.exp(epsilon * votes / 2) / np.exp(epsilon * votes / 2).sum()
    observed = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.012)
    # The bound that makes it ε-DP: neighbouring votes (one +1, one -1) change P by ≤ e^ε.
    neighbour = votes + np.array([-1, 1, 0, 0])
    other = np.exp(epsilon * neighbour / 2) / np.exp(epsilon * neighbour / 2).sum()
    assert np.max(np.abs(np.log(expected / other))) <= epsilon + 1e-12
    np.testing.assert_array_equal(noisy_votes(np.array([[0, 2, 2], [3, 1, 0]]), epsilon_per_query=None,
                                              random_state=None), [1, 0])


@pytest.mark.parametrize("composition", ["zcdp", "basic"])
@pytest.mark.parametrize("target,queries", [(1.0, 10_000), (10.0, 10_000), (2.0, 3)])
def test_per_query_budget_composes_to_the_target(composition, target, queries):
    eps_q = epsilon_per_query_for(target_epsilon=target, num_queries=queries, delta=1e-5, composition=composition)
    total, delta, bound = composed_epsilon(epsilon_per_query=eps_q, num_queries=queries, delta=1e-5,
                                           composition=composition)
    assert target * (1 - 1e-6) <= total <= target
    if composition == "basic":
        assert eps_q == pytest.approx(target / queries) and delta == 0.0 and bound == "basic"
    if composition == "zcdp" and queries == 10_000:
        # zCDP beats basic composition over many queries, and its (ε, δ) is at least as
        # tight as the closed form ρ + 2 sqrt(ρ log(1/δ)) (Bun & Steinke 2016).
        rho = queries * eps_q ** 2 / 8
        assert bound == "zcdp" and delta == 1e-5 and eps_q > 3 * target / queries
        assert total <= rho + 2 * math.sqrt(rho * math.log(1e5)) + 1e-9
    if queries == 3:
        assert bound == "basic"  # few queries: basic composition is the tighter bound


def test_knn_reports_the_budget_of_every_query(tiny_cifar, tmp_path):
    result = run(_cfg(tiny_cifar, "knn", "privacy.epsilon=10", "data.val_size=50"), tmp_path)
    assert result["num_queries"] == result["num_test"] + result["num_val"] == 250
    assert result["epsilon"] == pytest.approx(composed_epsilon(
        epsilon_per_query=result["epsilon_per_query"], num_queries=250, delta=1e-5, composition="zcdp")[0])
    assert result["noise_scale"] == pytest.approx(2 / result["epsilon_per_query"])


# --- SVM: the hinge loss through the one training loop -----------------------------------------

def test_svm_trains_the_hinge_loss_through_fit_and_reports_the_accountants_epsilon(tiny_cifar, tmp_path,
                                                                                   monkeypatch):
    import dp_sweeps.training.network as train_module
    from dp_sweeps.privacy import epsilon_for

    criteria = []
    real_fit = train_module.fit

    def spy(**kwargs):
        criteria.append(kwargs["criterion"])
        return real_fit(**kwargs)

    monkeypatch.setattr(train_module, "fit", spy)
    result = run(_cfg(tiny_cifar, "svm", "privacy.epsilon=8", "trainer.epochs=2"), tmp_path)
    assert [type(c) for c in criteria] == [torch.nn.MultiMarginLoss]
    assert result["steps"] == 16 and result["parameters"] == 192 * 10 + 10
    assert result["epsilon"] == pytest.approx(epsilon_for(
        noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"], steps=result["steps"],
        delta=1e-5, accountant="rdp"), rel=1e-6)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3


# --- Bad input: one line, before anything is written -------------------------------------------

@pytest.mark.parametrize("name,overrides,message", [
    ("knn", ["model.k=0"], r"model.k=0 must be >= 1"),
    ("knn", ["model.composition=advanced"], r"model.composition='advanced' is not one of: zcdp, basic"),
    ("knn", ["+model.kk=3"], r"model.kk is not a setting of model=knn"),
    ("knn", ["privacy.noise_multiplier=1.0"], r"privacy.noise_multiplier=1.0 is a DP-SGD setting"),
    ("naive_bayes", ["model.var_smoothing=-1"], r"model.var_smoothing=-1 must be >= 0"),
    ("naive_bayes", ["features.name=nope"], r"features.name='nope' is not one of"),
    ("naive_bayes", ["features.size=0"], r"features.size=0 must be an integer >= 1"),
    ("svm", ["model.margin=0"], r"model.margin=0 must be > 0"),
    ("svm", ["privacy.epsilon=0"], r"privacy.epsilon=0 must be >= 0.05"),
    ("knn", ["privacy.epsilon=-1"], r"privacy.epsilon=-1 must be >= 0.05"),
])
def test_bad_input_is_refused_with_one_line(name, overrides, message, tiny_cifar, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        run(_cfg(tiny_cifar, name, *overrides), tmp_path)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "result.json").exists() and not (tmp_path / "metrics.csv").exists()


@pytest.mark.slow
def test_cli_sweep_over_classifiers_and_privacy(tiny_cifar, tmp_path):
    proc = run_cli(tiny_overrides(tiny_cifar) + ["model=naive_bayes,svm", "privacy=dp,none", "privacy.epsilon=20",
                                                 "privacy.accountant=rdp", "trainer.epochs=2", "optimizer.lr=0.01",
                                                 # a fixed draw of the noise: the accuracy bar is not a coin toss
                                                 "privacy.noise_seed=5",
                                                 f"paths.output_dir={tmp_path}", "-m"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multiruns/*/*/*/result.json"))]
    assert sorted((r["model"], r["private"]) for r in results) == [
        ("naive_bayes", False), ("naive_bayes", True), ("svm", False), ("svm", True)]
    assert all(r["status"] == "completed" and r["test_accuracy"] > 3 * CHANCE for r in results)


def test_seeded_noise_repeats_and_secure_noise_does_not():
    """random_state=None (privacy.secure_mode=true) draws from the OS's secure RNG (diffprivlib)."""
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-1, 1, size=(100, 3)), rng.integers(0, 2, size=100)

    def theta(random_state):
        return PublicDomainGaussianNB(epsilon=1.0, bounds=(-1.0, 1.0), classes=[0, 1],
                                      random_state=random_state).fit(x, y).theta_

    np.testing.assert_array_equal(theta(7), theta(7))
    assert not np.array_equal(theta(None), theta(None))
    votes = np.tile([3, 0, 1], (50, 1))
    assert noisy_votes(votes, epsilon_per_query=0.5, random_state=None).shape == (50,)

"""DP data normalisation (model.norm=data): the release's clipping bound and noise scale,
its composition into the run's ε, and real tiny runs that report it."""

from __future__ import annotations

import math

import pytest
import torch

from dp_sweeps.errors import ConfigError
from dp_sweeps.models import create_model
from dp_sweeps.models.norms import ChannelStandardize
from dp_sweeps.privacy import epsilon_for, plan_privacy, prior_epsilon
from dp_sweeps.privacy.accounting import cross_check_epsilon
from dp_sweeps.privacy.data_normalization import fit_data_normalization, private_channel_statistics
from dp_sweeps.run import run
from tests.helpers.runs import compose_config, tiny_overrides


def _features(n=50, channels=6, seed=0):
    return torch.randn(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed)) * 3 + 1


def test_without_clipping_or_noise_the_statistics_are_exact():
    x = _features()
    mean, var = private_channel_statistics(x, clip_mean=math.inf, clip_square=math.inf, noise_multiplier=0.0,
                                           generator=None, chunk=7)  # chunks that do not divide N
    per_channel = x.transpose(0, 1).reshape(6, -1)
    torch.testing.assert_close(mean, per_channel.mean(1))
    torch.testing.assert_close(var, per_channel.var(1, unbiased=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("outlier_scale", [1.0, 1e3])
def test_one_example_moves_each_sum_by_at_most_its_clip(outlier_scale):
    """Sensitivity under add/remove-one: N·mean(D) − (N−1)·mean(D − {x}) has L2 norm ≤ clip."""
    x = _features(n=40)
    x[-1] *= outlier_scale
    kwargs = dict(clip_mean=0.5, clip_square=2.0, noise_multiplier=0.0, generator=None)
    mean_all, var_all = private_channel_statistics(x, **kwargs)
    mean_less, var_less = private_channel_statistics(x[:-1], **kwargs)
    delta_mean = 40 * mean_all - 39 * mean_less
    delta_square = 40 * (var_all + mean_all ** 2) - 39 * (var_less + mean_less ** 2)
    assert delta_mean.norm() <= 0.5 + 1e-5
    assert delta_square.norm() <= 2.0 + 1e-4
    if outlier_scale > 1:  # the outlier really is clipped: its raw contribution is far larger
        raw = x[-1].reshape(6, -1).mean(1)
        assert raw.norm() > 10 and delta_mean.norm() == pytest.approx(0.5, rel=1e-4)


def test_noise_has_standard_deviation_sigma_times_clip_on_each_sum():
    channels, n = 20_000, 10
    x = torch.zeros(n, channels, 2, 2)
    mean, var = private_channel_statistics(x, clip_mean=0.5, clip_square=2.0, noise_multiplier=3.0,
                                           generator=torch.Generator().manual_seed(0))
    assert (n * mean).std().item() == pytest.approx(3.0 * 0.5, rel=0.03)
    assert (n * mean).mean().abs().item() < 0.05
    square = var + mean ** 2  # where var was not floored at 0
    kept = var > 0
    assert (n * square[kept]).std().item() > 0.5 * 3.0 * 2.0  # the squares' sum is noised too


def test_fit_sets_every_standardize_layer_and_returns_its_release():
    model = create_model("scatter_linear", in_channels=6, spatial_size=4, norm="data")
    settings = {"noise_multiplier": 8.0, "clip_mean": 1.0, "clip_square": 1.2}

    class Settings(dict):
        __getattr__ = dict.__getitem__

    x = _features()
    releases = fit_data_normalization(model, x, private=True, settings=Settings(settings), noise_seed=3)
    layer = model[0]
    assert isinstance(layer, ChannelStandardize) and bool(layer.fitted)
    assert releases == ((8.0, 1.0, 2),)
    again = create_model("scatter_linear", in_channels=6, spatial_size=4, norm="data")
    fit_data_normalization(again, x, private=True, settings=Settings(settings), noise_seed=3)
    assert torch.equal(again[0].mean, layer.mean)  # same noise_seed: the very same draw
    exact = create_model("scatter_linear", in_channels=6, spatial_size=4, norm="data")
    assert fit_data_normalization(exact, x, private=False, settings=None, noise_seed=3) == ()
    out = exact[0](x)  # exact statistics standardise every channel
    torch.testing.assert_close(out.transpose(0, 1).reshape(6, -1).mean(1), torch.zeros(6), atol=1e-5, rtol=0)


def test_the_plan_composes_the_release_into_every_epsilon(tiny_cfg):
    cfg = tiny_cfg("privacy.epsilon=3")
    prior = ((8.0, 1.0, 2),)
    plain = plan_privacy(cfg.privacy, num_train=50_000, batch_size=8192, epochs=60)
    charged = plan_privacy(cfg.privacy, num_train=50_000, batch_size=8192, epochs=60, prior_releases=prior)
    assert charged.prior_releases == prior
    assert charged.noise_multiplier > plain.noise_multiplier  # less budget left for DP-SGD
    assert charged.planned_epsilon == pytest.approx(epsilon_for(
        noise_multiplier=charged.noise_multiplier, sample_rate=1 / 7, steps=420, delta=1e-5, prior=prior))
    assert 2.95 < charged.planned_epsilon <= 3.0 + 0.01
    # The release alone: a Gaussian mechanism with σ = 8 / √2 (two releases of σ = 8).
    assert prior_epsilon(prior, delta=1e-5) == pytest.approx(
        epsilon_for(noise_multiplier=8.0 / math.sqrt(2), sample_rate=1.0, steps=1, delta=1e-5), rel=1e-3)
    checks = cross_check_epsilon(noise_multiplier=charged.noise_multiplier, sample_rate=1 / 7, steps=420,
                                 delta=1e-5, prior=prior)
    assert abs(checks["prv"] - checks["pld"]) < 0.05 and checks["rdp"] >= checks["prv"] - 0.01
    with pytest.raises(ConfigError, match="already spend"):
        plan_privacy(tiny_cfg("privacy.epsilon=0.5").privacy, num_train=50_000, batch_size=8192, epochs=60,
                     prior_releases=((1.0, 1.0, 2),))
    with pytest.raises(ConfigError, match="gdp"):
        plan_privacy(tiny_cfg("privacy.accountant=gdp").privacy, num_train=50_000, batch_size=8192, epochs=60,
                     prior_releases=prior)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature_cache")


def _scatter_cfg(tiny_cifar, feature_cache, *extra):
    return compose_config(tiny_overrides(tiny_cifar) + [
        "experiment=tramer_boneh_scatter_linear", "model.norm=data", "data.test_subset=100",
        "trainer.batch_size=64", "trainer.epochs=2", "trainer.physical_batch_size=32", "privacy.epsilon=8",
        f"data.feature_cache={feature_cache}", *extra])


# Slow: scattering the tiny set, then DP-SGD on 243 x 8 x 8 features. The fast suite runs the
# same path up to the plan (test_dry_run_cross_checks_with_the_release).
@pytest.mark.slow
def test_tiny_private_run_reports_the_release_and_charges_it(tiny_cifar, feature_cache, tmp_path):
    result = run(_scatter_cfg(tiny_cifar, feature_cache, "privacy.noise_seed=0"), tmp_path)  # a fixed draw
    assert result["status"] == "completed" and result["prior_releases"] == [[8.0, 1.0, 2]]
    assert result["steps"] == 16  # DP-SGD's steps only: the release is not a step
    # The reported ε is the accountant's for the release and the steps taken.
    assert result["epsilon"] == pytest.approx(epsilon_for(
        noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"], steps=16, delta=1e-5,
        prior=((8.0, 1.0, 2),)), rel=1e-6)
    assert result["epsilon"] > epsilon_for(noise_multiplier=result["noise_multiplier"],
                                           sample_rate=result["sample_rate"], steps=16, delta=1e-5)
    assert result["epsilon"] <= 8.0 + 0.01 and result["test_accuracy"] > 0.3


def test_dry_run_cross_checks_with_the_release(tiny_cifar, feature_cache, tmp_path):
    # 192 training and 20 test images: the release is computed on scattering features, which
    # take seconds for the whole tiny set.
    result = run(_scatter_cfg(tiny_cifar, feature_cache, "dry_run=true", "data.train_subset=192",
                              "data.test_subset=20"), tmp_path)
    assert result["status"] == "planned" and result["num_train"] == 192
    assert result["prior_releases"] == [[8.0, 1.0, 2]]  # the release was made (and is charged)
    assert result["planned_epsilon"] <= 8.0 + 0.01
    checks = result["epsilon_cross_check"]
    assert checks["prv"] == pytest.approx(result["planned_epsilon"], rel=1e-6)
    assert abs(checks["pld"] - checks["prv"]) < 0.05


@pytest.mark.parametrize("override,match", [
    ("privacy.data_norm.clip_mean=0", "privacy.data_norm.clip_mean=0"),
    ("privacy.data_norm.noise_multiplier=-1", "privacy.data_norm.noise_multiplier=-1"),
    ("privacy.accountant=gdp", "gdp"),
])
def test_bad_data_norm_settings_fail_before_training(override, match, tiny_cifar, feature_cache, tmp_path):
    with pytest.raises(ConfigError, match=match):
        run(_scatter_cfg(tiny_cifar, feature_cache, override), tmp_path)
    assert not (tmp_path / "result.json").exists()

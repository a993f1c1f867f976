"""ScatterNet features (kymatio, J=2, L=8) and Tramèr & Boneh's models on them: the
shape, per-example independence, the on-disk cache, the models' DP compatibility,
the experiment configs' published settings, and real tiny private runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from dp_sweeps.data import features as feature_maps
from dp_sweeps.data.features import apply_feature_map, compute_features
from dp_sweeps.data.features.scattering import num_scattering_paths, scattering
from dp_sweeps.errors import ConfigError
from dp_sweeps.models import create_model
from dp_sweeps.privacy import plan_privacy
from dp_sweeps.run import run
from tests.helpers.runs import compose_config, tiny_overrides

SPEC = {"name": "scattering", "J": 2, "L": 8}


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One cache for the module's real runs, so the tiny set is scattered once."""
    return tmp_path_factory.mktemp("feature_cache")


def test_scattering_gives_243_maps_of_8x8_per_cifar_image(images):
    assert num_scattering_paths(2, 8) == 81
    out = scattering(images, J=2, L=8)
    assert out.shape == (6, 243, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Order 0 (channel c * 81) is a low-pass average: a constant image gives a constant
    # map there, and orders 1-2 (zero-mean wavelets, then modulus) vanish.
    flat = scattering(torch.full((1, 3, 32, 32), 0.7), J=2, L=8).view(3, 81, 8, 8)
    assert torch.allclose(flat[:, 0], flat[:, 0, :1, :1].expand(3, 8, 8), atol=1e-5)
    assert flat[:, 1:].abs().max() < 1e-3 * flat[:, 0].abs().max()
    assert scattering(images[:0]).shape == (0, 243, 8, 8)


def test_each_example_features_depend_on_that_example_only(images):
    """A data-independent map costs no privacy only if it is per-example: the features
    of one image must not change with its batch-mates."""
    together = scattering(images)
    alone = torch.cat([scattering(images[i:i + 1]) for i in range(len(images))])
    assert torch.allclose(together, alone, atol=1e-5)
    swapped = scattering(torch.cat([images[:1], -images[1:]]))
    assert torch.allclose(swapped[0], together[0], atol=1e-5)


def test_bad_settings_are_config_errors(images):
    with pytest.raises(ConfigError, match="features.J=0"):
        scattering(images, J=0)
    with pytest.raises(ConfigError, match="not divisible by 2"):
        scattering(torch.randn(1, 3, 30, 30), J=2)


def test_features_are_computed_once_then_read_from_the_cache(images, tmp_path, monkeypatch):
    calls = []
    real = feature_maps._FEATURE_MAPS["scattering"]

    def counting(x, **settings):
        calls.append(len(x))
        return real(x, **settings)

    monkeypatch.setitem(feature_maps._FEATURE_MAPS, "scattering", counting)
    settings = {"J": 2, "L": 8}
    first = compute_features("scattering", images, settings, cache_dir=tmp_path, batch_size=4)
    assert calls == [4, 2]  # batched
    assert len(list(tmp_path.glob("scattering-*.pt"))) == 1
    second = compute_features("scattering", images, settings, cache_dir=tmp_path, batch_size=4)
    assert calls == [4, 2]  # the cache hit: the transform was not called again
    assert torch.equal(first, second)
    # Other settings or other images are other cache entries.
    compute_features("scattering", images, {"J": 2, "L": 4}, cache_dir=tmp_path)
    compute_features("scattering", images + 1, settings, cache_dir=tmp_path)
    assert len(calls) == 4 and len(list(tmp_path.glob("scattering-*.pt"))) == 3


@pytest.mark.parametrize("name", ["scatter_linear", "scatter_cnn"])
def test_scatter_models_take_per_example_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert ModuleValidator.validate(model, strict=False) == []
    norm = model[0]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 27 and not norm.affine
    x = torch.randn(4, 243, 8, 8)
    # GroupNorm uses one example's statistics: outputs do not depend on batch-mates.
    assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    data = torch.utils.data.TensorDataset(x, torch.arange(4))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, _ = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=1.0, max_grad_norm=0.1,
                                                       poisson_sampling=False)
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    assert all(p.grad_sample.shape[0] == 4 for p in model.parameters())
    optimizer.step()


def test_model_sizes_and_bad_settings():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("scatter_linear")) == 243 * 64 * 10 + 10
    assert count(create_model("scatter_cnn")) == (243 * 9 * 64 + 64) + (64 * 9 * 64 + 64) + (64 * 16 * 10 + 10)
    with pytest.raises(ValueError, match="norm_groups=10"):
        create_model("scatter_linear", norm_groups=10)
    with pytest.raises(ValueError, match="neither a positive channel count"):
        create_model("scatter_cnn", layers=[64, "X"])


@pytest.mark.parametrize("experiment,model", [("tramer_boneh_scatter_linear", "scatter_linear"),
                                              ("tramer_boneh_scatter_cnn", "scatter_cnn")])
def test_experiments_carry_the_published_settings(experiment, model):
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.model.name == model and dict(cfg.features) == SPEC
    if model == "scatter_linear":  # the paper's DP data normalisation, σ = 8, and an EMA for evaluation
        assert cfg.model.norm == "data" and cfg.privacy.data_norm.noise_multiplier == 8.0
    else:
        assert cfg.model.norm == "group" and cfg.model.norm_groups == 27
    # Our post-processing on both: EMA weights, evaluated with test-time flip averaging.
    assert cfg.trainer.ema_decay == 0.999 and cfg.trainer.eval_flip is True
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (4.0, 0.9)
    assert (cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.max_grad_norm) == (3.0, 1e-5, 0.1)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.data.augment) == (8192, 60, False)
    prior = ((8.0, 1.0, 2),) if cfg.model.norm == "data" else ()
    plan = plan_privacy(cfg.privacy, num_train=50_000, batch_size=cfg.trainer.batch_size, epochs=cfg.trainer.epochs,
                        prior_releases=prior)
    assert plan.sample_rate == pytest.approx(1 / 7) and plan.steps == 420
    assert 2.9 < plan.planned_epsilon <= 3.0 + 0.01


# scatter_linear's run (with its DP data normalisation) is slow; the fast suite plans it
# (tests/test_data_normalization.py) and runs scatter_cnn on the same features.
@pytest.mark.parametrize("name", [pytest.param("scatter_linear", marks=pytest.mark.slow), "scatter_cnn"])
def test_tiny_private_run_on_scattering_features(name, tiny_cifar, feature_cache, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_cifar) + [
        f"experiment=tramer_boneh_{name}", "data.test_subset=100", "trainer.batch_size=64", "trainer.epochs=2",
        "trainer.physical_batch_size=32", "privacy.epsilon=8", f"data.feature_cache={feature_cache}",
        "privacy.noise_seed=0"])  # a fixed draw of the noise: the accuracy bar below is not a coin toss
    result = run(cfg, tmp_path)
    assert result["status"] == "completed" and result["model"] == name
    assert result["steps"] == 16 and 0 < result["epsilon"] <= 8.0
    assert result["max_grad_norm"] == 0.1
    assert result["test_accuracy"] > 0.3  # the tiny set is learnable; chance is 0.1
    # train, test and the mirrored test images (trainer.eval_flip), shared by both runs
    assert len(list(feature_cache.glob("scattering-*.pt"))) == 3


def test_apply_feature_map_replaces_every_split(tiny_cifar, feature_cache):
    from dp_sweeps.data import load_cifar10

    data = load_cifar10(root=tiny_cifar, download=False, verify_checksums=False, val_size=10,
                        train_subset=40, test_subset=20)
    out = apply_feature_map(data, SPEC, cache_dir=feature_cache)
    assert out.train_x.shape == (40, 243, 8, 8) and out.val_x.shape == (10, 243, 8, 8)
    assert out.test_x.shape == (20, 243, 8, 8)
    assert torch.equal(out.train_y, data.train_y) and torch.equal(out.test_y, data.test_y)

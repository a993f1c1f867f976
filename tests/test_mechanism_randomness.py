"""The mechanism's randomness is secret: never derived from the published ``seed``, never
written out; ``privacy.noise_seed`` replays it for debugging and voids the ε."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from dp_sweeps import run as run_module
from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import randomness
from dp_sweeps.run import run


def _run(tiny_cfg, tmp_path, monkeypatch, *overrides):
    """run() on a tiny config (128 images, a given σ and the RDP accountant: cheap
    accounting); returns (result, initial weights, final weights)."""
    initial = {}
    real_build = run_module.build_model

    def build_and_record(*args, **kwargs):
        model = real_build(*args, **kwargs)
        initial.update({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(run_module, "build_model", build_and_record)
    result = run(tiny_cfg("trainer.checkpoint_every=1", "data.train_subset=128", "privacy.noise_multiplier=1.0",
                          "privacy.accountant=rdp", *overrides), tmp_path)
    final = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    return result, initial, final


def test_two_default_runs_draw_different_noise_from_the_same_initial_weights(tiny_cfg, tmp_path, monkeypatch):
    """Same config, same published seed: the weights start equal, but the noise and the
    batches are fresh per run, so the released weights differ (on 89ac991 they were
    bit-identical: an attacker with the config could replay and subtract the noise)."""
    a, init_a, final_a = _run(tiny_cfg, tmp_path / "a", monkeypatch)
    b, init_b, final_b = _run(tiny_cfg, tmp_path / "b", monkeypatch)
    assert a["seed"] == b["seed"] == 0
    assert all(torch.equal(init_a[k], init_b[k]) for k in init_a)
    assert any(not torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert a["epsilon_valid"] is b["epsilon_valid"] is True


def test_noise_seed_replays_the_run_and_voids_its_epsilon(tiny_cfg, tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING):
        a, _, final_a = _run(tiny_cfg, tmp_path / "a", monkeypatch, "privacy.noise_seed=7")
    b, _, final_b = _run(tiny_cfg, tmp_path / "b", monkeypatch, "privacy.noise_seed=7")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert a["test_accuracy"] == b["test_accuracy"] and a["epsilon"] == b["epsilon"]
    assert a["epsilon_valid"] is False
    assert "noise_seed" in caplog.text and "NOT a guarantee" in caplog.text
    c, _, final_c = _run(tiny_cfg, tmp_path / "c", monkeypatch, "privacy.noise_seed=8")
    assert any(not torch.equal(final_a[k], final_c[k]) for k in final_a)


def test_the_mechanism_seeds_are_never_written(tiny_cfg, tmp_path, monkeypatch, caplog):
    """Every seed drawn for the mechanism is looked for, in decimal and hex, in what a run
    writes (result.json, metrics.csv) and logs."""
    drawn = []
    real = randomness.secrets.randbits
    monkeypatch.setattr(randomness.secrets, "randbits", lambda k: drawn.append(real(k)) or drawn[-1])
    with caplog.at_level(logging.DEBUG):
        run(tiny_cfg(), tmp_path)
    assert len(drawn) == 2  # the noise and the sampling streams
    written = caplog.text + "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    for value in drawn:
        assert str(value) not in written and format(value, "x") not in written
    assert "seed" not in json.dumps({k: v for k, v in json.loads((tmp_path / "result.json").read_text()).items()
                                     if k != "seed"})


def test_streams_are_independent_per_stream_and_rank():
    seeds = {(s, r): randomness.stream_seed(s, noise_seed=3, rank=r) for s in randomness.STREAMS for r in (0, 1)}
    assert len(set(seeds.values())) == len(seeds)
    assert randomness.stream_seed("noise", noise_seed=3) == seeds[("noise", 0)]  # replayable
    assert randomness.stream_seed("noise", noise_seed=None) != randomness.stream_seed("noise", noise_seed=None)
    with pytest.raises(ValueError, match="unknown randomness stream"):
        randomness.stream_seed("weights", noise_seed=None)


def test_classical_noise_does_not_follow_the_global_numpy_seed():
    """diffprivlib draws from NumPy's global state when given random_state=None, and
    ``seed`` fixes that state: the mechanism gets its own generator instead."""
    np.random.seed(0)
    first = randomness.mechanism_random_state("classical", noise_seed=None).uniform(size=4)
    np.random.seed(0)
    second = randomness.mechanism_random_state("classical", noise_seed=None).uniform(size=4)
    assert not np.array_equal(first, second)
    replay = [randomness.mechanism_random_state("classical", noise_seed=2).uniform(size=4) for _ in range(2)]
    np.testing.assert_array_equal(*replay)


def test_data_normalisation_noise_is_fresh_per_run(tiny_cifar, tmp_path):
    """The DP data-normalisation release (seed + 4 on 89ac991: replayable)."""
    from dp_sweeps.models import create_model
    from dp_sweeps.privacy.data_normalization import fit_data_normalization

    x = torch.rand(64, 6, 4, 4)
    settings = type("S", (dict,), {"__getattr__": dict.__getitem__})(
        {"noise_multiplier": 2.0, "clip_mean": 1.0, "clip_square": 1.0})
    means = []
    for _ in range(2):
        model = create_model("scatter_linear", in_channels=6, spatial_size=4, norm="data")
        fit_data_normalization(model, x, private=True, settings=settings)
        means.append(model[0].mean.clone())
    assert not torch.equal(*means)


def test_secure_mode_is_refused_before_training_with_the_reason(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="secure_mode=true needs torchcsprng"):
        run(tiny_cfg("privacy.secure_mode=true"), tmp_path)
    assert not (tmp_path / "result.json").exists()


def test_gdp_never_calibrates_nor_reports(tiny_cfg, tmp_path):
    """GDP under-reports ε (σ=0.8, q=0.1, 50 steps: GDP 6.35 vs PRV 8.07); on 89ac991 it
    calibrated σ and its ε was reported as valid."""
    from dp_sweeps.privacy import epsilon_for
    from dp_sweeps.privacy.accounting import cross_check_epsilon

    with pytest.raises(ConfigError, match="privacy.accountant='gdp' can under-report"):
        run(tiny_cfg("privacy.accountant=gdp"), tmp_path)
    assert not (tmp_path / "result.json").exists()
    checks = cross_check_epsilon(noise_multiplier=0.8, sample_rate=0.1, steps=50, delta=1e-5)
    assert checks["gdp"] < checks["prv"] - 1  # shown beside the others, and visibly lower
    assert checks["prv"] == pytest.approx(epsilon_for(noise_multiplier=0.8, sample_rate=0.1, steps=50, delta=1e-5))


def test_the_feature_cache_key_is_not_logged(tmp_path, caplog):
    """The cache file's name hashes the exact private inputs: it stays out of the logs."""
    from dp_sweeps.data.features import compute_features

    x = torch.rand(4, 3, 32, 32)
    with caplog.at_level(logging.DEBUG, logger="dp_sweeps.data.features"):
        compute_features("pixels", x, {"size": 8}, cache_dir=tmp_path)
        compute_features("pixels", x, {"size": 8}, cache_dir=tmp_path)  # read back from the cache
    (cached,) = tmp_path.glob("pixels-*.pt")
    key = cached.stem.split("-", 1)[1]
    assert "read from the cache" in caplog.text and key not in caplog.text

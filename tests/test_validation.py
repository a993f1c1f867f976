"""Bad input is refused before any training, with one line naming the bad value,
and leaves no result.json behind."""

from __future__ import annotations

import logging
import shutil

import pytest

from dp_sweeps.errors import ConfigError
from dp_sweeps.run import run
from tests.conftest import REPO, compose_config, run_cli, tiny_overrides

BAD = [
    ("privacy.epsilon=0", "privacy.epsilon=0"),
    ("privacy.epsilon=-1", "privacy.epsilon=-1"),
    ("privacy.delta=0", "privacy.delta=0"),
    ("privacy.delta=1", "privacy.delta=1"),
    ("privacy.delta=1.5", "privacy.delta=1.5"),
    ("privacy.max_grad_norm=0", "privacy.max_grad_norm=0"),
    ("privacy.max_grad_norm=-0.5", "privacy.max_grad_norm=-0.5"),
    ("privacy.noise_multiplier=0", "privacy.noise_multiplier=0"),
    ("privacy.accountant=moments", "privacy.accountant='moments'"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("trainer.batch_size=501", "trainer.batch_size=501 exceeds the 500"),
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1"),
    ("model.name=resnet9000", "model.name='resnet9000'"),
    ("optimizer._target_=os.system", "'os.system'"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_training(override, message, tiny_cfg, tmp_path):
    with pytest.raises(ConfigError) as info:
        run(tiny_cfg(override), tmp_path)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert not (tmp_path / "result.json").exists()
    assert not (tmp_path / "metrics.csv").exists()


def test_missing_dataset_with_download_off(tmp_path):
    cfg = compose_config(tiny_overrides(tmp_path / "nowhere") + ["model=convnet"])
    with pytest.raises(ConfigError, match="CIFAR-10 not found under .*data.download=false"):
        run(cfg, tmp_path / "run")


def test_corrupted_dataset_file_is_refused(tiny_cifar, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_cifar, root)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])  # truncated
    unverified = compose_config(tiny_overrides(root) + ["model=convnet"])
    with pytest.raises(ConfigError, match="corrupted"):
        run(unverified, tmp_path / "run1")
    verified = compose_config(tiny_overrides(root) + ["model=convnet", "data.verify_checksums=true"])
    with pytest.raises(ConfigError, match="data_batch_1 fails its official md5"):
        run(verified, tmp_path / "run2")  # the tiny copy's bytes are not the official ones
    assert not list(tmp_path.rglob("result.json"))


def test_delta_at_least_one_over_n_warns(tiny_cfg, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run(tiny_cfg("privacy.delta=0.01", "dry_run=true"), tmp_path)
    assert any("privacy.delta=0.01 is >= 1/N" in r.getMessage() for r in caplog.records)


def test_cli_bad_value_is_one_line_and_nonzero(tiny_cifar, tmp_path):
    proc = run_cli(tiny_overrides(tiny_cifar) + ["model=convnet", "privacy.epsilon=-3",
                                                  f"paths.output_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "dp_sweeps: error: privacy.epsilon=-3 must be >= 0.05"
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_cli_unknown_model_and_optimizer_are_named(tmp_path):
    for override, name in (("model=resnet9000", "resnet9000"), ("optimizer=lion", "lion")):
        proc = run_cli([override, f"paths.output_dir={tmp_path}"], cwd=REPO)
        assert proc.returncode != 0
        assert name in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_config_groups_hold_only_their_own_keys(tiny_cifar):
    """A model config holds model settings only (the feature map is the features group,
    the data-normalisation release is privacy.data_norm), and privacy=none sets no
    value that a private run would refuse."""
    from tests.conftest import CONFIG_DIR, compose_config, tiny_overrides

    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        cfg = compose_config(tiny_overrides(tiny_cifar) + [f"model={path.stem}"])
        assert not {"family", "features", "data_norm"} & set(cfg.model), path.stem
        if path.stem.startswith("scatter"):
            assert cfg.features.name == "scattering"
        elif path.stem in ("knn", "naive_bayes", "svm"):
            assert cfg.features.name == "pixels"
        else:
            assert cfg.features.name is None
    none = compose_config(tiny_overrides(tiny_cifar) + ["privacy=none"]).privacy
    assert none.enabled is False and none.secure_mode is False and none.poisson_sampling is False
    assert all(value is None for key, value in none.items() if key not in ("enabled", "secure_mode", "poisson_sampling"))

"""Bad input is refused before any training, with one line naming the bad value,
and leaves no result.json behind."""

from __future__ import annotations

import logging
import shutil

import pytest

from dp_sweeps.errors import ConfigError
from dp_sweeps.paths import CONFIG_DIR
from dp_sweeps.run import run
from tests.helpers.runs import REPO, cli_in_process, compose_config, run_cli, tiny_overrides

# The CLI's main in this process (fast), and as `python -m dp_sweeps` (slow: a fresh interpreter).
HOW = ["in_process", pytest.param("subprocess", marks=pytest.mark.slow)]


def _cli(how: str, args: list[str], *, cwd, capsys):
    return cli_in_process(args, capsys) if how == "in_process" else run_cli(args, cwd=cwd)

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
    # N = 64 training images; a given σ: no calibration (PRV's takes seconds at such a δ).
    with caplog.at_level(logging.WARNING):
        result = run(tiny_cfg("privacy.delta=0.05", "data.train_subset=64", "privacy.noise_multiplier=1.0"),
                     tmp_path)
    assert any("privacy.delta=0.05 is >= 1/N = 0.015625" in r.getMessage() for r in caplog.records)
    assert result["status"] == "completed" and result["delta"] == 0.05  # a warning, not a refusal
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(tiny_cfg("privacy.delta=0.01", "data.train_subset=64", "privacy.noise_multiplier=1.0"), tmp_path / "b")
    assert not any("1/N" in r.getMessage() for r in caplog.records)  # 0.01 < 1/64


@pytest.mark.parametrize("how", HOW)
def test_cli_bad_value_is_one_line_and_nonzero(how, tiny_cifar, tmp_path, capsys):
    proc = _cli(how, tiny_overrides(tiny_cifar) + ["model=convnet", "privacy.epsilon=-3",
                                                    f"paths.output_dir={tmp_path}"], cwd=tmp_path, capsys=capsys)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "dp_sweeps: error: privacy.epsilon=-3 must be >= 0.05"
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("how", HOW)
def test_cli_unknown_model_and_optimizer_are_named(how, tmp_path, capsys):
    for override, name in (("model=resnet9000", "resnet9000"), ("optimizer=lion", "lion")):
        proc = _cli(how, [override, f"paths.output_dir={tmp_path}"], cwd=REPO, capsys=capsys)
        assert proc.returncode != 0
        assert name in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_config_groups_hold_only_their_own_keys(tiny_cifar):
    """A model config holds model settings only (the feature map is the features group,
    the data-normalisation release is privacy.data_norm), and privacy=none sets no
    value that a private run would refuse."""
    for path in sorted((CONFIG_DIR / "model").glob("*.yaml")):
        cfg = compose_config(tiny_overrides(tiny_cifar) + [f"model={path.stem}"])
        assert not {"family", "features", "data_norm"} & set(cfg.model), path.stem
        if path.stem.startswith("scatter"):
            assert cfg.features.name == "scattering"
        elif path.stem in ("knn", "naive_bayes", "svm"):
            assert cfg.features.name == "pixels"
        elif path.stem == "timm_probe":  # the cached frozen-backbone fast path
            assert cfg.features.name == "backbone"
        else:
            assert cfg.features.name is None
    none = compose_config(tiny_overrides(tiny_cifar) + ["privacy=none"]).privacy
    assert none.enabled is False and none.secure_mode is False and none.poisson_sampling is False
    assert all(value is None for key, value in none.items()
               if key not in ("enabled", "secure_mode", "poisson_sampling"))

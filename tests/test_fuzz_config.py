"""Fuzzed configs: every numeric key, given edge and invalid values (hypothesis), is
either run or refused with the one-line ConfigError, before training and without a
result.json; never another exception, and never a completed run with a wrong ε.

Each drawn config is trained for real, unless its run would be long (then it is only
planned, with ``dry_run``). The base config uses the RDP accountant (fuzzing reaches σ and step counts at
which PRV's grid takes gigabytes) and a given σ, so that only the examples that draw
``privacy.epsilon`` pay for a calibration; the accountants themselves are checked in
test_privacy.py and test_accounting.py.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import DictConfig, open_dict

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import epsilon_for
from dp_sweeps.run import run
from dp_sweeps.training.results import RESULT_FILE
from tests.helpers.runs import compose_config, tiny_overrides

# Configs with more steps than this are only planned, not trained (a 64-example run at
# batch 1 would otherwise take 64 steps per epoch of the test's time).
MAX_TRAINED_STEPS = 16
TINY_CIFAR_TRAIN = 500  # the tiny_cifar fixture's training images

EDGE_VALUES = [0, -1, -0.5, 0.5, 1.5, 3.0, 1e-300, 1e300, 10**12, 10**30, 2**63, math.nan, math.inf, -math.inf,
               True, False, "abc", "1", "", None]

# Per key, values a user might mean: some drawn configs must run, or the fuzz checks nothing.
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "privacy.epsilon": st.floats(0.3, 30),
    "privacy.delta": st.floats(1e-9, 1e-2),
    "privacy.max_grad_norm": st.floats(1e-3, 100),
    "privacy.noise_multiplier": st.one_of(st.none(), st.floats(0.3, 50)),
    "optimizer.lr": st.floats(1e-6, 10),
    "optimizer.weight_decay": st.floats(0, 1),
    "optimizer.eps": st.floats(1e-12, 1),
    "trainer.epochs": st.integers(1, 3),
    "trainer.batch_size": st.integers(1, 80),
    "trainer.physical_batch_size": st.one_of(st.none(), st.integers(1, 80)),
    "trainer.eval_batch_size": st.integers(1, 2048),
    "seed": st.integers(0, 2**32 - 1),
    "data.train_subset": st.one_of(st.none(), st.integers(1, 600)),
    "data.test_subset": st.one_of(st.none(), st.integers(1, 300)),
    "data.val_size": st.integers(0, 600),
    "data.split_seed": st.integers(0, 2**32 - 1),
    "model.width": st.integers(1, 6),
    "model.hidden": st.integers(1, 32),
}
NUMERIC_KEYS = sorted(PLAUSIBLE)


@st.composite
def mutations(draw) -> dict[str, Any]:
    """One or two numeric keys, each set to an edge value or a plausible one."""
    keys = draw(st.lists(st.sampled_from(NUMERIC_KEYS), min_size=1, max_size=2, unique=True))
    return {key: draw(st.one_of(st.sampled_from(EDGE_VALUES), PLAUSIBLE[key])) for key in keys}


@pytest.fixture(scope="module")
def base_cfg(tiny_cifar) -> DictConfig:
    return compose_config(tiny_overrides(tiny_cifar) + [
        "model=convnet", "model.width=4", "model.hidden=16", "data.train_subset=64", "data.test_subset=32",
        "trainer.batch_size=32", "trainer.eval_batch_size=64", "privacy.accountant=rdp",
        "privacy.noise_multiplier=1.0"])


def _with(cfg: DictConfig, mutation: dict[str, Any], **extra: Any) -> DictConfig:
    cfg = copy.deepcopy(cfg)
    if "privacy.epsilon" in mutation and "privacy.noise_multiplier" not in mutation:
        extra = {"privacy.noise_multiplier": None, **extra}  # a target ε is read only without a σ
    with open_dict(cfg):
        for key, value in {**mutation, **extra}.items():
            parent, _, leaf = key.rpartition(".")
            (cfg[parent] if parent else cfg)[leaf] = value
    return cfg


def _check_epsilon(result: dict, steps: int, epsilon: float) -> None:
    """ε is the accountant's for the σ, q and steps of the run, and within a target."""
    assert isinstance(steps, int) and not isinstance(steps, bool), f"steps={steps!r} is not an int"
    expected = epsilon_for(noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"],
                           steps=steps, delta=result["delta"], accountant=result["accountant"])
    assert epsilon == pytest.approx(expected, rel=1e-9), "reported ε is not the accountant's"
    if result["target_epsilon"] is not None:
        assert epsilon <= result["target_epsilon"] + 0.01, "ε exceeds the target"


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _long_run(cfg: DictConfig) -> bool:
    """Would this config train more than MAX_TRAINED_STEPS steps? (Only for valid counts:
    anything else must be refused before a step is taken.)"""
    epochs, batch, val = cfg.trainer.epochs, cfg.trainer.batch_size, cfg.data.val_size
    if not (_is_count(epochs) and _is_count(batch) and batch > 0 and _is_count(val)):
        return False
    num_train = max(TINY_CIFAR_TRAIN - val, 0)
    if _is_count(cfg.data.train_subset):
        num_train = min(num_train, cfg.data.train_subset)
    return math.ceil(num_train / batch) * epochs > MAX_TRAINED_STEPS


def run_or_refuse(base: DictConfig, mutation: dict[str, Any]) -> str:
    """Train (or only plan, if long); returns "refused", "planned" or the run's status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        try:
            cfg = _with(base, mutation)
            if _long_run(cfg):
                plan = run(_with(base, mutation, dry_run=True), out / "plan")
                if plan["private"]:
                    _check_epsilon(plan, plan["planned_steps"], plan["planned_epsilon"])
                return "planned"
            result = run(cfg, out / "run")
        except ConfigError as err:
            message = str(err)
            assert message and "\n" not in message, f"not one line: {message!r}"
            named = "=" in message or any(key.rpartition(".")[2] in message for key in mutation)
            assert named, f"names no key or value: {message!r}"
            assert not (out / "run" / RESULT_FILE).exists(), "a refused run left a result.json"
            return "refused"
    assert result["status"] in ("completed", "diverged"), result
    if result["private"]:
        _check_epsilon(result, result["steps"], result["epsilon"])
    if result["status"] == "completed":
        assert result["steps"] == result["planned_steps"]
        # Every test image was evaluated: an evaluation that skipped every batch reports a loss of
        # exactly 0, and the accuracy is a count of correct images out of the test set's.
        num_test = result["num_test"]
        assert num_test > 0 and math.isfinite(result["test_loss"]) and result["test_loss"] > 0, result
        correct = result["test_accuracy"] * num_test
        assert correct == pytest.approx(round(correct), abs=1e-6), "the accuracy is not out of the test set"
    return result["status"]


# Inputs that once escaped as other exceptions, hung, or completed wrongly (see the
# issue-8 report): each must now be refused or run correctly.
KNOWN_BAD = [
    {"trainer.epochs": 3.0}, {"trainer.epochs": 10**12}, {"seed": 3.0}, {"seed": 10**30},
    {"data.train_subset": 3.0}, {"data.test_subset": 3.0}, {"data.val_size": 3.0},
    {"data.split_seed": -1}, {"data.split_seed": 0.5}, {"data.split_seed": None}, {"data.split_seed": "abc"},
    {"trainer.eval_batch_size": 0}, {"trainer.eval_batch_size": -1}, {"trainer.eval_batch_size": 1.5},
    {"trainer.eval_batch_size": None}, {"privacy.noise_multiplier": 1e-300}, {"privacy.noise_multiplier": 1e300},
    {"privacy.delta": 1e-300}, {"optimizer.lr": 1e300}, {"optimizer.weight_decay": True},
    {"optimizer.weight_decay": 10**30}, {"optimizer.eps": 10**30}, {"model.width": 0}, {"model.width": -1},
    {"model.hidden": -1},
]
# Inputs that made the accountant search forever (each must be refused quickly).
KNOWN_HANGS = [{"privacy.epsilon": 1e300}, {"privacy.epsilon": 10**12}, {"privacy.epsilon": 1e-300},
               {"privacy.noise_multiplier": 10**30}]


@pytest.mark.parametrize("mutation", KNOWN_BAD, ids=lambda m: ",".join(f"{k}={v!r}" for k, v in m.items()))
def test_known_bad_values_are_refused_or_run(base_cfg, mutation):
    run_or_refuse(base_cfg, mutation)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mutation", KNOWN_HANGS, ids=lambda m: ",".join(f"{k}={v!r}" for k, v in m.items()))
def test_values_that_hung_the_calibration_are_refused(base_cfg, mutation):
    assert run_or_refuse(base_cfg, mutation) == "refused"


@pytest.mark.slow
@pytest.mark.timeout(600)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(mutation=mutations())
@example(mutation={"privacy.noise_multiplier": 2.0})  # a given σ: ε must be the accountant's
@example(mutation={"privacy.epsilon": 1.0, "trainer.epochs": 2})  # a target: ε ≤ target
def test_fuzzed_numeric_keys_run_or_are_refused(base_cfg, mutation):
    run_or_refuse(base_cfg, mutation)


def test_fuzzing_reaches_both_outcomes(base_cfg):
    """The harness itself: a valid config runs and a bad one is refused."""
    assert run_or_refuse(base_cfg, {"trainer.epochs": 1}) == "completed"
    assert run_or_refuse(base_cfg, {"trainer.epochs": 0}) == "refused"

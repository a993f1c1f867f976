"""Loop features that must leave the DP mechanism unchanged: augmentation
multiplicity, parameter EMA, and checkpoint/resume (no replayed noise or batches)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from dp_sweeps.errors import ConfigError
from dp_sweeps.privacy import PrivacyPlan, make_private
from dp_sweeps.run import run
from dp_sweeps.training import backend, ema, loop
from dp_sweeps.training.checkpoint import checkpoint_path, load_checkpoint
from dp_sweeps.training.evaluate import evaluate
from tests.helpers.runs import compose_config, tiny_overrides

# A tiny run with cheap accounting: 128 images, batch 64 (2 steps per epoch), a given σ (no
# calibration) and the RDP accountant (milliseconds; PRV takes a second per ε).
SMALL = ("data.train_subset=128", "privacy.noise_multiplier=1.0", "privacy.accountant=rdp")


def _plan(*, sigma: float, clip: float, n: int, batch: int) -> PrivacyPlan:
    per_epoch = math.ceil(n / batch)
    return PrivacyPlan(private=True, accountant="prv", delta=1e-5, max_grad_norm=clip, noise_multiplier=sigma,
                       sample_rate=1 / per_epoch, steps_per_epoch=per_epoch, steps=per_epoch, target_epsilon=None,
                       planned_epsilon=None, poisson_sampling=True)


def test_augmult_averages_copies_before_clipping():
    """Per-example gradient = mean of its K copies' gradients, then clipped to ≤ C."""
    torch.manual_seed(0)
    copies, clip = 4, 0.05
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    reference.load_state_dict(model.state_dict())
    loader = DataLoader(TensorDataset(torch.arange(3)), batch_size=3)
    _, model, optimizer, criterion, _ = make_private(
        plan=_plan(sigma=0.0, clip=clip, n=3, batch=3), module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0), num_samples=len(loader.dataset),
        sampler_generator=torch.Generator(), criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks",
        noise_generator=torch.Generator())
    x = torch.randn(3 * copies, 3, 2, 2) * 5
    y = torch.tensor([0, 1, 2]).repeat_interleave(copies)
    criterion(model(x), y).backward()
    loop.average_augmented_copies(model, copies)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad_sample.shape[0] == 3
        for i in range(3):  # explicit per-example loop
            grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x[i * copies:(i + 1) * copies]),
                                                                    y[i * copies:(i + 1) * copies]), q)[0]
            assert torch.allclose(p.grad_sample[i], grads, atol=1e-5)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in optimizer.grad_samples]).norm(dim=0)
    assert (norms > clip).all()  # raw averaged gradients exceed C ...
    optimizer.pre_step()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())) * optimizer.expected_batch_size
    assert total <= 3 * clip * (1 + 1e-5)  # ... and the sum of 3 clipped ones is within 3C


def test_augmult_run_keeps_steps_and_epsilon(tiny_cfg, tmp_path, monkeypatch):
    averaged = []  # (examples, copies) of each physical batch whose copies were averaged
    real_average = loop.average_augmented_copies

    def spy(module, copies):
        real_average(module, copies)
        averaged.append((next(p.grad_sample.shape[0] for p in module.parameters()), copies))

    plain = run(tiny_cfg(*SMALL, "data.augment=true"), tmp_path / "plain")
    monkeypatch.setattr(loop, "average_augmented_copies", spy)
    multi = run(tiny_cfg(*SMALL, "data.augment=true", "trainer.augmult=3", "trainer.physical_batch_size=32"),
                tmp_path / "augmult")
    assert multi["status"] == "completed"
    assert multi["steps"] == plain["steps"] == 2 and multi["epsilon"] == pytest.approx(plain["epsilon"])
    # Every physical batch (at most 32 examples, as 96 copies) was averaged back to one row per example.
    assert averaged and all(copies == 3 and 0 < examples <= 32 for examples, copies in averaged)


def test_augmult_refuses_ghost_clipping(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.augmult>1 needs per-example gradients"):
        run(tiny_cfg(*SMALL, "trainer.augmult=2", "privacy.grad_sample_mode=ghost"), tmp_path)


def test_ema_weights_are_the_ones_evaluated(tiny_cfg, tmp_path, monkeypatch):
    """Evaluation sees the EMA copy. With the average frozen after its first update
    (the weights after step 1), what is evaluated differs from the trained weights."""
    evaluated, emas = [], []
    real_evaluate = loop.evaluate

    def spy(model, x, y, **kw):
        evaluated.append((model, [p.detach().clone() for p in model.parameters()]))
        return real_evaluate(model, x, y, **kw)

    class RecordingAveragedModel(ema.AveragedModel):
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            emas.append(self)

    monkeypatch.setattr(loop, "evaluate", spy)
    monkeypatch.setattr(ema, "AveragedModel", RecordingAveragedModel)
    monkeypatch.setattr(ema, "ema_with_warmup", lambda decay: (lambda averaged, params, n: None))
    result = run(tiny_cfg("trainer.ema_decay=0.999", "optimizer.lr=0.05", "trainer.checkpoint_every=1"), tmp_path)
    assert result["status"] == "completed" and result["steps"] > 1
    trained = load_checkpoint(checkpoint_path(tmp_path))["model"]
    model, weights = evaluated[-1]
    assert model is emas[0].module
    assert not all(torch.equal(p, q) for p, q in zip(weights, trained.values()))


def test_ema_update_has_warmup():
    averaged, param = [torch.zeros(3)], [torch.ones(3)]
    update = ema.ema_with_warmup(0.999)
    update(averaged, param, torch.tensor(0))  # t=0: decay (1+0)/(10+0) = 0.1
    assert torch.allclose(averaged[0], torch.full((3,), 0.9))


def test_ema_copies_integer_and_bool_buffers():
    """use_buffers=True hands buffers to the update too: a flag or a counter is copied, not lerped."""
    averaged = [torch.zeros(2), torch.tensor(False), torch.tensor(3)]
    live = [torch.ones(2), torch.tensor(True), torch.tensor(7)]
    ema.ema_with_warmup(0.999)(averaged, live, torch.tensor(0))
    assert torch.allclose(averaged[0], torch.full((2,), 0.9))
    assert bool(averaged[1]) and int(averaged[2]) == 7


def test_resume_continues_the_same_run(tiny_cfg, tmp_path, monkeypatch):
    """An interrupted run resumed from its checkpoint ends bit-identical to an
    uninterrupted one: same ε, same steps, no noise or batch drawn twice. (The two runs
    share privacy.noise_seed so that they can be compared at all: by default each run's
    noise is fresh.)"""
    overrides = (*SMALL, "trainer.epochs=3", "trainer.checkpoint_every=1", "data.augment=true",
                 "privacy.noise_seed=5")
    full = run(tiny_cfg(*overrides), tmp_path / "full")
    full_weights = load_checkpoint(checkpoint_path(tmp_path / "full"))["model"]

    calls = {"n": 0}
    real_save = loop.ckpt.save_checkpoint

    def crash_after_first(path, payload):
        real_save(path, payload)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("simulated kill after epoch 1")

    monkeypatch.setattr(loop.ckpt, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*overrides), tmp_path / "cut")
    assert not (tmp_path / "cut" / "result.json").exists()
    assert load_checkpoint(checkpoint_path(tmp_path / "cut"))["epoch"] == 1
    resumed = run(tiny_cfg(*overrides, "trainer.resume=true"), tmp_path / "cut")
    assert resumed["resumed_from_epoch"] == 2
    assert resumed["steps"] == full["steps"] == 6
    assert resumed["epsilon"] == pytest.approx(full["epsilon"], rel=1e-12)
    cut_weights = load_checkpoint(checkpoint_path(tmp_path / "cut"))["model"]
    for k in full_weights:
        assert torch.equal(full_weights[k], cut_weights[k]), k
    rows = (tmp_path / "cut" / "metrics.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    # A finished run is not trained again.
    again = run(tiny_cfg(*overrides, "trainer.resume=true"), tmp_path / "cut")
    assert again["wall_seconds"] == resumed["wall_seconds"]


def test_checkpoint_with_other_privacy_settings_is_refused(tiny_cfg, tmp_path):
    run(tiny_cfg(*SMALL, "trainer.epochs=2", "trainer.checkpoint_every=1"), tmp_path)
    (tmp_path / "result.json").unlink()
    with pytest.raises(ConfigError, match="written with noise_multiplier=1.0.*refusing to resume"):
        run(tiny_cfg(*SMALL, "trainer.epochs=2", "trainer.resume=true", "privacy.noise_multiplier=3.0"), tmp_path)
    with pytest.raises(ConfigError, match="written with max_grad_norm=1.0.*config gives max_grad_norm=2.0"):
        run(tiny_cfg(*SMALL, "trainer.epochs=2", "trainer.resume=true", "privacy.max_grad_norm=2.0"), tmp_path)


def test_cpu_memory_reuse_is_opt_in(tiny_cfg, tmp_path, monkeypatch):
    """glibc memory reuse fragments the heap (EfficientNet bench: 15 GB vs 9.3 GB): a run
    with the default config leaves malloc alone; trainer.reuse_cpu_memory=true turns it on."""
    calls = []
    monkeypatch.setattr(backend, "keep_freed_cpu_memory", lambda: calls.append(1) or True)
    assert run(tiny_cfg(*SMALL), tmp_path / "default")["status"] == "completed"
    assert calls == []
    assert run(tiny_cfg(*SMALL, "trainer.reuse_cpu_memory=true"), tmp_path / "asked")["status"] == "completed"
    assert calls == [1]
    backend.configure_backend(torch.device("cpu"))  # the function's own default: off too
    assert calls == [1]


def test_eval_flip_scores_the_mean_of_the_two_logits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(50, 3, 2, 2), torch.randint(0, 3, (50,))
    mirror = x.flip(-1)
    loss, accuracy = evaluate(model, x, y, batch_size=16, x_mirror=mirror)
    with torch.no_grad():
        logits = (model(x) + model(mirror)) / 2
    assert accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    # Without the mirrors, the plain logits: another loss (the mirrors were used above).
    plain_loss, plain_accuracy = evaluate(model, x, y, batch_size=16)
    with torch.no_grad():
        plain_logits = model(x)
    assert plain_loss == pytest.approx(nn.functional.cross_entropy(plain_logits, y).item(), rel=1e-5)
    assert plain_accuracy == pytest.approx((plain_logits.argmax(1) == y).float().mean().item())
    assert abs(plain_loss - loss) > 1e-3


def test_eval_flip_run_evaluates_the_mirrored_images(tiny_cfg, tmp_path, monkeypatch):
    seen = []
    real_evaluate = loop.evaluate

    def spy(model, x, y, **kw):
        seen.append((x, kw.get("x_mirror")))
        return real_evaluate(model, x, y, **kw)

    monkeypatch.setattr(loop, "evaluate", spy)
    result = run(tiny_cfg("trainer.eval_flip=true", "data.val_size=32"), tmp_path)
    assert result["status"] == "completed"
    # The run-time estimate's probe (val, test: a few images each), then the epoch's val and test.
    assert len(seen) == 4
    assert [len(x) for x, _ in seen[2:]] == [32, result["num_test"]]
    for x, mirror in seen:
        assert mirror is not None and torch.equal(mirror, x.flip(-1))


def test_eval_flip_mirrors_go_through_the_feature_map():
    from dp_sweeps.data import ImageData
    from dp_sweeps.data.features import apply_feature_map, compute_features

    torch.manual_seed(0)
    data = ImageData(train_x=torch.randn(4, 3, 32, 32), train_y=torch.zeros(4, dtype=torch.long),
                     val_x=torch.randn(0, 3, 32, 32), val_y=torch.zeros(0, dtype=torch.long),
                     test_x=torch.randn(5, 3, 32, 32), test_y=torch.zeros(5, dtype=torch.long), num_classes=10)
    mapped = apply_feature_map(data.with_mirrors(), {"name": "pixels", "size": 8, "grey": True})
    assert mapped.test_x.shape == mapped.test_x_mirror.shape == (5, 1, 8, 8)
    torch.testing.assert_close(mapped.test_x_mirror, compute_features("pixels", data.test_x.flip(-1),
                                                                      {"size": 8, "grey": True}))
    assert apply_feature_map(data, {"name": "pixels", "size": 8}).test_x_mirror is None  # off: nothing added


def test_eval_flip_bad_input_is_refused(tiny_cfg, tiny_cifar, tmp_path):
    with pytest.raises(ConfigError, match="trainer.eval_flip='yes' must be true or false"):
        run(tiny_cfg("trainer.eval_flip=yes"), tmp_path)
    with pytest.raises(ConfigError, match="classical classifier"):
        run(compose_config(tiny_overrides(tiny_cifar) + ["model=naive_bayes", "trainer.eval_flip=true"]), tmp_path)
    assert not (tmp_path / "result.json").exists()

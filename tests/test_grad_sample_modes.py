"""Speed never changes the privacy mechanism: every per-example gradient engine that
``privacy.grad_sample_mode=auto`` may pick gives the same clipped, noised gradient as
Opacus's hooks mode (same model, batch and noise seed), on a small model of each
architecture family; and without noise, the clipped sum matches an explicit
per-example loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dp_sweeps.bench import DEEP_MODELS
from dp_sweeps.models import create_model
from dp_sweeps.privacy import (
    AUTO_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    PrivacyPlan,
    make_private,
    resolve_grad_sample_mode,
)

# One small model per architecture family; the names are the config/registry names
# that AUTO_GRAD_SAMPLE_MODE is keyed by.
FAMILIES = {
    "convnet": dict(width=4, hidden=16),                           # conv + tanh + linear
    "resnet18": dict(width=8, blocks_per_stage=(1, 1, 1, 1)),      # residual, GroupNorm
    "vit": dict(embed_dim=16, depth=1, num_heads=2),               # LayerNorm, attention, cls/pos tokens
    "efficientnet": dict(variant="test_efficientnet"),             # depthwise conv, SE, GroupNormAct
    "densenet121": dict(growth_rate=4, block_config=(1, 1, 1, 1)),  # concatenation, GroupNormAct
    "scatter_linear": dict(in_channels=9, spatial_size=4, norm_groups=3),  # GroupNorm + linear on features
}
# Models that read feature maps, not images: their input shape (N x C x H x W without N).
INPUT_SHAPES = {"scatter_linear": (9, 4, 4)}
ENGINES = [m for m in GRAD_SAMPLE_MODES if m != "auto"]
# Two physical batch sizes: ExpandedWeights ("ew") takes a grouped-convolution path under
# 32 examples and an unfold path from 32 on; Poisson batches split by BatchMemoryManager
# give both in one run.
BATCH_SIZES = (6, 32)
NOISE_MULTIPLIER = 1.0


def _plan(max_grad_norm: float, noise_multiplier: float) -> PrivacyPlan:
    # q = 1: the expected batch is the whole fixed batch used below.
    return PrivacyPlan(private=True, accountant="rdp", delta=1e-5, max_grad_norm=max_grad_norm,
                       noise_multiplier=noise_multiplier, sample_rate=1.0, steps_per_epoch=1, steps=1,
                       target_epsilon=None, planned_epsilon=None, poisson_sampling=True)


def _batch(size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    shape = INPUT_SHAPES.get(name, (3, 32, 32))
    return torch.randn(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _fresh(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=10, **FAMILIES[name])


def _per_example_gradients(model: nn.Module, x, y) -> list[list[torch.Tensor]]:
    """The reference: one backward pass per example, no Opacus."""
    grads = []
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return grads


def _dp_gradient(name: str, mode: str, *, batch_size: int, max_grad_norm: float, noise_multiplier: float,
                 noise_seed: int = 7) -> list[torch.Tensor]:
    """p.grad after Opacus's pre_step (clip, sum, add noise, divide by the expected batch)."""
    model = _fresh(name)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(batch_size)),
                                         batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, module, optimizer, criterion, _ = make_private(
        plan=_plan(max_grad_norm, noise_multiplier), module=model, optimizer=optimizer,
        num_samples=len(loader.dataset), sampler_generator=torch.Generator(),
        criterion=nn.CrossEntropyLoss(), grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(noise_seed))
    x, y = _batch(batch_size, name)
    criterion(module(x), y).backward()  # ghost: both of its backward passes
    optimizer.pre_step()
    return [p.grad.detach().clone() for p in module.parameters() if p.requires_grad]


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    flat_actual, flat_expected = torch.cat([a.flatten() for a in actual]), torch.cat([e.flatten() for e in expected])
    # Tight, at float32 rounding: 1e-5 relative error of the whole gradient, and per coordinate
    # 1e-5 relative with a floor of 1e-5 of the largest coordinate (a wrong clipping factor for
    # one example of 32 would be off by orders of magnitude more).
    assert (flat_actual - flat_expected).norm() <= 1e-5 * flat_expected.norm()
    torch.testing.assert_close(flat_actual, flat_expected, rtol=1e-5, atol=1e-5 * flat_expected.abs().max().item())


@pytest.fixture(scope="module")
def hooks_reference():
    """Per family and batch size: the clipping threshold (the median per-example norm, so
    about half the examples are clipped) and the hooks gradients at σ = 0 and σ > 0."""
    cache = {}

    def get(name: str, batch_size: int) -> dict:
        if (name, batch_size) not in cache:
            norms = [torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
                     for grads in _per_example_gradients(_fresh(name), *_batch(batch_size, name))]
            clip = float(torch.tensor(norms).median())
            cache[name, batch_size] = {
                "clip": clip,
                **{sigma: _dp_gradient(name, "hooks", batch_size=batch_size, max_grad_norm=clip,
                                       noise_multiplier=sigma) for sigma in (0.0, NOISE_MULTIPLIER)}}
        return cache[name, batch_size]
    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hooks_mode_clips_like_an_explicit_per_example_loop(name, hooks_reference):
    """The reference engine itself: σ = 0 leaves Σ_i g_i·min(1, C/‖g_i‖) / B."""
    batch_size = BATCH_SIZES[0]
    hooks = hooks_reference(name, batch_size)
    reference = None
    for grads in _per_example_gradients(_fresh(name), *_batch(batch_size, name)):
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = (hooks["clip"] / (norm + 1e-6)).clamp(max=1.0)  # Opacus's clipping factor
        scaled = [g * factor / batch_size for g in grads]
        reference = scaled if reference is None else [r + s for r, s in zip(reference, scaled)]
    _assert_same(hooks[0.0], reference)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("mode", [m for m in ENGINES if m != "hooks"])
def test_engine_gives_the_hooks_gradient(mode, name, batch_size, hooks_reference):
    """Same clipped sum (σ = 0) and same noised gradient (σ > 0, same noise seed) as hooks.
    An engine that cannot run a family is allowed only if ``auto`` never picks it there."""
    hooks = hooks_reference(name, batch_size)
    try:
        clipped = _dp_gradient(name, mode, batch_size=batch_size, max_grad_norm=hooks["clip"], noise_multiplier=0.0)
    except Exception as err:
        if resolve_grad_sample_mode("auto", name) == mode:
            raise AssertionError(f"auto picks {mode!r} for {name}, which fails at {batch_size} examples: "
                                 f"{err}") from err
        pytest.skip(f"{mode} does not run {name} at {batch_size} examples (auto does not pick it): "
                    f"{type(err).__name__}")
    _assert_same(clipped, hooks[0.0])
    noised = _dp_gradient(name, mode, batch_size=batch_size, max_grad_norm=hooks["clip"],
                          noise_multiplier=NOISE_MULTIPLIER)
    _assert_same(noised, hooks[NOISE_MULTIPLIER])
    # The noise is really there (σ·C/B per coordinate), so the comparison above covers it.
    assert not torch.allclose(torch.cat([n.flatten() for n in noised]), torch.cat([c.flatten() for c in clipped]))


def test_auto_resolves_to_a_measured_engine_for_every_model():
    for name in DEEP_MODELS:  # the paper's image models, which `make bench` measures
        assert AUTO_GRAD_SAMPLE_MODE.get(name) in ENGINES, f"no auto engine for {name}"
        assert resolve_grad_sample_mode("auto", name) == AUTO_GRAD_SAMPLE_MODE[name]
        assert name in FAMILIES  # so the equivalence test above covers its pick
    # Every model with an auto entry (the ScatterNet heads too) is covered by the equivalence test.
    assert set(AUTO_GRAD_SAMPLE_MODE) <= set(FAMILIES)
    assert resolve_grad_sample_mode("ghost", "convnet") == "ghost"  # an explicit choice is kept
    assert resolve_grad_sample_mode("auto", "a-model-never-measured") == "hooks"


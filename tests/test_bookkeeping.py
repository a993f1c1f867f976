"""dp_sweeps.grad_sample.bookkeeping: factored per-example gradients give Opacus's norms and clipped
sums, are really used by the hooks engine, and cannot reach an optimizer that would
misread them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.grad_sample.linear import compute_linear_grad_sample
from opacus.optimizers import DPOptimizer

from dp_sweeps import grad_sample
from dp_sweeps.grad_sample.bookkeeping import (
    BookkeepingDPOptimizer,
    FactoredGradSample,
    enable_bookkeeping,
    factored_grad_sample,
    factoring_pays,
)
from dp_sweeps.grad_sample.samplers import opacus_conv_grad_sample
from dp_sweeps.models import create_model
from dp_sweeps.privacy import PrivacyPlan, make_private

grad_sample.install()  # what make_private does first: our rules in Opacus's registries


def _enabled(layer: nn.Module) -> nn.Module:
    layer._dp_sweeps_bookkeeping = True
    return layer


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(16, 32, 3, padding=1), (5, 16, 4, 4)),                # ResNet's late stage
    (nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), (5, 16, 8, 8)),
    (nn.Conv2d(32, 64, 1), (5, 32, 2, 2)),                            # 1x1 shortcut
    (nn.Conv2d(16, 32, (3, 2), padding=(1, 0)), (5, 16, 3, 5)),        # non-square
    (nn.Linear(40, 30), (5, 40)),                                     # T = 1: ‖a‖·‖b‖
    (nn.Linear(40, 30), (5, 3, 40)),                                  # tokens: Gram matrices
])
def test_factored_norms_and_clipped_sum_equal_the_built_gradients(layer, shape):
    torch.manual_seed(0)
    layer = _enabled(layer)
    x = torch.randn(*shape)
    backprops = torch.randn_like(layer(x))
    factored = factored_grad_sample(layer, [x], backprops)
    assert factored is not None, "book-keeping should pay on this shape"
    built = (opacus_conv_grad_sample if isinstance(layer, nn.Conv2d) else compute_linear_grad_sample)(
        layer, [x], backprops)
    assert set(factored) == set(built)
    factors = torch.rand(shape[0])
    for param, grads in built.items():
        sample = factored[param]
        assert isinstance(sample, FactoredGradSample) and sample.shape == (shape[0], 1)
        torch.testing.assert_close(sample.reshape(shape[0], -1).norm(dim=1), grads.reshape(shape[0], -1).norm(dim=1),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sample.clipped_sum(factors), torch.einsum("i,i...", factors, grads),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sample.materialize(), grads)


def test_factoring_is_taken_only_where_it_pays_and_where_enabled():
    wide_late = nn.Conv2d(64, 64, 3, padding=1)          # T = 16, d·O = 36,864
    x_small, x_large = torch.randn(2, 64, 4, 4), torch.randn(2, 64, 32, 32)
    assert not factoring_pays(wide_late, x_small, wide_late(x_small))  # not enabled on this layer
    _enabled(wide_late)
    assert factoring_pays(wide_late, x_small, wide_late(x_small))
    assert not factoring_pays(wide_late, x_large, wide_late(x_large))  # T = 1024: building is cheaper
    assert not factoring_pays(wide_late, x_small[:0], wide_late(x_small[:0]))  # empty Poisson batch
    grouped = _enabled(nn.Conv2d(64, 64, 3, padding=1, groups=64))
    assert not factoring_pays(grouped, x_small, grouped(x_small))


def _plan(poisson: bool = True) -> PrivacyPlan:
    return PrivacyPlan(private=True, accountant="rdp", delta=1e-5, max_grad_norm=0.5, noise_multiplier=1.0,
                       sample_rate=1.0, steps_per_epoch=1, steps=1, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=poisson)


def _private_resnet(poisson: bool = True):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, width=8, blocks_per_stage=(1, 1, 1, 1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=8)
    _, module, optimizer, criterion, _ = make_private(
        plan=_plan(poisson), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        num_samples=len(loader.dataset), sampler_generator=torch.Generator(), criterion=nn.CrossEntropyLoss(),
        grad_sample_mode="hooks",
        noise_generator=torch.Generator().manual_seed(5))
    return module, optimizer, criterion


def _batch(n: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_hooks_engine_factors_the_late_layers():
    module, optimizer, criterion = _private_resnet()
    assert type(optimizer) is BookkeepingDPOptimizer
    criterion(module(*_batch()[:1]), _batch()[1]).backward()
    factored = [name for name, p in module.named_parameters() if isinstance(p.grad_sample, FactoredGradSample)]
    built = [name for name, p in module.named_parameters() if not isinstance(p.grad_sample, FactoredGradSample)]
    assert any("layer4" in name or "stages.3" in name for name in factored), factored
    assert built, "the early, large-map layers keep built per-example gradients"


def test_a_factored_gradient_fails_loudly_in_a_stock_optimizer():
    module, optimizer, criterion = _private_resnet()
    optimizer.__class__ = DPOptimizer  # as if something swapped the optimizer back
    criterion(module(*_batch()[:1]), _batch()[1]).backward()
    with pytest.raises(RuntimeError):
        optimizer.pre_step()


def test_two_backward_passes_before_a_step_give_the_built_sum():
    """Opacus accumulates a list of per-example gradients when several batches precede one
    step (no Poisson sampling): the factored entries are built, the step is Opacus's."""
    steps = []
    for book in (True, False):
        module, optimizer, criterion = _private_resnet(poisson=False)
        if not book:
            optimizer.__class__ = DPOptimizer
            for m in module.modules():
                m._dp_sweeps_bookkeeping = False
        for seed in (1, 2):
            x, y = _batch(4, seed)
            criterion(module(x), y).backward()
        optimizer.pre_step()
        steps.append([p.grad.clone() for p in module.parameters()])
    for a, b in zip(*steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_other_engines_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 3))
    ghost_like = GradSampleModule(model, force_functorch=True)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=2)
    assert enable_bookkeeping(ghost_like, optimizer) == 0 and type(optimizer) is DPOptimizer

"""dp_sweeps.grad_sample.samplers: the faster stride-1 convolution sampler and the copy-free
storage give exactly Opacus's per-example gradients, and are what Opacus runs; the
hooks engine skips autograd's summed gradients and still takes Opacus's exact step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.grad_sample import grad_sample_module

from dp_sweeps import grad_sample
from dp_sweeps.grad_sample.samplers import (
    conv2d_grad_sample,
    conv2d_norm_sample,
    fast_path_applies,
    opacus_conv_grad_sample,
    opacus_store_grad_sample,
    store_grad_sample,
)

grad_sample.install()  # what make_private does first: our rules in Opacus's registries

# (in, out, kernel, padding, stride, groups, height, width, bias)
SHAPES = [
    (3, 4, 3, 1, 1, 1, 32, 32, True),     # the ConvNet's / ResNet's first layer
    (8, 4, 3, 1, 1, 1, 16, 16, False),
    (5, 3, 1, 0, 1, 1, 12, 9, True),       # 1x1
    (4, 3, 5, 2, 1, 1, 11, 7, True),       # 5x5, odd sizes
    (4, 3, 3, 0, 1, 1, 10, 7, True),       # no padding
    (4, 3, (3, 5), (1, 2), 1, 1, 10, 12, True),  # non-square kernel
    (4, 3, 3, 1, 2, 1, 12, 12, True),      # stride 2: Opacus's own path
    (4, 4, 3, 1, 1, 2, 12, 12, True),      # groups: Opacus's own path
    (4, 4, 3, 1, 1, 4, 12, 12, True),      # depthwise
    (6, 6, 5, 2, 2, 6, 15, 16, False),     # depthwise 5x5, stride 2 (EfficientNet's)
    (3, 6, 3, 1, 2, 3, 9, 9, True),        # depthwise, channel multiplier 2
]


@pytest.mark.parametrize("c_in,c_out,kernel,padding,stride,groups,height,width,bias", SHAPES)
def test_conv_sampler_equals_opacus(c_in, c_out, kernel, padding, stride, groups, height, width, bias):
    torch.manual_seed(0)
    layer = nn.Conv2d(c_in, c_out, kernel, padding=padding, stride=stride, groups=groups, bias=bias)
    x = torch.randn(6, c_in, height, width)
    backprops = torch.randn_like(layer(x))
    ours, theirs = conv2d_grad_sample(layer, [x], backprops), opacus_conv_grad_sample(layer, [x], backprops)
    assert set(ours) == set(theirs)
    for param in theirs:
        assert ours[param].shape == (6, *param.shape)
        torch.testing.assert_close(ours[param], theirs[param], rtol=1e-5, atol=1e-5)


def test_depthwise_path_is_taken_and_dilation_matches():
    from dp_sweeps.grad_sample.samplers import depthwise_grad_sample, is_depthwise

    x = torch.randn(3, 4, 10, 9)
    assert not is_depthwise(nn.Conv2d(4, 4, 3, groups=2), x)
    for stride in (1, 2):  # one depthwise convolution / products on strided views
        layer = nn.Conv2d(4, 8, 3, padding=2, dilation=2, stride=stride, groups=4)
        assert is_depthwise(layer, x)
        backprops = torch.randn_like(layer(x))
        ours, theirs = depthwise_grad_sample(layer, x, backprops), opacus_conv_grad_sample(layer, [x], backprops)
        for param in theirs:
            torch.testing.assert_close(ours[param], theirs[param], rtol=1e-5, atol=1e-5)


def test_fast_path_is_taken_on_large_maps_only():
    big = nn.Conv2d(3, 32, 3, padding=1)
    assert fast_path_applies(big, torch.zeros(2, 3, 32, 32))
    assert not fast_path_applies(big, torch.zeros(2, 3, 4, 4))           # 16 positions < 2 x 32 channels
    assert not fast_path_applies(nn.Conv2d(3, 32, 3, stride=2), torch.zeros(2, 3, 32, 32))
    assert not fast_path_applies(big, torch.zeros(0, 3, 32, 32))           # empty batch: Opacus's path


def test_each_example_gets_its_own_gradient():
    """Against autograd, one example at a time (not just against Opacus's formula)."""
    torch.manual_seed(1)
    layer = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(4, 3, 9, 9)
    target = torch.randn(4, 5, 9, 9)
    out = layer(x)
    backprops = 2 * (out - target).detach()  # d/d out of ((out - target)^2).sum()
    samples = conv2d_grad_sample(layer, [x], backprops)
    for i in range(4):
        layer.zero_grad()
        ((layer(x[i:i + 1]) - target[i:i + 1]) ** 2).sum().backward()
        torch.testing.assert_close(samples[layer.weight][i], layer.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(samples[layer.bias][i], layer.bias.grad, rtol=1e-5, atol=1e-5)


def test_storage_keeps_the_value_and_never_writes_into_the_sampler_output():
    param = nn.Parameter(torch.zeros(3))
    first, second = torch.randn(4, 3), torch.randn(4, 3)
    kept = first.clone()
    store_grad_sample(param=param, grad_sample=first, max_batch_len=4)
    store_grad_sample(param=param, grad_sample=second, max_batch_len=4)  # a tied weight's second use
    torch.testing.assert_close(param._current_grad_sample, kept + second)
    assert torch.equal(first, kept)
    shorter = nn.Parameter(torch.zeros(3))
    store_grad_sample(param=shorter, grad_sample=first[:2], max_batch_len=4)  # zero-padded, as Opacus
    torch.testing.assert_close(shorter._current_grad_sample, torch.cat([first[:2], torch.zeros(2, 3)]))


def _tied_model_samples(store, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(grad_sample_module, "create_or_accumulate_grad_sample", store)
    torch.manual_seed(2)
    shared = nn.Linear(4, 4)
    model = GradSampleModule(nn.Sequential(shared, nn.Tanh(), shared))  # one weight, used twice
    model(torch.randn(3, 4)).sum().backward()
    return shared.weight.grad_sample


def test_opacus_runs_them_and_a_tied_weight_gets_opacus_value(monkeypatch):
    assert GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] is conv2d_grad_sample
    assert grad_sample_module.create_or_accumulate_grad_sample is store_grad_sample
    ours = _tied_model_samples(store_grad_sample, monkeypatch)
    theirs = _tied_model_samples(opacus_store_grad_sample, monkeypatch)
    assert opacus_store_grad_sample is not store_grad_sample
    assert isinstance(ours, torch.Tensor) and ours.shape == (3, 4, 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("c_in,c_out,kernel,padding,stride,groups,height,width,bias", SHAPES + [
    (16, 32, 3, 1, 1, 1, 4, 4, True),      # a late, small map: the ghost (Gram) branch
    (8, 16, 3, 1, 2, 1, 8, 8, False),      # strided, small: ghost branch with stride
])
def test_conv_norm_sampler_gives_the_per_example_gradient_norms(c_in, c_out, kernel, padding, stride, groups,
                                                                height, width, bias):
    torch.manual_seed(3)
    layer = nn.Conv2d(c_in, c_out, kernel, padding=padding, stride=stride, groups=groups, bias=bias)
    x = torch.randn(5, c_in, height, width)
    backprops = torch.randn_like(layer(x))
    norms = conv2d_norm_sample(layer, [x], backprops)
    samples = opacus_conv_grad_sample(layer, [x], backprops)
    assert set(norms) == set(samples)
    for param, grads in samples.items():
        torch.testing.assert_close(norms[param], grads.reshape(5, -1).norm(dim=1), rtol=1e-4, atol=1e-5)


def test_ghost_branch_is_taken_on_small_maps():
    """The Gram-matrix branch must really run somewhere (else the test above covers one branch)."""
    layer = nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 4, 4)
    calls = []
    real = torch.bmm

    def counting_bmm(a, b, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, b, *args, **kwargs)

    torch.bmm = counting_bmm
    try:
        conv2d_norm_sample(layer, [x], torch.randn(2, 32, 4, 4))
    finally:
        torch.bmm = real
    assert (2, 16, 144) in calls and (2, 16, 32) in calls  # unfoldedᵀ x unfolded, backpropsᵀ x backprops


def _hooks_step(model_name: str, kwargs: dict, *, stock: bool):
    """A private step's p.grad (clipped, noised) and which parameters autograd filled."""
    from dp_sweeps.grad_sample.samplers import stock_opacus
    from dp_sweeps.models import create_model
    from dp_sweeps.privacy import PrivacyPlan, make_private

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **kwargs)
    plan = PrivacyPlan(private=True, accountant="rdp", delta=1e-5, max_grad_norm=0.5, noise_multiplier=1.0,
                       sample_rate=1.0, steps_per_epoch=1, steps=1, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=True)
    with stock_opacus() if stock else contextlib.nullcontext():
        _, module, optimizer, criterion, _ = make_private(
            plan=plan, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_samples=8,
            criterion=nn.CrossEntropyLoss(), grad_sample_mode="hooks", noise_generator=torch.Generator().manual_seed(5),
            sampler_generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    criterion(module(x), y).backward()
    filled = {name for name, p in module.named_parameters() if p.grad is not None}
    optimizer.pre_step()
    return module, [p.grad.clone() for p in module.parameters()], filled


@pytest.mark.parametrize("model_name,kwargs", [
    ("resnet18", dict(width=8, blocks_per_stage=(1, 1, 1, 1))),
    ("vit", dict(embed_dim=16, depth=1, num_heads=2)),
])
def test_hooks_engine_skips_the_summed_gradients_and_gives_opacus_step(model_name, kwargs):
    module, ours, filled = _hooks_step(model_name, kwargs, stock=False)
    _, theirs, stock_filled = _hooks_step(model_name, kwargs, stock=True)
    layers = {name for name, m in module._module.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    weights = {f"_module.{name}.weight" for name in layers}
    # Opacus as shipped: autograd fills every parameter's summed gradient (thrown away later).
    assert weights <= stock_filled
    # Ours: only layers whose input carries no graph (the first one) still get it.
    assert len(weights & filled) == 1, sorted(weights & filled)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_summed_gradients_come_back_when_the_hooks_are_off():
    module, _, _ = _hooks_step("resnet18", dict(width=8, blocks_per_stage=(1, 1, 1, 1)), stock=False)
    module.disable_hooks()
    module.zero_grad(set_to_none=True)
    module(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in module.parameters())

"""Convolutions padded by reflection, replication or wrap-around (``padding_mode`` other
than ``'zeros'``): Opacus's hooks and ghost engines get their per-example gradients and
norms wrong (their rule unfolds the input with zero padding), so
:func:`dp_sweeps.grad_sample.samplers.check_per_example_support` refuses them there, naming the
layer; the functorch and ExpandedWeights engines differentiate the layer's own forward and
are exact, so they are allowed. Every claim is checked against an explicit per-example
autograd loop."""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
from opacus import GradSampleModule, PrivacyEngine

import dp_sweeps.privacy  # noqa: F401  (installs dp_sweeps.grad_sample.samplers, as every run does)
from dp_sweeps.errors import ConfigError
from dp_sweeps.grad_sample.samplers import (
    check_per_example_support,
    conv2d_grad_sample,
    conv2d_norm_sample,
    stock_opacus,
)
from dp_sweeps.models import create_model

PADDING_MODES = ("reflect", "replicate", "circular")
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = 5  # spatial size per dimension


def _model(dim: int, padding_mode: str, **conv) -> nn.Module:
    """conv -> tanh -> linear; the convolution is ``features.0``."""
    torch.manual_seed(0)
    settings = dict(kernel_size=3, padding=1) | conv
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(CONVS[dim](2, 4, padding_mode=padding_mode, **settings), nn.Tanh()),
        flatten=nn.Flatten(), head=nn.LazyLinear(3)))


def _batch(dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return torch.randn(n, 2, *[SIZE] * dim, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """N x P: example i's gradient of its own loss, one backward pass per example."""
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    list(model.parameters()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


def _opacus(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Opacus's ``grad_sample_mode=mode`` on the batch (mean loss, as training): the
    per-example gradients (N x P), or for ghost the per-example gradient norms (N)."""
    model(x[:1])  # materialise the lazy head before Opacus sees the parameters
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False,
            grad_sample_mode=mode)
    module, criterion = wrapped[0], (wrapped[2] if mode == "ghost" else nn.CrossEntropyLoss())
    if mode == "functorch":  # what Opacus builds for it: the hooks module with every layer through vmap
        assert type(module) is GradSampleModule and module.force_functorch
    criterion(module(x), y).backward()
    if mode == "ghost":
        return module.per_sample_gradient_norms.detach()
    return torch.cat([p.grad_sample.reshape(len(x), -1) for p in model.parameters()], dim=1)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dim", CONVS)
def test_functorch_per_example_gradients_are_exact_for_every_padding_mode(dim, padding_mode):
    model = _model(dim, padding_mode)
    x, y = _batch(dim, 5)
    model(x[:1])
    expected = _reference(model, x, y)
    check_per_example_support(model, "functorch")  # allowed
    torch.testing.assert_close(_opacus(model, "functorch", x, y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch_size", (5, 33))  # ExpandedWeights: grouped path under 32 examples, unfold from 32
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dim", CONVS)
def test_expanded_weights_per_example_gradients_are_exact_for_every_padding_mode(dim, padding_mode, batch_size):
    """nn.Conv*d pads with F.pad in its own mode, then convolves with no padding: torch's
    ExpandedWeights sees (and differentiates) that convolution, so it is exact."""
    model = _model(dim, padding_mode, stride=2, padding=2)
    x, y = _batch(dim, batch_size)
    model(x[:1])
    expected = _reference(model, x, y)
    check_per_example_support(model, "ew")  # allowed
    torch.testing.assert_close(_opacus(model, "ew", x, y), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("dim", CONVS)
@pytest.mark.parametrize("mode", ("hooks", "ghost"))
def test_hooks_and_ghost_get_non_zero_padding_wrong_and_are_refused(mode, dim, padding_mode):
    """The bug: Opacus's rule (its own for Conv2d, as shipped; Conv1d/3d run it even with
    dp_sweeps installed) gives per-example gradients, and so ghost norms, that are not the
    example's; the clipping built on them is not DP-SGD's. The check refuses the layer."""
    model = _model(dim, padding_mode)
    x, y = _batch(dim, 5)
    model(x[:1])
    expected = _reference(model, x, y)
    if mode == "ghost":
        expected = expected.norm(dim=1)
    with stock_opacus() if dim == 2 else contextlib.nullcontext():
        got = _opacus(model, mode, x, y)
    assert (got - expected).norm() > 1e-2 * expected.norm()  # not rounding: the wrong gradient

    with pytest.raises(ConfigError) as err:
        check_per_example_support(model, mode)
    message = str(err.value)
    assert message == (f"model layer 'features.0' ({CONVS[dim].__name__}, padding_mode={padding_mode!r}): "
                       f"per-example gradients under grad_sample_mode={mode} assume zero padding; "
                       f"use padding_mode='zeros' or grad_sample_mode=functorch")
    assert "\n" not in message


@pytest.mark.parametrize("mode", ("hooks", "ghost"))
def test_our_conv2d_rules_refuse_non_zero_padding_instead_of_answering_wrong(mode):
    """Outside make_private too: dp_sweeps' Conv2d samplers (what Opacus runs for nn.Conv2d
    once installed) raise rather than return the zero-padding answer."""
    layer = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    x = torch.randn(4, 2, 6, 6)
    for rule in (conv2d_grad_sample, conv2d_norm_sample):
        with pytest.raises(ConfigError, match="padding_mode='reflect'"):
            rule(layer, [x], torch.randn(4, 3, 6, 6))
    model = _model(2, "reflect")
    x, y = _batch(2, 3)
    with pytest.raises(ConfigError, match="Conv2d with padding_mode='reflect'"):
        _opacus(model, mode, x, y)  # raised from the backward hook, type kept


@pytest.mark.parametrize("mode", ("hooks", "ghost", "functorch", "ew"))
def test_frozen_or_zero_padded_layers_pass_in_every_engine(mode):
    frozen = _model(2, "reflect")
    frozen.features[0].requires_grad_(False)  # no per-example gradient is taken for it
    check_per_example_support(frozen, mode)
    check_per_example_support(_model(2, "zeros"), mode)
    check_per_example_support(_model(1, "zeros", padding="same"), mode)


def test_the_layer_is_named_where_it_sits_and_bias_alone_counts():
    """Qualified names of nested layers (and of a model already wrapped by Opacus); a
    trainable bias makes the layer trainable."""
    inner = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"))
    model = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 2, 1), blocks=nn.Sequential(nn.Identity(), inner)))
    model.blocks[1][1].weight.requires_grad_(False)  # bias still trainable
    for wrapped in (model, GradSampleModule(model)):
        with pytest.raises(ConfigError, match=r"^model layer 'blocks\.1\.1' \(Conv2d, padding_mode='circular'\)"):
            check_per_example_support(wrapped, "ghost")


def test_an_engine_without_a_proof_is_refused():
    for mode in ("auto", "ghost_fsdp", "no_op"):
        with pytest.raises(ConfigError, match=f"grad_sample_mode={mode!r}"):
            check_per_example_support(nn.Linear(2, 2), mode)


TINY = {
    "convnet": dict(width=4, hidden=16),
    "resnet18": dict(width=8, blocks_per_stage=(1, 1, 1, 1)),
    "vit": dict(embed_dim=16, depth=1, num_heads=2),
    "efficientnet": dict(variant="test_efficientnet"),
    "densenet121": dict(growth_rate=4, block_config=(1, 1, 1, 1)),
    "wrn16_4": dict(depth=10, width=1),
    "scatter_linear": dict(in_channels=9, spatial_size=4, norm_groups=3),
    "scatter_cnn": dict(in_channels=9, spatial_size=4, norm_groups=3, layers=(4, "M", 4)),
    "timm": dict(arch="test_resnet", trainable="all", input_size=32),
    "timm_probe": dict(arch="test_vit"),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_registered_model_passes_in_every_engine(name):
    from dp_sweeps.models import list_models

    assert set(list_models()) <= set(TINY)
    model = create_model(name, num_classes=10, **TINY[name])
    for mode in ("hooks", "ghost", "functorch", "ew"):
        check_per_example_support(model, mode)

"""An empty Poisson batch (0 examples) still takes a DP-SGD step, and that step is pure
noise: for every registered model in every Opacus engine, forward and backward on 0
examples run (ghost: through its two-pass criterion), and ``optimizer.step()`` moves each
parameter by exactly the Gaussian noise, σ·C / expected batch size per coordinate, with
no gradient mixed in. Then a non-empty step still works. And each per-example gradient
(or norm) rule of ours returns 0 rows on an empty batch."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine

from dp_sweeps import grad_sample
from dp_sweeps.grad_sample import bookkeeping
from dp_sweeps.grad_sample import samplers as grad_samplers
from dp_sweeps.models import create_model

grad_sample.install()  # what make_private does first: our rules in Opacus's registries

# Tiny builds of every registered deep model: (builder settings, input shape without N).
MODELS = {
    "convnet": (dict(width=4, hidden=16), (3, 32, 32)),
    "resnet18": (dict(width=8, blocks_per_stage=(1, 1, 1, 1)), (3, 32, 32)),
    "vit": (dict(embed_dim=16, depth=1, num_heads=2), (3, 32, 32)),
    "efficientnet": (dict(variant="test_efficientnet"), (3, 32, 32)),
    "densenet121": (dict(growth_rate=4, block_config=(1, 1, 1, 1)), (3, 32, 32)),
    "wrn16_4": (dict(depth=10, width=1), (3, 32, 32)),  # WSConv2d: Opacus's functorch rule in every engine
    "scatter_linear": (dict(in_channels=9, spatial_size=4, norm_groups=3), (9, 4, 4)),
    "scatter_cnn": (dict(in_channels=9, spatial_size=4, norm_groups=3, layers=(4, "M", 4)), (9, 4, 4)),
    # A timm backbone with frozen-statistics BatchNorm (ChannelAffine), BiTFiT; a probe on 64 features.
    "timm": (dict(arch="test_resnet", trainable="bias_and_head", input_size=32), (3, 32, 32)),
    "timm_probe": (dict(arch="test_vit"), (64,)),
}
ENGINES = ("hooks", "ghost", "functorch", "ew")
SIGMA, CLIP, BATCH, NOISE_SEED = 1.5, 0.5, 4, 11


def test_every_registered_deep_model_is_covered():
    from dp_sweeps.models import list_models

    assert set(list_models()) <= set(MODELS)


def _private(name: str, mode: str):
    """The model wrapped by Opacus in ``mode``, with what dp_sweeps.privacy.make_private
    adds in the hooks engine (no summed gradients, book-keeping clipping)."""
    settings, shape = MODELS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **settings)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(2 * BATCH)), batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), data_loader=loader,
            criterion=nn.CrossEntropyLoss(), noise_multiplier=SIGMA, max_grad_norm=CLIP, poisson_sampling=False,
            grad_sample_mode=mode, noise_generator=torch.Generator().manual_seed(NOISE_SEED))
    if mode == "ghost":
        module, optimizer, criterion, _ = wrapped
    else:
        (module, optimizer, _), criterion = wrapped, nn.CrossEntropyLoss()
    if mode == "hooks":
        grad_samplers.skip_summed_gradients(module)
        bookkeeping.enable_bookkeeping(module, optimizer)
    return module, optimizer, criterion, shape


@pytest.mark.parametrize("mode", ENGINES)
@pytest.mark.parametrize("name", list(MODELS))
def test_empty_batch_step_is_pure_noise(name, mode):
    module, optimizer, criterion, shape = _private(name, mode)
    assert optimizer.expected_batch_size == BATCH
    before = [p.detach().clone() for p in optimizer.params]
    x, y = torch.zeros(0, *shape), torch.zeros(0, dtype=torch.long)
    criterion(module(x), y).backward()  # ghost: both backward passes of its criterion
    optimizer.step()
    # The same generator, the same draws: Opacus's noise, N(0, (σC)²) per coordinate, in
    # parameter order, divided by the expected batch size (loss_reduction="mean").
    generator = torch.Generator().manual_seed(NOISE_SEED)
    noises = [torch.normal(mean=0.0, std=SIGMA * CLIP, size=p.shape, generator=generator) for p in before]
    updates = [p.detach() - b for p, b in zip(optimizer.params, before)]
    for update, noise in zip(updates, noises):
        assert torch.isfinite(update).all()
        assert (update != 0).all()
        torch.testing.assert_close(update, -noise / BATCH, rtol=1e-5, atol=1e-7)  # SGD, lr = 1: -p.grad
    flat = torch.cat([u.flatten() for u in updates])
    assert abs(flat.std().item() / (SIGMA * CLIP / BATCH) - 1) < 0.2 or flat.numel() < 100

    # The empty batch left nothing behind: a step on 2 examples runs and stays finite, or
    # fails exactly as it does without the empty batch before it (ExpandedWeights cannot
    # run ViT, WRN or DenseNet at all; auto never picks it for them).
    optimizer.zero_grad(set_to_none=True)
    try:
        _two_example_step(module, optimizer, criterion, shape)
    except Exception as err:
        with pytest.raises(type(err)):
            _two_example_step(*_private(name, mode))
        assert mode == "ew", err
        return
    assert all(torch.isfinite(p).all() for p in optimizer.params)


def _two_example_step(module, optimizer, criterion, shape) -> None:
    generator = torch.Generator().manual_seed(1)
    criterion(module(torch.randn(2, *shape, generator=generator)), torch.tensor([1, 7])).backward()
    optimizer.step()


def test_our_rules_give_zero_rows_on_an_empty_batch():
    """Each per-example gradient or norm rule of ours, called as Opacus calls it."""
    from dp_sweeps.grad_sample.samplers import (
        build_conv2d_grad_sample,
        conv2d_grad_sample,
        conv2d_norm_sample,
        functorch_grad_sample,
        linear_grad_sample,
    )
    from dp_sweeps.models.vit import TokenEmbedding, token_embedding_grad_sample
    from dp_sweeps.models.wrn import WSConv2d

    layers = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=4),      # dense, depthwise
              nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), nn.Conv2d(4, 5, 2, padding="same")]
    for layer in layers:
        x = torch.zeros(0, layer.in_channels, 8, 8)
        backprops = layer(x)
        for rule in (conv2d_grad_sample, build_conv2d_grad_sample, functorch_grad_sample):
            samples = rule(layer, [x], backprops)
            assert {p: tuple(g.shape) for p, g in samples.items()} == \
                {p: (0, *p.shape) for p in layer.parameters()}, rule.__name__
        norms = conv2d_norm_sample(layer, [x], backprops)
        assert {p: tuple(n.shape) for p, n in norms.items()} == {p: (0,) for p in layer.parameters()}
    linear = nn.Linear(5, 3)
    samples = linear_grad_sample(linear, [torch.zeros(0, 5)], torch.zeros(0, 3))
    assert {p: tuple(g.shape) for p, g in samples.items()} == {p: (0, *p.shape) for p in linear.parameters()}
    embed = TokenEmbedding(torch.zeros(1, 1, 6), torch.zeros(1, 5, 6))
    samples = token_embedding_grad_sample(embed, [torch.zeros(0, 4, 6)], torch.zeros(0, 5, 6))
    assert {p: tuple(g.shape) for p, g in samples.items()} == {p: (0, *p.shape) for p in embed.parameters()}
    ws = WSConv2d(3, 4, 3, padding=1)  # no hand-written rule: Opacus's functorch one (vmap failed on 0 examples)
    x = torch.zeros(0, 3, 6, 6)
    samples = functorch_grad_sample(ws, [x], ws(x))
    assert {p: tuple(g.shape) for p, g in samples.items()} == {p: (0, *p.shape) for p in ws.parameters()}


def test_a_frozen_parameter_gets_no_empty_rows():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    layer.bias.requires_grad_(False)
    x = torch.zeros(0, 3, 8, 8)
    for rule in (grad_samplers.conv2d_grad_sample, grad_samplers.conv2d_norm_sample,
                 grad_samplers.functorch_grad_sample):
        assert set(rule(layer, [x], layer(x))) == {layer.weight}

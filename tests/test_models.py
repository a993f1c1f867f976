"""Every registered deep model is DP-compatible: no BatchNorm, Opacus's validator is
satisfied, and a real private step runs (tiny widths, and once at full size)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator

from dp_sweeps.models import create_model, list_models
from dp_sweeps.run import run
from tests.helpers.runs import compose_config, reevaluate, tiny_overrides

TINY = {
    "convnet": ["model.width=4", "model.hidden=16"],
    "resnet18": ["model.width=8", "model.blocks_per_stage=[1,1,1,1]"],
    "densenet121": ["model.growth_rate=4", "model.block_config=[1,1,1,1]"],
    "efficientnet": ["model.variant=test_efficientnet"],
    "vit": ["model.embed_dim=16", "model.depth=1", "model.num_heads=2"],
}
PAPER_MODELS = list(TINY)


def test_registry_lists_the_paper_models():
    assert set(PAPER_MODELS) <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")


# The default model runs in the fast suite; the others' private steps are covered there
# by test_full_size_model_is_dp_compatible and tests/test_grad_sample_modes.py.
@pytest.mark.parametrize("name", [n if n == "convnet" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PAPER_MODELS])
def test_tiny_model_takes_private_steps_through_the_real_loader(name, tiny_cifar, tmp_path):
    cfg = compose_config(tiny_overrides(tiny_cifar) + [f"model={name}", *TINY[name], "privacy.epsilon=8",
                                                       "trainer.checkpoint_every=1"])
    result = run(cfg, tmp_path)
    assert result["status"] == "completed"
    assert result["private"] is True and result["model"] == name
    assert result["steps"] == 8  # ceil(500 / 64) Poisson steps in one epoch
    assert 0 < result["epsilon"] <= 8.0
    # The whole test set was evaluated, with the weights the run released.
    loss, accuracy = reevaluate(cfg, tmp_path)
    assert result["num_test"] == 200 and result["test_accuracy"] == accuracy
    assert result["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_full_size_model_is_dp_compatible(name):
    """The full-size builds (what users train) pass Opacus's validator and take one
    per-example-gradient step: the in-place and BatchNorm traps are caught here."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, _ = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                                       poisson_sampling=False)
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 2
               for p in model.parameters() if p.requires_grad)
    optimizer.step()


def test_model_sizes_match_the_architectures():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 11.0e6 < count(create_model("resnet18")) < 11.3e6
    assert 6.9e6 < count(create_model("densenet121")) < 7.1e6
    assert 4.0e6 < count(create_model("efficientnet")) < 4.1e6


def test_vit_token_embedding_matches_timm_and_needs_no_functorch():
    """The class token and position embedding moved into TokenEmbedding: timm's outputs
    with timm's weights, and per-example gradients from their own rule, equal to an
    explicit per-example backward pass."""
    from opacus import GradSampleModule
    from timm.models.vision_transformer import VisionTransformer

    from dp_sweeps.models.vit import DPVisionTransformer, TokenEmbedding

    settings = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    timm_model = VisionTransformer(**settings)
    ours = DPVisionTransformer(**settings)
    renamed = {("token_embed." + k if k in ("cls_token", "pos_embed") else k): v
               for k, v in timm_model.state_dict().items()}
    ours.load_state_dict(renamed)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), timm_model(x))
    assert list(ours.parameters(recurse=False)) == []  # nothing left for a whole-model functorch pass
    assert TokenEmbedding in GradSampleModule.GRAD_SAMPLERS
    wrapped = GradSampleModule(ours, loss_reduction="sum")
    wrapped(x).sum().backward()
    for i in range(4):
        expected = torch.autograd.grad(timm_model(x[i:i + 1]).sum(), [timm_model.cls_token, timm_model.pos_embed])
        torch.testing.assert_close(ours.token_embed.cls_token.grad_sample[i], expected[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours.token_embed.pos_embed.grad_sample[i], expected[1], rtol=1e-4, atol=1e-6)

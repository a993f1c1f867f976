"""DP fine-tuning of timm backbones (model=timm, model=timm_probe, dp_sweeps.pretrain).

All offline: a tiny timm model's weights, saved here, are the "pretrained" weights
(``model.checkpoint``); the hub is patched to offline mode with an empty cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
import torch.nn as nn

from dp_sweeps.data.features import compute_features
from dp_sweeps.errors import ConfigError
from dp_sweeps.models import create_model
from dp_sweeps.models.frozen_batchnorm import (
    ChannelAffine,
    FixedStatsBatchNorm,
    convert_batchnorm,
    guard_batch_statistics,
    refuse_batch_statistics,
)
from dp_sweeps.models.trainable import refuse_unsupported_layers, select_trainable
from dp_sweeps.privacy import PrivacyPlan, make_private
from tests.helpers.runs import cli_in_process, compose_config, tiny_overrides

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """No test may reach the network: the hub in offline mode, with an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _save_weights(arch: str, path, *, seed: int = 0, num_classes: int = 7):
    """A tiny timm model's weights, saved as a timm state dict (its BatchNorm statistics
    made non-trivial, as pretrained ones are)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=num_classes)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), path)
    return model.state_dict()


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pth"
    return path, _save_weights("test_resnet", path)


def _build(path, **kwargs) -> nn.Module:
    kwargs.setdefault("input_size", 32)
    return create_model("timm", num_classes=3, arch="test_resnet", checkpoint=str(path), **kwargs)


def test_local_checkpoint_is_loaded_as_pretrained_weights(tmp_path):
    path = tmp_path / "vit.pth"
    saved = _save_weights("test_vit", path)
    model = create_model("timm", num_classes=3, arch="test_vit", checkpoint=str(path), input_size=32)
    loaded = model.backbone.state_dict()
    for key, value in saved.items():
        if key.startswith("head."):
            continue
        if key == "pos_embed":  # resampled by timm from the pretrained 10x10 grid to 32 px / 16 = 2x2
            assert loaded[key].shape[1] == 1 + 2 * 2
            continue
        assert torch.equal(loaded[key], value), key
    assert model.backbone.get_classifier().out_features == 3  # a fresh head for the data's classes


def test_checkpoint_weights_and_statistics_survive_batchnorm_freezing(resnet_weights):
    path, saved = resnet_weights
    model = _build(path, batchnorm="frozen_stats")
    bn = model.backbone.bn1
    assert isinstance(bn, FixedStatsBatchNorm)
    assert torch.equal(bn[0].running_mean, saved["bn1.running_mean"])
    assert torch.equal(bn[1].weight, saved["bn1.weight"])
    assert torch.equal(model.backbone.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])


def test_input_adapter_maps_data_normalisation_to_the_models():
    model = create_model("timm", num_classes=3, arch="test_efficientnet", input_size=40)
    adapter = model.adapter
    pixels = torch.rand(2, 3, 32, 32)
    data_mean, data_std = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    config = timm.data.resolve_model_data_config(model.backbone)
    model_mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    model_std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    expected = (nn.functional.interpolate(pixels, size=(40, 40), mode="bilinear") - model_mean) / model_std
    torch.testing.assert_close(adapter((pixels - data_mean) / data_std), expected)
    assert not list(adapter.parameters()) and not adapter.state_dict()  # parameter-free


@pytest.mark.parametrize("trainable, kwargs, expect", [
    ("head", {}, lambda n: n.startswith("backbone.fc.")),
    ("bias_and_head", {}, lambda n: n.startswith("backbone.fc.") or n.endswith(".bias")),
    ("norm_and_head", {}, None),  # the affine parts of the frozen-statistics BatchNorms: checked below
    ("last_blocks", {"trainable_blocks": 1}, lambda n: n.startswith(("backbone.fc.", "backbone.layer4."))),
    ("all", {}, lambda n: True),
])
def test_trainable_selects_exactly_its_parameters(resnet_weights, trainable, kwargs, expect):
    model = _build(resnet_weights[0], trainable=trainable, **kwargs)
    chosen = {n for n, p in model.named_parameters() if p.requires_grad}
    if expect is None:
        affine = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, ChannelAffine)
                  for p in ("weight", "bias")}
        expect = (lambda n: n.startswith("backbone.fc.") or n in affine)
    assert chosen == {n for n, _ in model.named_parameters() if expect(n)}


def test_fixed_statistics_never_change_and_ignore_train_mode(resnet_weights):
    model = _build(resnet_weights[0], batchnorm="frozen_stats")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    eval_out = model(x)
    model.train()
    train_out = model(x * 1.0)
    model(torch.randn(8, 3, 32, 32) * 5)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for key, value in model.state_dict().items():
        if "running" in key:
            assert torch.equal(value, before[key]), key


def _plan() -> PrivacyPlan:
    return PrivacyPlan(private=True, accountant="rdp", delta=1e-5, max_grad_norm=0.05, noise_multiplier=0.0,
                       sample_rate=1.0, steps_per_epoch=1, steps=1, target_epsilon=None, planned_epsilon=None,
                       poisson_sampling=True)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("trainable", ["bias_and_head", "last_blocks"])
def test_per_example_gradients_only_for_trainable_parameters(resnet_weights, trainable, mode):
    """The clipped sum from Opacus (σ = 0) equals an explicit per-example autograd loop
    over the trainable subset; frozen parameters get neither per-example nor summed gradients."""
    torch.manual_seed(1)
    model = _build(resnet_weights[0], trainable=trainable)
    reference = copy.deepcopy(model)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 3, (6,))
    clip = 0.05  # below every per-example norm here: every example is clipped
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters() if p.requires_grad}
    for i in range(len(y)):
        grads = torch.autograd.grad(nn.functional.cross_entropy(reference(x[i:i + 1]), y[i:i + 1]),
                                    [p for p in reference.parameters() if p.requires_grad])
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        assert norm > clip
        for name, g in zip(expected, grads):
            expected[name] += g * (clip / (norm + 1e-6)).clamp(max=1.0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _, module, optimizer, criterion, _ = make_private(
        plan=_plan(), module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), num_samples=6,
        grad_sample_mode=mode, noise_generator=torch.Generator(), sampler_generator=torch.Generator())
    criterion(module(x), y).backward()
    optimizer.pre_step()
    for name, p in model.named_parameters():
        if name in trainable_names:
            torch.testing.assert_close(p.grad, expected[name] / len(y), rtol=1e-4, atol=1e-7)
        else:
            assert p.grad is None and getattr(p, "grad_sample", None) is None, name


def test_batch_statistics_are_refused_before_a_private_run_and_guarded(resnet_weights):
    model = _build(resnet_weights[0], batchnorm="batch_stats")
    with pytest.raises(ConfigError, match=r"'backbone.conv1.1' \(BatchNorm2d\).*model.batchnorm=frozen_stats"):
        refuse_batch_statistics(model)
    with pytest.raises(ConfigError, match=r"model layer 'backbone.conv1.1' \(BatchNorm2d\) is not supported"):
        refuse_unsupported_layers(model)
    guard_batch_statistics(model)
    model.train()
    with pytest.raises(RuntimeError, match="BatchNorm2d ran in train mode during DP training"):
        model(torch.randn(2, 3, 32, 32))
    model.eval()
    model(torch.randn(2, 3, 32, 32))  # eval mode (fixed statistics) is allowed


def test_group_norm_swap_keeps_the_affine_parameters(resnet_weights):
    model = _build(resnet_weights[0], batchnorm="group_norm")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn = model.backbone.bn1[0]
    assert isinstance(gn, nn.GroupNorm) and torch.equal(gn.weight, resnet_weights[1]["bn1.weight"])


def test_unsupported_trainable_layer_is_named(resnet_weights):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match=r"model layer '1' \(BatchNorm1d\) is not supported"):
        refuse_unsupported_layers(model)
    model[1].requires_grad_(False)
    refuse_unsupported_layers(model)  # frozen: no per-example gradient needed
    # torch's ExpandedWeights has no rule for the frozen-statistics BatchNorm's affine part
    timm_model = _build(resnet_weights[0], trainable="bias_and_head")
    with pytest.raises(ConfigError, match=r"model layer 'backbone.conv1.1.1' \(ChannelAffine\) .*grad_sample_mode=ew"):
        refuse_unsupported_layers(timm_model, grad_sample_mode="ew")
    refuse_unsupported_layers(timm_model, grad_sample_mode="hooks")


class _InPlaceAfterLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        y += 1  # in place on a hooked layer's output: Opacus's hooks engine cannot handle it
        return y


def test_probe_names_the_layer_that_breaks_the_per_example_engine():
    from dp_sweeps.models.timm_backbone import probe_per_example_engine

    model = nn.Sequential(nn.Flatten(), _InPlaceAfterLinear())
    with pytest.raises(ConfigError, match=r"^model layer '1' \(_InPlaceAfterLinear\) fails under the per-example "
                                          r"gradient engine: RuntimeError: Output 0 of BackwardHookFunction"):
        probe_per_example_engine(model, input_shape=(4,))
    probe_per_example_engine(nn.Sequential(nn.Flatten(), nn.Linear(4, 4)), input_shape=(4,))  # a sound model passes
    assert not hasattr(model[1].linear.weight, "grad_sample")  # the probe ran on a copy


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "resnet_does_not_exist"}, r"model.arch='resnet_does_not_exist' is not a timm model"),
    ({"arch": "test_resnet", "checkpoint": "/nonexistent/w.pth"},
     r"model.checkpoint='/nonexistent/w.pth' is not a file"),
    ({"arch": "test_resnet", "pretrained": True}, r"model.pretrained=true: timm could not fetch the weights of "
                                                  r"'test_resnet' \(no cached copy and no network"),
    ({"arch": "test_resnet", "trainable": "everything"}, r"model.trainable='everything' is not one of"),
    ({"arch": "test_resnet", "trainable": "last_blocks", "trainable_blocks": 9}, r"model.trainable_blocks=9"),
    ({"arch": "test_resnet", "batchnorm": "sync"}, r"model.batchnorm='sync' is not one of"),
])
def test_bad_input_is_one_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        create_model("timm", num_classes=3, input_size=32, **kwargs)
    assert "\n" not in str(err.value)


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    path = tmp_path / "vit.pth"
    _save_weights("test_vit", path)
    with pytest.raises(ConfigError, match=r"model.checkpoint='.*vit.pth' does not match model.arch='test_resnet'"):
        create_model("timm", num_classes=3, arch="test_resnet", checkpoint=str(path))
    path = tmp_path / "resnet10t.pth"  # same family, other shapes
    _save_weights("test_convnext", path)
    with pytest.raises(ConfigError, match="does not match model.arch='test_convnext2'"):
        create_model("timm", num_classes=3, arch="test_convnext2", checkpoint=str(path))


def test_a_selection_without_parameters_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="model.trainable='head' leaves no trainable parameter"):
        select_trainable(model, trainable="head", head=[])


def test_convert_batchnorm_act_keeps_values():
    """timm's BatchNormAct2d (EfficientNet) becomes FixedStatsBatchNorm + its activation: same outputs."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    convert_batchnorm(model, mode="frozen_stats")
    torch.testing.assert_close(model.train()(x), expected, rtol=1e-5, atol=1e-5)


def _features(path, x, cache):
    from dp_sweeps.data.facts import DataFacts

    facts = DataFacts(name="cifar10", channels=3, image_size=32, num_classes=10, hflip_preserves_label=True,
                      mean=CIFAR_MEAN, std=CIFAR_STD)
    settings = dict(arch="test_vit", pretrained=False, checkpoint=str(path), input_size=32, channels=3, chunk=64)
    return compute_features("backbone", x, settings, cache_dir=cache, data_facts=facts)


def test_feature_cache_is_reused_and_invalidated_when_the_weights_change(tmp_path, monkeypatch):
    from dp_sweeps.data import features as feature_maps

    path, cache = tmp_path / "vit.pth", tmp_path / "cache"
    _save_weights("test_vit", path, seed=0)
    x = torch.randn(5, 3, 32, 32)
    first = _features(path, x, cache)
    assert first.shape == (5, timm.create_model("test_vit").num_features)
    files = set(cache.iterdir())
    assert len(files) == 1
    def recompute(x, *, data_facts=None, **settings):
        pytest.fail("features recomputed")

    with monkeypatch.context() as patch:  # a cache hit must not run the backbone again
        patch.setitem(feature_maps._FEATURE_MAPS, "backbone", recompute)
        again = _features(path, x, cache)
    assert torch.equal(again, first) and set(cache.iterdir()) == files
    _save_weights("test_vit", path, seed=1)  # new weights under the same path
    changed = _features(path, x, cache)
    assert len(set(cache.iterdir())) == 2
    assert not torch.allclose(changed, first)


@pytest.mark.slow
def test_dp_finetune_leaves_frozen_parameters_bit_identical(tiny_cifar, resnet_weights, tmp_path):
    """A real private run (bias_and_head, frozen BatchNorm statistics): every frozen tensor
    and statistic is bit-identical afterwards, the trainable ones moved, and result.json
    records both parameter counts."""
    from dp_sweeps.run import build_model, load_data
    from dp_sweeps.training.network import train_network

    path, _ = resnet_weights
    cfg = compose_config(tiny_overrides(tiny_cifar) + [
        "model=timm", "model.arch=test_resnet", f"model.checkpoint={path}", "model.trainable=bias_and_head",
        "model.input_size=32", "privacy.accountant=rdp", "privacy.epsilon=8", "trainer.epochs=2"])
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.facts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = train_network(cfg, model=model, data=data, device=torch.device("cpu"), output_dir=tmp_path / "run")
    assert result["status"] == "completed" and result["private"] and result["epsilon"] <= 8.0
    assert result["trainable_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["trainable_parameters"] < result["parameters"]
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= trainable
    assert any("running_mean" in k for k in before)  # the statistics were there, and unchanged


@pytest.mark.slow
def test_pretrain_then_probe_and_finetune_end_to_end(tiny_cifar, tmp_path):
    """dp_sweeps.pretrain on classes 0-4 writes a timm checkpoint; model=timm_probe and
    model=timm fine-tune from it under DP on classes 5-9 (the proxy's pipeline, tiny)."""
    from dp_sweeps.pretrain import main as pretrain_main
    from dp_sweeps.run import run

    tiny = tiny_overrides(tiny_cifar)
    out = tmp_path / "backbone.pth"
    pretrain_main(["--out", str(out), *tiny, "model.arch=test_vit", "model.input_size=32",
                   "data.classes=[0,1,2,3,4]", "trainer.epochs=1"])
    pretrained = json.loads((tmp_path / "backbone.pth.run" / "result.json").read_text())
    assert pretrained["private"] is False and pretrained["num_classes"] == 5
    common = [*tiny, "model.arch=test_vit", f"model.checkpoint={out}", "model.input_size=32",
              "data.classes=[5,6,7,8,9]", "privacy.accountant=rdp", "privacy.epsilon=3",
              f"data.feature_cache={tmp_path / 'cache'}"]
    probe = run(compose_config(["model=timm_probe", *common]), tmp_path / "probe")
    assert probe["status"] == "completed" and probe["trainable_parameters"] == probe["parameters"] == 64 * 5 + 5
    assert any((tmp_path / "cache").iterdir())
    full = run(compose_config(["model=timm", "model.trainable=all", *common]), tmp_path / "full")
    assert full["status"] == "completed" and full["trainable_parameters"] == full["parameters"] > 300_000
    assert full["epsilon"] <= 3.0 and json.loads((tmp_path / "full" / "result.json").read_text())["model"] == "timm"



@pytest.mark.slow
def test_cli_refuses_a_bad_arch_in_one_line_before_training(tiny_cifar, tmp_path, capsys):
    out = tmp_path / "out"
    proc = cli_in_process(["model=timm", "model.arch=resnet5O", *tiny_overrides(tiny_cifar),
                           f"paths.output_dir={out}"], capsys)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "model.arch='resnet5O' is not a timm model (similar: resnet50" in last
    assert not list(out.rglob("result.json"))


@pytest.mark.parametrize("experiment", ["finetune_vit_b16_probe", "finetune_resnet50_bitfit",
                                        "finetune_resnet50_full", "finetune_proxy"])
def test_finetune_experiments_compose_to_builder_settings(experiment):
    import inspect

    from dp_sweeps.models._registry import _MODEL_REGISTRY

    cfg = compose_config([f"experiment={experiment}", "model.checkpoint=/x.pth"])
    settings = {k for k in cfg.model if k != "name"}
    assert settings <= set(inspect.signature(_MODEL_REGISTRY[cfg.model.name]).parameters)
    assert cfg.privacy.enabled and cfg.experiment_name == experiment
    if cfg.model.name == "timm_probe":
        assert cfg.features.name == "backbone" and cfg.features.arch == cfg.model.arch
    else:
        assert cfg.model.batchnorm == "frozen_stats"  # explicit in every fine-tuning experiment

"""Any timm model as a (pretrained) backbone for DP fine-tuning: ``model=timm``.

The builder :func:`timm` creates ``model.arch`` through ``timm.create_model``:

- weights: ``model.pretrained=true`` fetches them through timm (the Hugging Face hub
  cache); ``model.checkpoint=<file>`` loads a local file through timm's own mechanism
  (``pretrained_cfg_overlay=dict(file=...)``: the arch's checkpoint filter, input-conv
  adaptation for another channel count, and head removal all apply);
- the classifier is always a fresh one for the data's class count (``reset_classifier``);
- BatchNorm is handled as ``model.batchnorm`` says (:mod:`dp_sweeps.models.frozen_batchnorm`);
- parameters outside ``model.trainable`` are frozen (:mod:`dp_sweeps.models.trainable`);
- in-place activations are turned off (Opacus's hooks forbid them on hooked outputs).

Preprocessing is inside the model, as :class:`PretrainedInputAdapter`: the data arrive
normalised with *the data set's* public mean/std at its own resolution; the adapter undoes
that, resizes to the model's pretrained resolution and normalises with the pretrained
mean/std (timm's ``resolve_model_data_config``: public constants). It has no parameter,
so it changes nothing in the mechanism, and the loop, the data pipeline, augmentation and
the feature cache stay unchanged for every model. ``model.input_size`` overrides the
resolution (e.g. 32 to keep CIFAR's size on a CPU).

Bad input is refused before training with one line (:class:`~dp_sweeps.errors.ConfigError`):
an unknown arch, a missing checkpoint or one that does not match the arch, pretrained
weights that cannot be fetched (no cache, no network), or a ``trainable`` choice that
leaves no parameter, a layer that breaks the per-example engine in a probe pass
(:func:`probe_per_example_engine`); before a private run, a trainable layer Opacus's
validators reject (:func:`dp_sweeps.models.trainable.refuse_unsupported_layers`).
"""

from __future__ import annotations

import copy
import difflib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import timm as timm_lib
import torch
import torch.nn as nn
import torch.nn.functional as F

from dp_sweeps.errors import ConfigError
from dp_sweeps.models._registry import disable_inplace, register_model
from dp_sweeps.models.frozen_batchnorm import convert_batchnorm
from dp_sweeps.models.trainable import select_trainable, timm_blocks

log = logging.getLogger(__name__)


class PretrainedInputAdapter(nn.Module):
    """Map images normalised with the data's ``(data_mean, data_std)`` to images at
    ``size`` normalised with the model's ``(model_mean, model_std)``. Parameter-free: a
    fixed per-example function (bilinear resize), so it costs no privacy."""

    def __init__(self, *, data_mean: Sequence[float], data_std: Sequence[float], model_mean: Sequence[float],
                 model_std: Sequence[float], size: Optional[tuple[int, int]]):
        super().__init__()
        # Non-persistent buffers: they follow .to(device) and stay out of the state dict.
        for name, value in (("data_mean", data_mean), ("data_std", data_std),
                            ("model_mean", model_mean), ("model_std", model_std)):
            self.register_buffer(name, torch.tensor(list(value), dtype=torch.float32).view(1, -1, 1, 1),
                                 persistent=False)
        self.size = tuple(size) if size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.data_std.to(x.dtype) + self.data_mean.to(x.dtype)  # back to [0, 1] pixels
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.model_mean.to(x.dtype)) / self.model_std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class PretrainedClassifier(nn.Module):
    """``backbone(adapter(x))``: a timm model behind its input adapter."""

    def __init__(self, adapter: nn.Module, backbone: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.adapter(x))


def _data_normalisation(data_facts: Any, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The data's public normalisation constants (its DataFacts; CIFAR-10's otherwise)."""
    if data_facts is not None and getattr(data_facts, "mean", None) is not None:
        return tuple(data_facts.mean), tuple(data_facts.std)
    from dp_sweeps.data import CIFAR10_MEAN, CIFAR10_STD

    if in_channels != len(CIFAR10_MEAN):
        raise ConfigError(f"model=timm needs the data's normalisation constants for {in_channels}-channel images")
    return tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)


def _check_arch(arch: Any) -> str:
    if not isinstance(arch, str) or not arch:
        raise ConfigError(f"model.arch={arch!r} must be a timm model name, e.g. resnet50.a1_in1k")
    base, _ = timm_lib.models.split_model_name_tag(arch)
    if not timm_lib.is_model(base):
        close = difflib.get_close_matches(base, timm_lib.list_models(), n=3)
        raise ConfigError(f"model.arch={arch!r} is not a timm model"
                          + (f" (similar: {', '.join(close)})" if close else ""))
    return arch


def create_backbone(*, arch: str, num_classes: int, in_channels: int = 3, pretrained: bool = False,
                    checkpoint: Optional[str] = None, img_size: Optional[int] = None) -> nn.Module:
    """``timm.create_model`` with its failures turned into one-line ConfigErrors; the
    classifier is a fresh one for ``num_classes`` (0: none, the pooled features)."""
    arch = _check_arch(arch)
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if checkpoint is not None:
        path = Path(str(checkpoint)).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.checkpoint={checkpoint!r} is not a file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif pretrained:
        kwargs["pretrained"] = True
    try:
        model = timm_lib.create_model(arch, **kwargs)
    except (RuntimeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if checkpoint is not None:
            raise ConfigError(f"model.checkpoint={str(checkpoint)!r} does not match model.arch={arch!r}: "
                              f"{first[:300]}") from err
        raise ConfigError(f"model.arch={arch!r}: {first[:300]}") from err
    except (OSError, ValueError) as err:  # huggingface_hub's offline / not-cached errors are OSErrors
        if pretrained and checkpoint is None:
            raise ConfigError(f"model.pretrained=true: timm could not fetch the weights of {arch!r} (no cached "
                              f"copy and no network: {type(err).__name__}); download them once or set "
                              f"model.checkpoint=<file>") from err
        raise ConfigError(f"model.arch={arch!r}: {str(err).splitlines()[0][:300]}") from err
    except TypeError as err:  # a keyword the arch does not take (e.g. img_size)
        raise ConfigError(f"model.arch={arch!r}: {str(err).splitlines()[0]}") from err
    if checkpoint is not None:
        _check_checkpoint_covers(model, Path(str(checkpoint)).expanduser(), arch=arch)
    model.reset_classifier(num_classes)  # a fresh head whatever the checkpoint held
    return model


def _check_checkpoint_covers(model: nn.Module, path: Path, *, arch: str) -> None:
    """timm loads non-strictly when it drops the pretrained head, so a checkpoint of
    another arch could load partly: refuse one that leaves a backbone tensor unset."""
    state = timm_lib.models.load_state_dict(str(path))
    head = {name for name, _ in model.get_classifier().named_parameters(prefix=_classifier_prefix(model))}
    missing = [k for k in model.state_dict() if k not in state and k not in head
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise ConfigError(f"model.checkpoint={str(path)!r} does not match model.arch={arch!r}: "
                          f"{len(missing)} tensors missing, e.g. {missing[0]!r}")


def _classifier_prefix(model: nn.Module) -> str:
    classifier = model.get_classifier()
    for name, module in model.named_modules():
        if module is classifier:
            return name
    return ""


def head_parameter_names(model: nn.Module, *, prefix: str = "") -> list[str]:
    """Names (under ``prefix``) of the classifier's parameters of a timm model."""
    head = _classifier_prefix(model)
    return [f"{prefix}{head}.{n}" if head else f"{prefix}{n}" for n, _ in model.get_classifier().named_parameters()]


def probe_per_example_engine(model: nn.Module, *, input_shape: tuple[int, ...]) -> None:
    """Refuse, naming it, a layer that breaks Opacus's hooks engine (e.g. an in-place op on
    a hooked layer's output): one per-example forward and backward pass of two zero images
    (data-independent) through a copy of ``model`` wrapped by Opacus. The layer named is
    the innermost module whose forward (or whose rule) was running when it failed."""
    from opacus.grad_sample import GradSampleModule

    from dp_sweeps import grad_sample

    grad_sample.install()  # our rules, as make_private installs them
    probe = copy.deepcopy(model)
    names = {m: name for name, m in probe.named_modules()}
    running: list[nn.Module] = []

    def enter(module: nn.Module, _inputs) -> None:
        running.append(module)

    def leave(_module: nn.Module, _inputs, _output) -> None:  # returns None: the output is kept
        running.pop()

    hooks = [m.register_forward_pre_hook(enter) for m in probe.modules()]
    hooks += [m.register_forward_hook(leave) for m in probe.modules()]
    try:
        wrapped = GradSampleModule(probe, strict=False)
        wrapped(torch.zeros(2, *input_shape)).square().sum().backward()
    except Exception as err:  # any failure here would be the first private step's
        where = running[-1] if running else None
        layer = f"model layer {names.get(where, '')!r} ({type(where).__name__})" if where is not None else "the model"
        raise ConfigError(f"{layer} fails under the per-example gradient engine: "
                          f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}") from err
    finally:
        for hook in hooks:
            hook.remove()


@register_model
def timm(*, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, data_facts: Any = None,
         arch: str = "resnet18", pretrained: bool = False, checkpoint: Optional[str] = None,
         trainable: str = "all", trainable_blocks: int = 1, batchnorm: str = "frozen_stats",
         input_size: Optional[int] = None) -> nn.Module:
    """A timm model (``arch``) with pretrained weights, a fresh head for ``num_classes``,
    BatchNorm per ``batchnorm``, only ``trainable`` parameters trainable, and inputs mapped
    to its pretrained resolution (or ``input_size``) and normalisation."""
    if data_facts is not None:
        in_channels = getattr(data_facts, "channels", in_channels)
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or input_size < 8):
        raise ConfigError(f"model.input_size={input_size!r} must be null or an integer >= 8")
    cfg = timm_lib.models.get_pretrained_cfg(_check_arch(arch))
    # Fixed-size models (ViTs) are built for the target size; timm resamples their position embedding.
    img_size = input_size if input_size is not None and cfg is not None and cfg.fixed_input_size else None
    backbone = create_backbone(arch=arch, num_classes=num_classes, in_channels=in_channels, pretrained=pretrained,
                               checkpoint=checkpoint, img_size=img_size)
    data_config = timm_lib.data.resolve_model_data_config(backbone)
    size = (input_size, input_size) if input_size is not None else tuple(data_config["input_size"][-2:])
    model_mean, model_std = data_config["mean"], data_config["std"]
    if len(model_mean) != in_channels:  # e.g. a 3-channel pretrained config adapted to grey input
        model_mean = (sum(model_mean) / len(model_mean),) * in_channels
        model_std = (sum(model_std) / len(model_std),) * in_channels
    data_mean, data_std = _data_normalisation(data_facts, in_channels)
    convert_batchnorm(backbone, mode=batchnorm)
    disable_inplace(backbone)
    head = head_parameter_names(backbone, prefix="backbone.")
    model = PretrainedClassifier(PretrainedInputAdapter(data_mean=data_mean, data_std=data_std,
                                                        model_mean=model_mean, model_std=model_std, size=size),
                                 backbone)
    select_trainable(model, trainable=trainable, head=head, trainable_blocks=trainable_blocks,
                     blocks=timm_blocks(backbone, prefix="backbone."))
    if batchnorm != "batch_stats":  # batch statistics: non-private only, no per-example engine
        probe_per_example_engine(model, input_shape=(in_channels, image_size, image_size))
    return model


@register_model
def timm_probe(*, num_classes: int = 10, arch: str = "resnet18", in_channels: int = 3, image_size: int = 32,
               pretrained: bool = False, checkpoint: Optional[str] = None, input_size: Optional[int] = None
               ) -> nn.Module:
    """The linear head of a frozen ``arch`` (``model=timm_probe``): reads the pooled
    features that the ``backbone`` feature map computed once and cached
    (:mod:`dp_sweeps.data.features.backbone`); only this layer trains under DP.
    ``pretrained``, ``checkpoint`` and ``input_size`` are the feature map's (conf/features/backbone.yaml
    reads them from here); ``in_channels`` and ``image_size`` are the images'."""
    with torch.device("meta"):  # the feature width only: no weights are built
        width = timm_lib.create_model(_check_arch(arch), num_classes=0).num_features
    return nn.Linear(width, num_classes)

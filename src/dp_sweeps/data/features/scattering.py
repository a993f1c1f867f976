"""The wavelet scattering transform of Tramèr & Boneh 2021 (ScatterNet features).

A scattering network (Oyallon & Mallat 2015) is a fixed cascade of Morlet wavelet
convolutions, moduli and a low-pass average: no weight is learned, and each output is
a function of one image only, so computing it costs no privacy. With ``J=2`` and
``L=8`` on a 32x32 image it gives, per colour channel, 1 + J·L + L²·J(J-1)/2 = 81
maps of 8x8 (orders 0, 1 and 2), i.e. 3·81 = 243 channels for CIFAR-10: exactly the
input of Tramèr & Boneh's ScatterNet+linear and ScatterNet+CNN models
(:mod:`dp_sweeps.models.scatter`).

Implementation: kymatio's ``Scattering2D`` (torch backend), the library the paper
used, applied in batches by :func:`dp_sweeps.data.features.compute_features`, which also
caches the result on disk. kymatio (the ``scatter`` extra) is imported, and the SciPy
shim that kymatio 0.3.0 needs (:mod:`dp_sweeps.compat.scipy_special`) installed before
it, only when :func:`scattering_module` builds the transform, never at import.

Channel order: colour-major (channel ``c * 81 + k`` is path ``k`` of colour ``c``),
as in the paper's code, so GroupNorm groups of 9 never mix colours.
"""

from __future__ import annotations

import functools

import torch

from dp_sweeps.data.features import register_feature_map
from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import extra


def num_scattering_paths(J: int, L: int, max_order: int = 2) -> int:
    """Paths per input channel: 1 (order 0) + J·L (order 1) + L²·J(J-1)/2 (order 2)."""
    paths = 1 + J * L
    if max_order >= 2:
        paths += L * L * J * (J - 1) // 2
    return paths


def _check_settings(J, L, max_order) -> None:
    for key, value, low in (("J", J, 1), ("L", L, 1), ("max_order", max_order, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"model.features.{key}={value!r} must be an integer >= {low}")
    if max_order > 2:
        raise ConfigError(f"model.features.max_order={max_order!r} must be 1 or 2")


@functools.lru_cache(maxsize=4)
def scattering_module(J: int, L: int, max_order: int, height: int, width: int) -> torch.nn.Module:
    """kymatio's Scattering2D for ``height`` x ``width`` images (filters built once)."""
    from dp_sweeps.compat.scipy_special import install

    install()  # kymatio 0.3.0 imports scipy.special.sph_harm, gone in SciPy 1.17 (idempotent)
    with extra("scatter", what="features=scattering"):
        from kymatio.torch import Scattering2D

    return Scattering2D(J=J, shape=(height, width), L=L, max_order=max_order)


@register_feature_map("scattering")
def scattering(x: torch.Tensor, *, J: int = 2, L: int = 8, max_order: int = 2) -> torch.Tensor:
    """ScatterNet features of images ``x`` (N x C x H x W) -> N x (C·paths) x H/2^J x W/2^J.

    CIFAR-10 with the defaults: N x 243 x 8 x 8 (float32). Deterministic; computed on
    ``x``'s device.
    """
    _check_settings(J, L, max_order)
    if x.dim() != 4:
        raise ConfigError(f"model.features.name='scattering' needs images N x C x H x W, got shape {tuple(x.shape)}")
    n, channels, height, width = x.shape
    if height % 2**J or width % 2**J:
        raise ConfigError(f"model.features.J={J}: image size {height}x{width} is not divisible by 2^J")
    module = scattering_module(J, L, max_order, height, width).to(x.device)
    paths = num_scattering_paths(J, L, max_order)
    if n == 0:
        return x.new_zeros((0, channels * paths, height // 2**J, width // 2**J))
    with torch.no_grad():
        out = module(x.float().contiguous())  # N x C x paths x H' x W'
    return out.reshape(n, channels * paths, *out.shape[-2:]).contiguous()

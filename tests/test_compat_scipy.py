"""The ``scipy.special.sph_harm`` shim: the old argument order and angle convention,
checked against closed forms, installed only when SciPy lacks the name."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special

from dp_sweeps.compat import scipy_special

# Angles chosen so that swapping azimuth and polar angle changes every value below.
# kymatio passes azimuths from arctan2, in [-π, π].
AZIMUTHAL = np.array([-2.8, -0.7, 0.3, 1.1, 2.5])
POLAR = np.array([0.2, 0.9, 1.4, 2.2, 3.0])


def y10(azimuthal, polar):
    return 0.5 * np.sqrt(3 / np.pi) * np.cos(polar) + 0j * azimuthal


def y11(azimuthal, polar):
    # Condon-Shortley phase included, as in SciPy.
    return -0.5 * np.sqrt(3 / (2 * np.pi)) * np.sin(polar) * np.exp(1j * azimuthal)


def y2m2(azimuthal, polar):
    return 0.25 * np.sqrt(15 / (2 * np.pi)) * np.sin(polar) ** 2 * np.exp(-2j * azimuthal)


@pytest.mark.parametrize(("m", "n", "closed_form"), [(0, 1, y10), (1, 1, y11), (-2, 2, y2m2)])
def test_old_signature_matches_closed_forms(m, n, closed_form):
    """sph_harm(m, n, theta=azimuthal, phi=polar), the pre-1.17 convention kymatio calls."""
    got = scipy_special.sph_harm(m, n, AZIMUTHAL, POLAR)
    np.testing.assert_allclose(got, closed_form(AZIMUTHAL, POLAR), rtol=1e-12, atol=1e-14)
    # The swapped convention would give something else: the test can tell them apart.
    assert not np.allclose(got, closed_form(POLAR, AZIMUTHAL))


def test_broadcasts_and_accepts_integer_valued_floats():
    m = np.array([[0], [1]])
    got = scipy_special.sph_harm(m.astype(float), 1.0, AZIMUTHAL, POLAR)
    assert got.shape == (2, len(AZIMUTHAL))
    np.testing.assert_allclose(got[1], y11(AZIMUTHAL, POLAR), rtol=1e-12)
    with pytest.raises(ValueError, match="m must be integers"):
        scipy_special.sph_harm(0.5, 1, AZIMUTHAL, POLAR)


def test_install_adds_the_name_only_when_missing(monkeypatch):
    monkeypatch.delattr(scipy.special, "sph_harm", raising=False)
    assert scipy_special.install() is True
    assert scipy.special.sph_harm is scipy_special.sph_harm
    assert scipy_special.install() is True  # idempotent
    native = object()
    monkeypatch.setattr(scipy.special, "sph_harm", native, raising=False)
    assert scipy_special.install() is False
    assert scipy.special.sph_harm is native  # a SciPy that has its own is left alone


def test_kymatio_solid_harmonic_is_the_closed_form():
    """kymatio 0.3.0 imports with the shim, and its l=1 solid harmonics come out right:
    r Y_1^0 = -sqrt(3/4π) z in its angle convention (polar angle from the -z axis), and
    r Y_1^1 = -sqrt(3/8π) (x + i y); a swapped argument order gives neither."""
    scipy_special.install()
    from kymatio.scattering3d.filter_bank import solid_harmonic_3d

    size, sigma = 8, 1.5
    filters = solid_harmonic_3d(size, size, size, sigma, 1, fourier=False)  # m = -1, 0, 1
    grid = np.fft.ifftshift(np.mgrid[-size // 2:size // 2, -size // 2:size // 2, -size // 2:size // 2]
                            .astype("float32"), axes=(1, 2, 3))
    z, y, x = grid
    envelope = np.exp(-0.5 * (grid ** 2).sum(0) / sigma ** 2)
    for index, expected in ((1, -np.sqrt(3 / (4 * np.pi)) * z), (2, -np.sqrt(3 / (8 * np.pi)) * (x + 1j * y))):
        expected = expected * envelope
        ratio = filters[index][np.abs(expected) > 1e-3] / expected[np.abs(expected) > 1e-3]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # the same shape up to kymatio's norm
        assert np.isfinite(ratio[0]) and abs(ratio[0]) > 0

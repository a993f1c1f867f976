"""``scipy.special.sph_harm`` for SciPy >= 1.17, where it was removed.

kymatio 0.3.0 (the wavelet scattering library of Tramèr & Boneh 2021) does
``from scipy.special import sph_harm`` at import time, in its 3-D filter bank, so
``import kymatio.torch`` fails on current SciPy even for the 2-D transform. This
module restores the old name, only when it is missing, as a thin wrapper over its
replacement ``scipy.special.sph_harm_y``.

The two functions order and name their arguments differently (the classic trap):

* old: ``sph_harm(m, n, theta, phi)``: order m, degree n, **theta azimuthal**
  (in [0, 2π]), **phi polar** (in [0, π]);
* new: ``sph_harm_y(n, m, theta, phi)``: degree n, order m, **theta polar**,
  **phi azimuthal**.

So ``sph_harm(m, n, azimuthal, polar) == sph_harm_y(n, m, polar, azimuthal)``; both
include the Condon-Shortley phase. Tested against closed forms of Y_1^0 and Y_1^1.
"""

from __future__ import annotations

import numpy as np
import scipy.special


def _as_integer(name: str, value) -> np.ndarray:
    """The old ufunc took integer-valued floats too; the new one wants integers."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iu":
        return arr
    if not np.all(np.isfinite(arr)) or not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"sph_harm: {name} must be integers, got {value!r}")
    return arr.astype(np.int64)


def sph_harm(m, n, theta, phi):
    """SciPy < 1.17's ``sph_harm``: order ``m``, degree ``n``, ``theta`` azimuthal, ``phi`` polar."""
    return scipy.special.sph_harm_y(_as_integer("n", n), _as_integer("m", m), phi, theta)


def install() -> bool:
    """Put :func:`sph_harm` into ``scipy.special`` if (and only if) it is missing.

    Returns True when the shim was installed by this call or an earlier one, False
    when SciPy has its own ``sph_harm`` (older SciPy), which is then left alone.
    """
    existing = getattr(scipy.special, "sph_harm", None)
    if existing is sph_harm:
        return True
    if existing is not None:
        return False
    scipy.special.sph_harm = sph_harm
    return True

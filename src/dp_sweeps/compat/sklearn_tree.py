"""Restore ``sklearn.tree._tree.DOUBLE`` and ``DTYPE`` for diffprivlib 0.6.6.

Why: ``import diffprivlib`` imports ``diffprivlib.models.forest``, which does
``from sklearn.tree._tree import Tree, DOUBLE, DTYPE, NODE_DTYPE``. scikit-learn 1.9
stopped exporting ``DOUBLE`` and ``DTYPE`` from that (compiled) module, so the whole
package fails to import, Gaussian Naive Bayes included. Up to 1.8 they were plain
aliases: ``DTYPE = np.float32`` (the dtype of X in trees) and ``DOUBLE = np.float64``
(thresholds, values). This module puts back only the names that are missing, with
those values; on a scikit-learn that still has them it changes nothing.

Use :func:`import_diffprivlib` wherever diffprivlib is needed (dp_sweeps' classifiers go
through :func:`dp_sweeps.classical.import_diffprivlib`, which names the missing extra).
"""

from __future__ import annotations

import types
from typing import Optional

import numpy as np

# The values scikit-learn <= 1.8 exported (sklearn/tree/_tree.pyx).
MISSING_ALIASES = {"DTYPE": np.float32, "DOUBLE": np.float64}


def patch_sklearn_tree(module: Optional[types.ModuleType] = None) -> list[str]:
    """Add the aliases ``module`` (default ``sklearn.tree._tree``) lacks; returns the names added."""
    if module is None:
        import sklearn.tree._tree as module  # noqa: PLW0127 (a compiled module)
    added = []
    for name, dtype in MISSING_ALIASES.items():
        if not hasattr(module, name):
            setattr(module, name, dtype)
            added.append(name)
    return added


def import_diffprivlib() -> types.ModuleType:
    """``import diffprivlib``, after :func:`patch_sklearn_tree`."""
    patch_sklearn_tree()
    import diffprivlib

    return diffprivlib

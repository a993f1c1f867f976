"""The diffprivlib shim (dp_sweeps.compat.sklearn_tree): diffprivlib imports in a fresh
interpreter, only missing names are added, with scikit-learn <= 1.8's values."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np

from dp_sweeps.compat.sklearn_tree import MISSING_ALIASES, import_diffprivlib, patch_sklearn_tree


def test_diffprivlib_imports_and_fits_in_a_fresh_interpreter():
    code = ("from dp_sweeps.compat.sklearn_tree import import_diffprivlib\n"
            "import numpy as np\n"
            "dpl = import_diffprivlib()\n"
            "from diffprivlib.models import GaussianNB\n"
            "x = np.tile(np.array([[-1.0], [1.0]]), (100, 1)); y = np.tile([0, 1], 100)\n"
            "m = GaussianNB(epsilon=100.0, bounds=(-1.0, 1.0), random_state=0).fit(x, y)\n"
            "print(dpl.__version__, m.score(x, y))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    version, score = proc.stdout.split()
    assert version == "0.6.6" and float(score) == 1.0


def test_only_missing_names_are_added_with_the_old_values():
    module = types.ModuleType("fake_tree")
    module.DOUBLE = "kept"
    assert patch_sklearn_tree(module) == ["DTYPE"]
    assert module.DOUBLE == "kept" and module.DTYPE is np.float32
    assert patch_sklearn_tree(module) == []  # idempotent
    assert MISSING_ALIASES == {"DTYPE": np.float32, "DOUBLE": np.float64}


def test_the_real_module_has_the_aliases_after_import():
    import sklearn.tree._tree as tree

    import_diffprivlib()
    assert np.dtype(tree.DOUBLE) == np.float64 and np.dtype(tree.DTYPE) == np.float32

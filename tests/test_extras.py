"""Optional extras: the core imports none of them, and a missing one is refused with one
line naming it. Absence is simulated in a fresh interpreter (``sys.modules[name] = None``
makes ``import name`` fail as if it were not installed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

OPTIONAL = ("optuna", "sqlalchemy", "submitit", "psycopg2", "sklearn", "diffprivlib", "kymatio", "pandas",
            "matplotlib")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_plain_run_imports_no_extra():
    proc = _python("import sys, dp_sweeps.run, dp_sweeps.__main__\n"
                   f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("blocked,code,message", [
    ("diffprivlib", "from dp_sweeps.classical import load_classifier; load_classifier('knn')",
     "model=knn needs the 'classical' extra: pip install 'dp_sweeps[classical]'"),
    ("kymatio", "import torch; from dp_sweeps.data.features.scattering import scattering; "
                "scattering(torch.zeros(1, 3, 32, 32))",
     "features=scattering needs the 'scatter' extra: pip install 'dp_sweeps[scatter]'"),
    ("optuna", "import dp_sweeps.sweeps.search",
     "needs the 'search' extra: pip install 'dp_sweeps[search]'"),
])
def test_a_missing_extra_is_named_in_one_line(blocked, code, message):
    proc = _python(f"import sys; sys.modules[{blocked!r}] = None\n"
                   "from dp_sweeps.extras import MissingExtraError\n"
                   f"try:\n    {code}\nexcept MissingExtraError as err:\n    print('ERROR', err)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert message in line


def test_the_cli_names_the_missing_extra_before_hydra_starts(tmp_path):
    proc = _python("import sys; sys.modules['optuna'] = None\n"
                   "sys.argv = ['dp_sweeps', 'hparams_search=frontier', '-m']\n"
                   "from dp_sweeps.__main__ import main; main()")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "dp_sweeps: error: hparams_search=frontier needs the 'search' extra: pip install 'dp_sweeps[search]'")

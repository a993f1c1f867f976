"""Where the Hydra configs are: inside the installed package (a wheel ships ``conf/`` as
``dp_sweeps/conf``) or at the top of a source checkout (editable installs)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"dp_sweeps configs not found next to {_PACKAGE_DIR}")


CONFIG_DIR = config_dir()

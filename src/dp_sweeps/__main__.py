"""``python -m dp_sweeps [overrides] [-m]``: one run, or a sweep with ``-m``."""

import hydra

from dp_sweeps.paths import CONFIG_DIR
from dp_sweeps.run import task


# The search configs register dp_sweeps' resumable Optuna sweeper through this callback.
@hydra.main(config_path=str(CONFIG_DIR), config_name="config",
            execution_whitelist=["dp_sweeps.sweeps.search.RegisterSweeper"])
def _hydra_entry(cfg):
    return task(cfg)


def main() -> None:
    _hydra_entry()


if __name__ == "__main__":
    main()

"""``python -m dp_sweeps [overrides] [-m]``: one run, or a sweep with ``-m``."""

import sys

import hydra

from dp_sweeps.extras import MissingExtraError, check_command_line
from dp_sweeps.paths import CONFIG_DIR
from dp_sweeps.run import task


# The search configs register dp_sweeps' sweepers (the resumable Optuna one, private tuning)
# through these callbacks.
@hydra.main(config_path=str(CONFIG_DIR), config_name="config",
            execution_whitelist=["dp_sweeps.sweeps.search.RegisterSweeper",
                                 "dp_sweeps.sweeps.private_tuning.RegisterPrivateTuning",
                                 # conf/hydra/default.yaml: a sweep whose every job failed exits non-zero
                                 "dp_sweeps.sweeps.outcome.SweepOutcome"])
def _hydra_entry(cfg):
    return task(cfg)


def main() -> None:
    try:
        # A search or a launcher needs its extra before Hydra builds it (dp_sweeps.extras).
        check_command_line(sys.argv[1:])
    except MissingExtraError as err:
        raise SystemExit(f"dp_sweeps: error: {err}") from None
    _hydra_entry()


if __name__ == "__main__":
    main()

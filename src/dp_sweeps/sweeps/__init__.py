"""Sweep orchestration: the resumable Optuna sweeper and its storages (:mod:`.search`),
and the cluster launchers (:mod:`.launcher`). The per-run ε of a trial does not cover
the search itself (docs/sweeps.md)."""

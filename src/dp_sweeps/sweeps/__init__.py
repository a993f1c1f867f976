"""Sweep orchestration: the resumable Optuna sweeper and its storages (:mod:`.search`),
the cluster launchers (:mod:`.launcher`), and the private search (:mod:`.private_tuning`).
The per-run ε of a trial does not cover the search itself (docs/sweeps.md), except in a
private search, whose ``tuning_privacy.json`` states the whole search's ε
(docs/private_tuning.md)."""

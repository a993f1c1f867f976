"""The single run's training: the loop (:mod:`.loop`), a network's plan-train-record
(:mod:`.network`), evaluation, EMA, checkpoints, multi-process helpers and the records
(:mod:`.results`). The mechanism itself is :mod:`dp_sweeps.privacy`."""

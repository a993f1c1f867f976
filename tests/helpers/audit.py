"""Settings shared by tests/test_audit.py and tests/test_audit_mutation.py."""

from __future__ import annotations

# The convnet audit's settings (plan: q = 1/3, 3 steps): the honest path passes at them
# (test_audit.py) and the book-keeping mutation is caught at them (test_audit_mutation.py).
CONVNET_AUDIT = dict(target_epsilon=2.0, runs=1000, num_train=12, batch_size=4, epochs=1, seed=0, noise_seed=0)

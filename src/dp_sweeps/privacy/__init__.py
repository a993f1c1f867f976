"""Everything that changes ε: read this package to audit the mechanism.

Guarantee: a run trained with ``privacy.poisson_sampling=true`` and no
``privacy.noise_seed`` is (ε, δ)-DP with respect to adding or removing one training
example, where ε is what the configured accountant (PRV by default, or RDP) computes for
the noise multiplier σ, the sampling rate q and the DP-SGD steps actually taken, composed
after the Gaussian releases made before training (DP data normalisation). Each step
includes every example independently with probability q (empty batches included, on
every rank), clips each example's gradient to L2 norm C over all parameters, sums, and
adds N(0, σ²C²) noise once. The noise and the sampling coins are drawn from fresh OS
entropy, never from anything the run publishes. A run's ε does not cover hyperparameter
search; ``hparams_search=private_tuning`` accounts for a whole search (:mod:`.tuning`).
With ``privacy.mechanism=laplace`` each example's gradient is clipped to L1 norm C and
the sum gets Laplace(0, σC) noise per coordinate, accounted by dp_accounting's PLD.

- :mod:`.plan`: σ calibrated to the target ε; the plan of steps and sampling rate.
- :mod:`.accounting`: ε from the accountants, and the PRV/RDP/PLD/GDP cross-check.
- :mod:`.laplace`: the Laplace mechanism (L1 clipping, Laplace noise) and its PLD accountant.
- :mod:`.engine`: :func:`make_private` (Opacus, our sampler, our per-example code) and
  the choice of per-example gradient engine.
- :mod:`.sampling`: Poisson sampling with exactly the accountant's steps.
- :mod:`.randomness`: the secret streams (noise, sampling, releases).
- :mod:`.data_normalization`: the DP release of channel statistics, charged to ε.
- :mod:`.tuning`: the ε of a whole private search (Papernot & Steinke), the secret number
  of trials; :mod:`.noisy_score`: its trials' DP validation score.
- :mod:`.audit`, :mod:`.audit_stats`: empirical lower bounds on ε (``make audit``).
"""

from dp_sweeps.privacy.accounting import ACCOUNTANTS, epsilon_for, prior_epsilon
from dp_sweeps.privacy.engine import AUTO_GRAD_SAMPLE_MODE, GRAD_SAMPLE_MODES, make_private, resolve_grad_sample_mode
from dp_sweeps.privacy.laplace import MECHANISM_ACCOUNTANTS, MECHANISMS, check_mechanism_settings
from dp_sweeps.privacy.plan import (
                                    MAX_EPSILON,
                                    MAX_NOISE_MULTIPLIER,
                                    MIN_DELTA,
                                    MIN_EPSILON,
                                    PrivacyPlan,
                                    calibrate_noise_multiplier,
                                    plan_privacy,
                                    steps_per_epoch,
)

__all__ = ["ACCOUNTANTS", "AUTO_GRAD_SAMPLE_MODE", "GRAD_SAMPLE_MODES", "MAX_EPSILON", "MAX_NOISE_MULTIPLIER",
           "MECHANISMS", "MECHANISM_ACCOUNTANTS", "MIN_DELTA", "MIN_EPSILON", "PrivacyPlan",
           "calibrate_noise_multiplier", "check_mechanism_settings", "epsilon_for", "make_private",
           "plan_privacy", "prior_epsilon", "resolve_grad_sample_mode", "steps_per_epoch"]

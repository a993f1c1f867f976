"""The privacy mechanism in one place: calibrating σ, accounting ε, and turning a
model/optimizer/loader into their DP-SGD counterparts with Opacus.

Guarantee: with ``poisson_sampling=True``, training with :func:`make_private` is
(ε, δ)-DP with respect to adding or removing one training example, where ε is what
the configured Opacus accountant (PRV by default) computes for the noise multiplier
σ, the sampling rate q and the number of steps actually taken. Per-example gradients
are clipped to ``max_grad_norm`` in L2 (over all parameters together), summed, and
Gaussian noise of standard deviation ``σ · max_grad_norm`` is added once per step.
Gaussian releases made before training (``PrivacyPlan.prior_releases``: DP data
normalisation) are composed into the same accountant, so ε covers them too.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from dp_sweeps import bookkeeping, distributed, grad_samplers
from dp_sweeps.errors import ConfigError
from dp_sweeps.sampling import poisson_index_loader, shuffled_index_loader

log = logging.getLogger(__name__)

grad_samplers.install()  # faster per-example gradients and norms for Opacus (same values)

# Accountants that may calibrate σ and report a run's ε: upper bounds on the true ε.
# Opacus's GDP accountant is a CLT approximation that can under-report ε (σ = 0.8,
# q = 0.1, 50 steps: GDP 6.35, PRV 8.07, PLD 8.06): it appears only in the dry run's
# cross-check (dp_sweeps.accounting), never as a run's ε.
ACCOUNTANTS = ("prv", "rdp")

# The range in which every accountant answers in seconds and bounded memory. Beyond
# MAX_EPSILON PRV's grid grows to gigabytes (CIFAR-10, 100 epochs: σ=0.5, ε≈31 takes
# 1.3 GB; ε=50 takes 5 GB; σ=0.3 more than 3 GB) and such an ε promises nothing anyway.
# Above MAX_NOISE_MULTIPLIER a single RDP/PRV call takes several seconds and calibration
# would search for minutes; below MIN_DELTA PRV's floating-point error exceeds δ.
MAX_EPSILON = 30.0
MAX_NOISE_MULTIPLIER = 1e4
MIN_DELTA = 1e-10
MIN_EPSILON = 0.05
MAX_STEPS = 10**7
# Past this σ RDP's ε barely falls (its floor is ≈ 0.1 at δ = 1e-5): calibration moves on.
MAX_RDP_START = 100.0
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")


@dataclass(frozen=True)
class PrivacyPlan:
    """What a run will spend, decided before training.

    ``sample_rate`` and ``steps`` follow Opacus's Poisson loader: q = 1 / ceil(N / B)
    and ceil(N / B) steps per epoch, so the expected batch is about B.
    ``prior_releases``: Gaussian mechanisms run on the training set before DP-SGD, as
    accountant history entries ``(σ, q, count)``; every ε of the plan composes them.
    """

    private: bool
    accountant: str
    delta: Optional[float]
    max_grad_norm: Optional[float]
    noise_multiplier: Optional[float]
    sample_rate: float
    steps_per_epoch: int
    steps: int
    target_epsilon: Optional[float]
    planned_epsilon: Optional[float]
    poisson_sampling: bool
    prior_releases: tuple[tuple[float, float, int], ...] = ()

    def as_dict(self) -> dict:
        return asdict(self)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    return math.ceil(num_train / batch_size)


def check_prior_releases(prior: tuple, accountant: str) -> None:
    # Opacus's GDP accountant reads only one (σ, q) pair: it would drop the prior releases.
    if prior and accountant == "gdp":
        raise ConfigError("privacy.accountant='gdp' cannot compose the data normalisation's release with "
                          "DP-SGD (it assumes one (σ, q) throughout): use prv or rdp")


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv", prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    """ε after ``prior`` releases then ``steps`` Poisson-sampled Gaussian steps, from an
    Opacus accountant."""
    check_prior_releases(prior, accountant)
    return _ledger_epsilon([*map(tuple, prior), (noise_multiplier, sample_rate, steps)], delta=delta,
                           accountant=accountant)


def prior_epsilon(prior: tuple[tuple[float, float, int], ...], *, delta: float, accountant: str = "prv") -> float:
    """ε of the releases before training alone."""
    check_prior_releases(prior, accountant)
    return _ledger_epsilon([*map(tuple, prior)], delta=delta, accountant=accountant)


def _ledger_epsilon(history: list, *, delta: float, accountant: str) -> float:
    """ε of an Opacus accountant history ``[(σ, q, steps), ...]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP's "optimal order is the largest alpha" hint; GDP's caveat
        acc = create_accountant(mechanism=accountant)
        acc.history = history
        return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)  # sweeps ask for the same calibration again and again
def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", epsilon_tolerance: float = 0.01,
                               prior: tuple[tuple[float, float, int], ...] = ()) -> float:
    """The smallest σ (to ``epsilon_tolerance`` in ε) whose ε after ``steps`` is ≤ the target.

    The search brackets σ with RDP first (milliseconds at moderate σ), then refines with
    ``accountant`` near RDP's σ, which is within a few percent of PRV's: Opacus's own
    bisection from σ = 0 evaluates PRV at σ ≈ 0.3, where its grid at CIFAR scale takes
    more than 3 GB. Raises ConfigError if no σ ≤ MAX_NOISE_MULTIPLIER reaches the target.
    ``prior``: releases composed before the steps (their ε is spent whatever σ is).
    """
    def eps(sigma: float, mechanism: str = accountant) -> float:
        return epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                           accountant=mechanism, prior=prior)

    def bisect(low: float, high: float, eps_high: float, mechanism: str, ratio: float = 1 + 1e-9) -> float:
        """low misses the target, high meets it: narrow until high is within tolerance
        (or high / low ≤ ``ratio``)."""
        while target_epsilon - eps_high > epsilon_tolerance and high > ratio * low:
            mid = (low + high) / 2
            eps_mid = eps(mid, mechanism)
            if eps_mid <= target_epsilon:
                high, eps_high = mid, eps_mid
            else:
                low = mid
        return high

    def bracket(mechanism: str, start: float, factor: float, limit: float) -> tuple[float, float, float]:
        """(low, high, ε(high)) with ε(low) > target ≥ ε(high) and high / low = factor."""
        high, eps_high = start, eps(start, mechanism)
        while eps_high > target_epsilon:
            if high >= limit:
                raise ConfigError(f"privacy.epsilon={target_epsilon:g} is out of reach of the {mechanism} "
                                  f"accountant: σ={high:g} gives ε={eps_high:.3g} over {steps} steps at "
                                  f"q={sample_rate:.4g}")
            high = min(high * factor, limit)
            eps_high = eps(high, mechanism)
        low = high / factor
        while low > 1e-2:
            eps_low = eps(low, mechanism)
            if eps_low > target_epsilon:
                break
            high, eps_high, low = low, eps_low, low / factor
        return low, high, eps_high

    try:
        rdp_sigma = bisect(*bracket("rdp", 1.0, 2.0, MAX_RDP_START), "rdp",
                           ratio=1 + 1e-9 if accountant == "rdp" else 1.05)
    except ConfigError:
        # RDP cannot certify ε below ≈ 0.1 (its orders stop at 256): search with the finer accountant.
        if accountant == "rdp":
            raise
        return bisect(*bracket(accountant, MAX_RDP_START, 2.0, MAX_NOISE_MULTIPLIER), accountant)
    if accountant == "rdp":
        return rdp_sigma
    # PRV and GDP need slightly less noise than RDP (rarely more): refine from RDP's σ.
    return bisect(*bracket(accountant, rdp_sigma, 1.05, MAX_NOISE_MULTIPLIER), accountant)


def plan_privacy(privacy_cfg, *, num_train: int, batch_size: int, epochs: int,
                 prior_releases: tuple[tuple[float, float, int], ...] = ()) -> PrivacyPlan:
    """Decide σ (calibrated to ``privacy.epsilon``, or the given ``privacy.noise_multiplier``)
    and the ε the accountant predicts for the whole run, ``prior_releases`` included."""
    per_epoch = steps_per_epoch(num_train, batch_size)
    sample_rate = 1.0 / per_epoch
    steps = per_epoch * epochs
    if steps > MAX_STEPS:
        raise ConfigError(f"trainer.epochs={epochs} gives {steps:.3g} steps of {per_epoch} per epoch; at most "
                          f"{MAX_STEPS:.0e} are supported")
    if not privacy_cfg.enabled:
        return PrivacyPlan(private=False, accountant="none", delta=None, max_grad_norm=None,
                           noise_multiplier=None, sample_rate=sample_rate, steps_per_epoch=per_epoch,
                           steps=steps, target_epsilon=None, planned_epsilon=None, poisson_sampling=False)
    delta, accountant = float(privacy_cfg.delta), str(privacy_cfg.accountant)
    prior = tuple((float(s), float(q), int(n)) for s, q, n in prior_releases)
    check_prior_releases(prior, accountant)
    if prior and privacy_cfg.noise_multiplier is None:
        spent = prior_epsilon(prior, delta=delta, accountant=accountant)
        if not spent < float(privacy_cfg.epsilon):
            raise ConfigError(f"privacy.epsilon={float(privacy_cfg.epsilon):g}: the releases before training "
                              f"{list(prior)} already spend ε={spent:.3g}; raise it or add noise to them")
    try:
        if privacy_cfg.noise_multiplier is None:
            target = float(privacy_cfg.epsilon)
            sigma = calibrate_noise_multiplier(target_epsilon=target, delta=delta, sample_rate=sample_rate,
                                               steps=steps, accountant=accountant, prior=prior)
        else:
            target, sigma = None, float(privacy_cfg.noise_multiplier)
            # RDP first: cheap at any σ and an upper bound on PRV's ε, whose grid for a
            # huge ε takes gigabytes.
            rdp = epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                              accountant="rdp", prior=prior)
            if not rdp <= MAX_EPSILON:
                raise ConfigError(f"privacy.noise_multiplier={sigma:g} gives ε≈{rdp:.3g} (RDP) over {steps} "
                                  f"steps: too little noise (ε ≤ {MAX_EPSILON:g} is supported)")
        planned = epsilon_for(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta,
                              accountant=accountant, prior=prior)
    except (ValueError, ArithmeticError, MemoryError) as err:  # ConfigError is a ValueError: re-raised as is
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"privacy: the {accountant} accountant cannot handle δ={delta:g}, q={sample_rate:.4g}, "
                          f"{steps} steps ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                          ) from err
    if not math.isfinite(planned):
        raise ConfigError(f"privacy.noise_multiplier={sigma:g} gives ε={planned} under {accountant}: "
                          f"too little noise for this run")
    return PrivacyPlan(private=True, accountant=accountant, delta=delta,
                       max_grad_norm=float(privacy_cfg.max_grad_norm), noise_multiplier=sigma,
                       sample_rate=sample_rate, steps_per_epoch=per_epoch, steps=steps,
                       target_epsilon=target, planned_epsilon=planned,
                       poisson_sampling=bool(privacy_cfg.poisson_sampling), prior_releases=prior)


def resolve_grad_sample_mode(mode: str, model_name: str) -> str:
    """The Opacus engine for ``privacy.grad_sample_mode``: ``auto`` becomes the model's
    entry in :data:`AUTO_GRAD_SAMPLE_MODE` (``hooks``, Opacus's default, for a model not
    measured); any other mode is kept as given.

    Guarantee: the engine changes speed and memory only. Every engine ``auto`` can return
    gives the same clipped and noised gradient as ``hooks`` (same seed, to 1e-5 relative;
    tests/test_grad_sample_modes.py), so the mechanism and its ε are unchanged.
    """
    if mode != "auto":
        return mode
    return AUTO_GRAD_SAMPLE_MODE.get(model_name, "hooks")


# Fastest correct engine per model, measured by `make bench` on CPU (torch 2.14.1, Opacus 1.6.0,
# 1 thread, logical batch 256, physical 64; median samples/s in one process). Another engine
# replaces hooks only when >= 10% faster (smaller gaps were noise) and when it runs every
# physical batch size a Poisson batch can produce. "hooks" is Opacus's hooks engine with
# dp_sweeps.grad_samplers and dp_sweeps.bookkeeping (book-keeping clipping). Figures: DP /
# non-private time per sample, and speed-up over Opacus's hooks as shipped. Not measured on
# GPU (see README, "Speed").
AUTO_GRAD_SAMPLE_MODE: dict[str, str] = {
    "convnet": "hooks",         # 1.62x (stock 2.63x); ew, ghost, functorch were slower before book-keeping
    "resnet18": "hooks",        # 1.42x (stock 3.61x), 1.0 GB vs 3.7 GB; ew, ghost slower
    "efficientnet": "hooks",    # 1.46x with the depthwise sampler; functorch 3.07x (stock hooks ~25x)
    "vit": "hooks",             # 1.56x (stock 2.16x); functorch 2.21x
    "densenet121": "hooks",     # 1.66x at batch 64 (stock 2.31x); ew fails on batches < 32 examples
    # ScatterNet heads (batch 8192, physical 1024, 2 threads): a linear layer's per-example
    # gradient norm is ‖a‖·‖b‖, so ghost clipping never builds the 155k-wide per-example
    # gradients: 11,000 vs 1,400 samples/s (hooks before book-keeping). The CNN head: ghost 0.92x of hooks.
    "scatter_linear": "ghost",
}


def make_private(*, plan: PrivacyPlan, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 criterion: torch.nn.Module, num_samples: int, grad_sample_mode: str,
                 noise_generator: torch.Generator, sampler_generator: torch.Generator):
    """Wrap the training objects with Opacus and build the run's sampler. Returns
    (engine, module, optimizer, criterion, loader); the loader yields ``(indices,)``.

    ``noise_generator`` and ``sampler_generator`` are the mechanism's secret streams
    (:mod:`dp_sweeps.randomness`). With ``plan.poisson_sampling`` the loader is
    :func:`dp_sweeps.sampling.poisson_index_loader`: exactly ``plan.steps_per_epoch``
    batches per epoch at rate ``plan.sample_rate``, empty ones included, on every rank.
    Opacus's accountant is given the same q (checked), since ε depends on it. Layers
    whose per-example gradients are not proven right under the engine are refused.
    """
    grad_samplers.check_per_example_support(module, grad_sample_mode)
    rank, world = distributed.rank(), distributed.world_size()
    if plan.poisson_sampling:
        loader = poisson_index_loader(num_samples=num_samples, sample_rate=plan.sample_rate,
                                      steps=plan.steps_per_epoch, generator=sampler_generator,
                                      rank=rank, world_size=world)
    else:  # not what the accountant assumes: the run is marked epsilon_valid=false
        loader = shuffled_index_loader(num_samples=num_samples, batch_size=math.ceil(num_samples / plan.steps_per_epoch),
                                       generator=sampler_generator)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=plan.accountant)
        # poisson_sampling=False: Opacus keeps our loader (its own samplers are wrong, see
        # dp_sweeps.sampling); it reads q = 1 / len(loader) for the accountant.
        wrapped = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode, noise_generator=noise_generator)
    if grad_sample_mode == "ghost":
        module, optimizer, criterion, loader = wrapped
    else:
        module, optimizer, loader = wrapped
    if plan.poisson_sampling and hasattr(module, "forbid_grad_accumulation"):
        module.forbid_grad_accumulation()  # what Opacus does for its own Poisson loader
    # Same values, less work (dp_sweeps.grad_samplers / .bookkeeping); not for the
    # benchmark's baseline, Opacus as shipped.
    if grad_sample_mode == "hooks" and not grad_samplers.stock_opacus_active():
        grad_samplers.skip_summed_gradients(module)
        bookkeeping.enable_bookkeeping(module, optimizer)
    # Releases made before training are the first entries of the run's privacy ledger.
    engine.accountant.history = [*map(tuple, plan.prior_releases)]
    sample_rate = 1.0 / len(loader)
    if len(loader) != plan.steps_per_epoch or not math.isclose(sample_rate, plan.sample_rate, rel_tol=1e-12):
        raise RuntimeError(f"the loader samples at q={sample_rate} over {len(loader)} steps, the plan at "
                           f"q={plan.sample_rate} over {plan.steps_per_epoch}")
    return engine, module, optimizer, criterion, loader

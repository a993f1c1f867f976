"""The engine: turn a model, optimizer and data into their DP-SGD counterparts with
Opacus, and pick the per-example gradient engine.

Guarantee: with ``plan.poisson_sampling``, training through :func:`make_private` is
(ε, δ)-DP with respect to adding or removing one training example, where ε is what the
plan's accountant computes for σ, q and the steps actually taken. Per-example gradients
are clipped to ``max_grad_norm`` in L2 (over all parameters together), summed, and
Gaussian noise of standard deviation ``σ · max_grad_norm`` is added once per step, also
for an empty batch. With ``plan.mechanism == "laplace"`` the clipping is in L1 and the
noise Laplace(0, σ · max_grad_norm) per coordinate, accounted by dp_accounting's PLD
(:mod:`dp_sweeps.privacy.laplace`). Releases before training (``plan.prior_releases``)
head the ledger.
"""

from __future__ import annotations

import math
import warnings

import torch
from opacus import PrivacyEngine

from dp_sweeps import grad_sample
from dp_sweeps.errors import ConfigError
from dp_sweeps.grad_sample import bookkeeping
from dp_sweeps.privacy.laplace import LaplacePLDAccountant, use_laplace_mechanism
from dp_sweeps.privacy.plan import PrivacyPlan
from dp_sweeps.privacy.sampling import poisson_index_loader, shuffled_index_loader

GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew", "ghost")


def resolve_grad_sample_mode(mode: str, model_name: str, *, mechanism: str = "gaussian") -> str:
    """The Opacus engine for ``privacy.grad_sample_mode``: ``auto`` becomes the model's
    entry in :data:`AUTO_GRAD_SAMPLE_MODE` (``hooks``, Opacus's default, for a model not
    measured; ``hooks`` instead of ``ghost`` for the Laplace mechanism, whose L1 norms
    need the per-example gradients); any other mode is kept as given.

    Guarantee: the engine changes speed and memory only. Every engine ``auto`` can return
    gives the same clipped and noised gradient as ``hooks`` (same seed, to 1e-5 relative;
    tests/test_grad_sample_modes.py), so the mechanism and its ε are unchanged.
    """
    if mode != "auto":
        return mode
    chosen = AUTO_GRAD_SAMPLE_MODE.get(model_name, "hooks")
    return "hooks" if mechanism == "laplace" and chosen == "ghost" else chosen


# Fastest correct engine per model, measured by `make bench` on CPU (torch 2.14.1, Opacus 1.6.0,
# 1 thread, logical batch 256, physical 64; median samples/s in one process). Another engine
# replaces hooks only when >= 10% faster (smaller gaps were noise) and when it runs every
# physical batch size a Poisson batch can produce. "hooks" is Opacus's hooks engine with
# dp_sweeps.grad_sample (its samplers and book-keeping clipping). Figures: DP /
# non-private time per sample, and speed-up over Opacus's hooks as shipped. Not measured on
# GPU (docs/engines.md, docs/benchmarks.md).
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
                 noise_generator: torch.Generator, sampler_generator: torch.Generator,
                 rank: int = 0, world_size: int = 1):
    """Wrap the training objects with Opacus and build the run's sampler. Returns
    (engine, module, optimizer, criterion, loader); the loader yields ``(indices,)``.

    ``noise_generator`` and ``sampler_generator`` are the mechanism's secret streams
    (:mod:`dp_sweeps.privacy.randomness`). With ``plan.poisson_sampling`` the loader is
    :func:`dp_sweeps.privacy.sampling.poisson_index_loader`: exactly ``plan.steps_per_epoch``
    batches per epoch at rate ``plan.sample_rate``, empty ones included, on every rank.
    Opacus's accountant is given the same q (checked), since ε depends on it. Layers
    whose per-example gradients are not proven right under the engine are refused.
    """
    laplace = plan.mechanism == "laplace"
    if laplace and (world_size > 1 or grad_sample_mode == "ghost"):
        raise ConfigError(f"privacy.mechanism=laplace runs on one process with per-example gradients; got "
                          f"{world_size} processes, grad_sample_mode={grad_sample_mode!r}")
    grad_sample.install()  # idempotent: our samplers in Opacus's registries
    grad_sample.check_per_example_support(module, grad_sample_mode)
    if plan.poisson_sampling:
        loader = poisson_index_loader(num_samples=num_samples, sample_rate=plan.sample_rate,
                                      steps=plan.steps_per_epoch, generator=sampler_generator,
                                      rank=rank, world_size=world_size)
    else:  # not what the accountant assumes: the run is marked epsilon_valid=false
        loader = shuffled_index_loader(num_samples=num_samples,
                                       batch_size=math.ceil(num_samples / plan.steps_per_epoch),
                                       generator=sampler_generator)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="prv" if laplace else plan.accountant)
        if laplace:  # before make_private, which hooks the engine's accountant to the optimizer's steps
            engine.accountant = LaplacePLDAccountant(prior_releases=plan.prior_releases)
        # poisson_sampling=False: Opacus keeps our loader (its own samplers are wrong, see
        # dp_sweeps.privacy.sampling); it reads q = 1 / len(loader) for the accountant.
        wrapped = engine.make_private(
            module=module, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False, grad_sample_mode=grad_sample_mode, noise_generator=noise_generator)
    if grad_sample_mode == "ghost":
        module, optimizer, criterion, loader = wrapped
    else:
        module, optimizer, loader = wrapped
    if laplace:
        optimizer = use_laplace_mechanism(optimizer)
    if plan.poisson_sampling and hasattr(module, "forbid_grad_accumulation"):
        module.forbid_grad_accumulation()  # what Opacus does for its own Poisson loader
    # Same values, less work (dp_sweeps.grad_sample); not for the
    # benchmark's baseline, Opacus as shipped.
    if grad_sample_mode == "hooks" and not grad_sample.stock_opacus_active():
        grad_sample.skip_summed_gradients(module)
        if not laplace:  # book-keeping computes L2 norms from factors: L1 needs the gradients
            bookkeeping.enable_bookkeeping(module, optimizer)
    # Releases made before training are the first entries of the run's privacy ledger.
    engine.accountant.history = [*map(tuple, plan.prior_releases)]
    sample_rate = 1.0 / len(loader)
    if len(loader) != plan.steps_per_epoch or not math.isclose(sample_rate, plan.sample_rate, rel_tol=1e-12):
        raise RuntimeError(f"the loader samples at q={sample_rate} over {len(loader)} steps, the plan at "
                           f"q={plan.sample_rate} over {plan.steps_per_epoch}")
    return engine, module, optimizer, criterion, loader

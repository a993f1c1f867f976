"""Per-example gradients and their norms for Opacus, faster and with less memory, with
the same values: our samplers (:mod:`.samplers`, :mod:`.per_example`) and book-keeping
clipping (:mod:`.bookkeeping`).

Guarantee: nothing here changes the mechanism. Every rule returns what Opacus's own rule
returns (tested to float32 rounding against Opacus and against per-example autograd
loops); clipping, noise and accounting stay Opacus's. Layers whose per-example path is
not proven correct under an engine are refused before training
(:func:`check_per_example_support`).

Nothing is changed in Opacus at import: :func:`install` (idempotent; called by
:func:`dp_sweeps.privacy.engine.make_private`) registers the rules with Opacus's own
``register_grad_sampler`` / ``register_norm_sampler`` decorators.

Opacus private APIs we rely on (checked against Opacus 1.6.0; re-check on upgrade):
- ``opacus.grad_sample.grad_sample_module.create_or_accumulate_grad_sample`` and its twin in
  ``grad_sample_module_fast_gradient_clipping`` (replaced by :func:`store_grad_sample`);
- ``ft_compute_per_sample_gradient`` in the same two modules (wrapped for empty batches);
- ``GradSampleModuleExpandedWeights.forward`` (wrapped for empty batches);
- ``GradSampleModule`` internals: ``_module``, ``hooks_enabled``, ``force_functorch`` and the
  class-level ``GRAD_SAMPLERS`` / ``NORM_SAMPLERS`` registries (skipping the summed
  gradient, :func:`skip_summed_gradients`; the engine check);
- the ``_is_last_step_skipped`` flag of Opacus's optimizers (read by the training loop);
- ``opacus.optimizers.optimizer._check_processed_flag`` / ``_mark_as_processed`` and
  ``DPOptimizer.clip_and_accumulate`` (book-keeping's optimizer);
- ``opacus.utils.tensor_utils.unfold2d``; ``compute_conv_grad_sample`` and
  ``compute_linear_grad_sample`` (the fallbacks and the stock baseline).
"""

from dp_sweeps.grad_sample.samplers import (
                                            check_per_example_support,
                                            install,
                                            skip_summed_gradients,
                                            stock_opacus,
                                            stock_opacus_active,
)

__all__ = ["check_per_example_support", "install", "skip_summed_gradients", "stock_opacus", "stock_opacus_active"]

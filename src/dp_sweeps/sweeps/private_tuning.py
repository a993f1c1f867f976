"""``hparams_search=private_tuning``: a hyperparameter search whose whole procedure is
differentially private (Papernot & Steinke, ICLR 2022), as a Hydra sweeper.

Guarantee: the files a user may publish, ``<sweep dir>/released/`` and
``<sweep dir>/tuning_privacy.json``, are (ε, δ)-DP for the ε written in the latter, with
respect to adding or removing one example of the training split or of the validation
split (each trial composes DP-SGD on the first and a noisy score on the second), under
these conditions, which the sweeper enforces or refuses to run without:

1. K, the number of trials, is drawn once from the configured law
   (:class:`~dp_sweeps.privacy.tuning.TrialCount`) from fresh OS entropy (the secret
   stream ``trial_count``), never from ``seed``, and is not published: it and the
   released trial's number are written only under ``private/``.
2. Each trial's hyperparameters are drawn independently from the declared space by
   Optuna's ``RandomSampler`` (uniform random search), seeded from the secret stream
   ``trial_params``. The draw reads no data, but a *known* seed would make the i-th
   trial's hyperparameters public, so the released ones would name the winning trial and
   bound K from below; the theorem needs identically distributed trials. A
   ``hydra.sweeper.sampler.seed`` (for debugging) therefore marks the search
   ``epsilon_valid: false``. Adaptive samplers (TPE, GP, CMA-ES, …) and pruners are
   refused: the theorem covers neither.
3. Each trial is a DP-SGD run plus a noisy validation score
   (:mod:`dp_sweeps.privacy.noisy_score`, ``tuning.score_noise`` > 0; refused without).
4. Every privacy-relevant key of the space (``PRIVACY_CHOICE_KEYS``) is fixed or a
   ``choice(...)``; the per-trial RDP curve is the pointwise maximum over every
   combination of those choices (not only the trials that ran), computed before any trial;
   each finished trial's own mechanism is checked to lie under it before anything is
   released. Other privacy-relevant keys (``FIXED_PRIVACY_KEYS``) cannot vary.
5. Only the trial with the best noisy score is copied to ``released/`` (its weights and
   its ``result.json`` without its exact validation figures); every trial stays in
   ``private/``, which is as secret as the data.

The search's ε is computed by :func:`dp_sweeps.privacy.tuning.tuning_privacy`
(dp_accounting's RDP accountant, ``RepeatAndSelectDpEvent``). ``tuning.total_epsilon``
instead calibrates one noise multiplier σ for every trial so that the whole search spends
at most that (:func:`~dp_sweeps.privacy.tuning.calibrate_common_noise`).

Hydra finds the class through :class:`RegisterPrivateTuning`, which the search config lists
under ``hydra.callbacks``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from dp_sweeps.errors import ConfigError
from dp_sweeps.extras import extra
from dp_sweeps.privacy import tuning as tuning_lib
from dp_sweeps.privacy.plan import plan_privacy
from dp_sweeps.privacy.randomness import stream_seed
from dp_sweeps.sweeps.search import RegisterSweeper, last_override_wins
from dp_sweeps.training.results import RESULT_FILE, write_json_atomic

with extra("search", what="hparams_search=private_tuning (dp_sweeps.sweeps.private_tuning)"):
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

log = logging.getLogger(__name__)

PRIVACY_FILE = "tuning_privacy.json"
RELEASED_DIR = "released"
PRIVATE_DIR = "private"
BASELINE_DIR = "baseline"
TRIALS_FILE = "tuning_trials.json"  # under private/: K and every trial's score (secret)
WEIGHTS_FILE = "model.pt"
RANDOM_SAMPLER = "optuna.samplers.RandomSampler"
# Keys that change a trial's mechanism and that the worst case enumerates: choice(...) or fixed.
PRIVACY_CHOICE_KEYS = ("privacy.epsilon", "privacy.noise_multiplier", "trainer.batch_size", "trainer.epochs",
                       "privacy.data_norm.noise_multiplier", "tuning.score_noise")
# Keys, and prefixes of keys, that change the mechanism or its accounting and may not vary:
# the model group (a model may bring the data-normalisation release), model.norm, the data
# split and size, the privacy settings, the score and the law of K.
FIXED_PRIVACY_KEYS = ("model", "model.norm")
FIXED_PRIVACY_PREFIXES = ("privacy", "data", "tuning")
NOT_PRIVACY_RELEVANT = ("privacy.max_grad_norm", "privacy.grad_sample_mode", "data.augment")
# What the released copy of result.json leaves out: exact figures on the private validation
# split, and statistics of the private training batches.
REDACTED = ("val_accuracy", "val_loss", "non_private", "search")


def privacy_relevant(key: str) -> bool:
    if key in NOT_PRIVACY_RELEVANT:
        return False
    return (key in PRIVACY_CHOICE_KEYS or key in FIXED_PRIVACY_KEYS
            or any(key == p or key.startswith(p + ".") for p in FIXED_PRIVACY_PREFIXES))


def check_space(search_space: dict[str, Any]) -> None:
    """Refuse (one line) an interval, range or anything unbounded over a privacy-relevant
    key, and any variation of a key the worst case cannot enumerate."""
    for key, distribution in search_space.items():
        if not privacy_relevant(key):
            continue
        if key not in PRIVACY_CHOICE_KEYS:
            raise ConfigError(f"{key}: cannot vary in a private search (it changes the mechanism or its "
                              f"accounting); fix it")
        if not isinstance(distribution, optuna.distributions.CategoricalDistribution):
            raise ConfigError(f"{key}: a privacy-relevant key must be choice(...) or fixed under "
                              f"hparams_search=private_tuning, not {type(distribution).__name__}")


def check_sampler(sampler_cfg: Any, pruner_cfg: Any) -> None:
    target = (sampler_cfg or {}).get("_target_") if sampler_cfg is not None else None
    if target != RANDOM_SAMPLER:
        raise ConfigError(f"hydra.sweeper.sampler={target}: private tuning needs hydra/sweeper/sampler=random; "
                          f"adaptive samplers are not covered by Papernot & Steinke's theorem")
    if pruner_cfg is not None:
        raise ConfigError("hydra.sweeper.pruner: private tuning runs every trial to the end (the Papernot & "
                          "Steinke accounting does not cover pruning); remove the pruner")


def trial_count_law(tuning: DictConfig) -> tuning_lib.TrialCount:
    """The law of K from ``tuning.*`` (``tuning.shape`` is read for the truncated negative
    binomial only)."""
    shape = tuning.get("shape") if str(tuning.distribution) == "truncated_negative_binomial" else None
    return tuning_lib.TrialCount(distribution=str(tuning.distribution), mean=float(tuning.mean_trials),
                                 shape=None if shape is None else float(shape))


def space_centre(search_space: dict[str, Any]) -> dict[str, Any]:
    """A point fixed before any data is seen: the middle choice of each ``choice(...)`` and
    the (log-)midpoint of each interval. The baseline's hyperparameters."""
    centre: dict[str, Any] = {}
    for key, distribution in search_space.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            centre[key] = distribution.choices[len(distribution.choices) // 2]
            continue
        low, high = float(distribution.low), float(distribution.high)
        middle = math.sqrt(low * high) if getattr(distribution, "log", False) else (low + high) / 2
        centre[key] = round(middle) if isinstance(distribution, optuna.distributions.IntDistribution) else middle
    return centre


def _parse_value(key: str, value: Any) -> Any:
    return OverridesParser.create().parse_override(f"{key}={value}").value()


def redacted_result(result: dict[str, Any]) -> dict[str, Any]:
    """The released copy of a trial's record: its exact validation figures removed (only the
    noisy score is a DP release on the validation split), and no trial number."""
    return {k: v for k, v in result.items() if k not in REDACTED}


def trial_covered(result: dict[str, Any], worst: Any) -> bool:
    """Whether the mechanism a trial's record describes lies under the worst-case curve."""
    event = tuning_lib.trial_event(
        noise_multiplier=result["noise_multiplier"], sample_rate=result["sample_rate"],
        steps=result["planned_steps"], prior_releases=result.get("prior_releases") or (),
        score=tuning_lib.score_event(mechanism=result["score_mechanism"], noise=result["score_noise"]))
    return bool((tuning_lib.rdp_curve(event) <= worst * (1 + 1e-9) + 1e-12).all())


class PrivateTuningSweeper(Sweeper):
    """Random search with a secret random number of trials; releases the best trial only."""

    def __init__(self, sampler: Any = None, params: Optional[DictConfig] = None, pruner: Any = None,
                 n_jobs: int = 1, **_ignored: Any) -> None:
        self.sampler_cfg = sampler
        self.params = params
        self.pruner_cfg = pruner
        self.n_jobs = max(1, int(n_jobs))

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.job_idx = 0

    def sweep(self, arguments: list[str]) -> None:
        try:
            self._sweep(arguments)
        except ConfigError as err:  # bad search input: one line, before any trial
            raise SystemExit(f"dp_sweeps: error: {err}") from None

    # -- before any trial -------------------------------------------------------------
    def _trial_config(self, overrides: Sequence[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))

    def _plan(self, cfg: DictConfig, *, num_train: int, noise_multiplier: Optional[float]):
        privacy = OmegaConf.to_container(cfg.privacy, resolve=True)
        if noise_multiplier is not None:
            privacy["noise_multiplier"] = noise_multiplier
        privacy = OmegaConf.create(privacy)
        prior = ()
        if cfg.model.get("norm") == "data":  # dp_sweeps.privacy.data_normalization's release
            prior = ((float(privacy.data_norm.noise_multiplier), 1.0, 2),)
        return plan_privacy(privacy, num_train=num_train, batch_size=int(cfg.trainer.batch_size),
                            epochs=int(cfg.trainer.epochs), prior_releases=prior)

    def _events(self, configs: Sequence[DictConfig], *, num_train: int, noise_multiplier: Optional[float]):
        events = []
        for cfg in configs:
            plan = self._plan(cfg, num_train=num_train, noise_multiplier=noise_multiplier)
            events.append(tuning_lib.trial_event(
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                prior_releases=plan.prior_releases,
                score=tuning_lib.score_event(mechanism=str(cfg.tuning.score_mechanism),
                                             noise=cfg.tuning.score_noise)))
        return events

    def _check_base(self, cfg: DictConfig) -> None:
        from dp_sweeps.classical import is_classical

        if not cfg.privacy.enabled:
            raise ConfigError("privacy.enabled=false: private tuning runs DP trials (privacy=dp)")
        if not cfg.privacy.poisson_sampling:
            raise ConfigError("privacy.poisson_sampling=false: the trials' ε (and so the search's) needs Poisson "
                              "sampling")
        if str(cfg.privacy.get("mechanism", "gaussian")) != "gaussian":
            raise ConfigError(f"privacy.mechanism={cfg.privacy.mechanism}: private tuning accounts Gaussian "
                              f"DP-SGD only")
        if is_classical(cfg.model.name):
            raise ConfigError(f"model={cfg.model.name}: private tuning runs network trials only")
        if not cfg.data.get("val_size"):
            raise ConfigError("data.val_size=0: the noisy score needs a validation split held out of the "
                              "training set")
        if cfg.trainer.get("ema_decay") is not None:
            raise ConfigError("trainer.ema_decay: private tuning releases the trained weights, which an EMA "
                              "evaluation would not match; set it to null")
        if cfg.trainer.get("non_private_stats"):
            raise ConfigError("trainer.non_private_stats=true: figures outside the mechanism have no place in "
                              "a private search")
        if cfg.get("optimized_metric") != "noisy_val_accuracy":
            raise ConfigError(f"optimized_metric={cfg.get('optimized_metric')!r}: private tuning selects on "
                              f"noisy_val_accuracy, the DP score")

    def _sweep(self, arguments: list[str]) -> None:
        check_sampler(self.sampler_cfg, self.pruner_cfg)
        params = [f"{k}={v}" for k, v in (self.params or {}).items()]
        search_space, fixed_params, fixed_overrides = create_params_from_overrides(
            last_override_wins(params + list(arguments)))
        for name in fixed_params:
            search_space.pop(name, None)
        check_space(search_space)
        tuning = self.config.tuning
        law = trial_count_law(tuning)
        fixed = [f"{k}={v}" for k, v in fixed_params.items()] + list(fixed_overrides)
        total_target = tuning.get("total_epsilon")
        if total_target is not None and ({"privacy.epsilon", "privacy.noise_multiplier"} & set(search_space)):
            raise ConfigError("tuning.total_epsilon: calibrates one noise multiplier for every trial; "
                              "privacy.epsilon and privacy.noise_multiplier cannot be searched with it")

        # Every combination of the privacy-relevant choices; the other keys at their first value.
        relevant = [k for k in search_space if k in PRIVACY_CHOICE_KEYS]
        others = [f"{k}={d.choices[0] if hasattr(d, 'choices') else d.low}" for k, d in search_space.items()
                  if k not in relevant]
        combos = list(itertools.product(*[search_space[k].choices for k in relevant]))
        configs = [self._trial_config(fixed + others + [f"{k}={v}" for k, v in zip(relevant, combo)])
                   for combo in combos]
        base = configs[0]
        self._check_base(base)
        delta = float(base.privacy.delta)
        from dp_sweeps.run import load_data  # the data's size sets q (public, as everywhere here)

        num_train = load_data(base.data).num_train
        sigma = None
        if total_target is not None:
            # q, the steps and the releases before training do not depend on σ: plan once (at a
            # σ that every plan accepts).
            plans = [self._plan(cfg, num_train=num_train, noise_multiplier=50.0) for cfg in configs]
            scores = [tuning_lib.score_event(mechanism=str(cfg.tuning.score_mechanism), noise=cfg.tuning.score_noise)
                      for cfg in configs]

            def events_for(noise_multiplier: float) -> list:
                return [tuning_lib.trial_event(noise_multiplier=noise_multiplier, sample_rate=p.sample_rate,
                                               steps=p.steps, prior_releases=p.prior_releases, score=score)
                        for p, score in zip(plans, scores)]
            sigma = tuning_lib.calibrate_common_noise(target_epsilon=float(total_target), law=law, delta=delta,
                                                      events_for=events_for)
            log.info("tuning.total_epsilon=%s: every trial trains with σ=%.4f", total_target, sigma)
        events = self._events(configs, num_train=num_train, noise_multiplier=sigma)
        worst = tuning_lib.worst_case_rdp(events)
        spent = tuning_lib.tuning_privacy(trial_events=events, law=law, delta=delta)
        log.info("private search: E[K]=%g (%s), %d privacy-relevant combination(s); total ε=%.3f at δ=%g "
                 "(per trial %.3f, RDP)", law.mean, law.distribution, len(events), spent.epsilon, delta,
                 spent.per_trial_epsilon)

        # The mechanism: K secret trials, each drawn independently, then the best is released.
        k = tuning_lib.draw_secret_trial_count(law, noise_seed=base.privacy.noise_seed)
        # The draws read no data, but a known seed would make the trials' laws differ by their
        # number, and the released hyperparameters would then tell which trial won (a bound on
        # K): the theorem needs identically distributed trials, so the seed is secret too.
        seed = (self.sampler_cfg or {}).get("seed")
        if seed is None:
            seed = stream_seed("trial_params", noise_seed=base.privacy.noise_seed) % 2**32
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed), direction="maximize")
        trials = [study.ask(search_space) for _ in range(k)]
        extra_overrides = [] if sigma is None else [f"privacy.noise_multiplier={sigma!r}"]
        jobs = [tuple(fixed + [f"{n}={v}" for n, v in t.params.items()] + extra_overrides
                      + [f"search.trial={t.number}", f"search.folder={PRIVATE_DIR}/trial_{t.number}"])
                for t in trials]
        returns = []
        for start in range(0, len(jobs), self.n_jobs):
            returns += list(self.launcher.launch(jobs[start:start + self.n_jobs], initial_job_idx=self.job_idx))
            self.job_idx += len(jobs[start:start + self.n_jobs])
        records = [self._record(t, r, worst) for t, r in zip(trials, returns)]
        best = max((r for r in records if r["score"] is not None), key=lambda r: r["score"], default=None)
        self._write(law=law, spent=spent, sigma=sigma, total_target=total_target, relevant=relevant,
                    combos=combos, records=records, best=best, base=base)
        if tuning.get("baseline"):
            self._baseline(fixed=fixed + [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in space_centre(search_space).items()], epsilon=spent.epsilon)

    # -- after the trials ---------------------------------------------------------------
    def _record(self, trial, ret, worst) -> dict[str, Any]:
        run_dir = Path(str(ret.hydra_cfg.hydra.runtime.output_dir))
        record: dict[str, Any] = {"trial": trial.number, "params": trial.params, "run_dir": str(run_dir),
                                  "score": None}
        try:
            result = json.loads((run_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            record["status"] = "no_result"
            return record
        record["status"] = result.get("status")
        score = result.get("noisy_val_accuracy")
        if result.get("status") == "completed" and isinstance(score, (int, float)) and math.isfinite(score):
            if not trial_covered(result, worst):
                raise RuntimeError(f"trial {trial.number}'s mechanism (σ={result.get('noise_multiplier')}, "
                                   f"q={result.get('sample_rate')}, steps={result.get('planned_steps')}) is not "
                                   f"covered by the search's worst case: nothing is released")
            record["score"] = float(score)
        return record

    def _write(self, *, law, spent, sigma, total_target, relevant, combos, records, best, base) -> None:
        released: dict[str, Any] | None = None
        if best is not None:
            source = Path(best["run_dir"])
            target = self.sweep_dir / RELEASED_DIR
            target.mkdir(parents=True, exist_ok=True)
            result = json.loads((source / RESULT_FILE).read_text())
            shutil.copyfile(source / WEIGHTS_FILE, target / WEIGHTS_FILE)
            write_json_atomic(target / RESULT_FILE, {**redacted_result(result), "released_by": "private_tuning",
                                                     "tuning_epsilon": spent.epsilon, "tuning_delta": spent.delta})
            released = {"folder": RELEASED_DIR, "params": best["params"],
                        "noisy_val_accuracy": result.get("noisy_val_accuracy"),
                        "test_accuracy": result.get("test_accuracy"),
                        "per_run_epsilon": result.get("epsilon"), "per_run_accountant": result.get("accountant"),
                        "noise_multiplier": result.get("noise_multiplier")}
            log.info("released the best trial (noisy validation accuracy %.4f) to %s",
                     result.get("noisy_val_accuracy"), target)
        else:
            log.warning("no trial completed (or K=0): nothing is released")
        summary = {
            "mechanism": "random search, K ~ the law below (secret), best noisy score released "
                         "(Papernot & Steinke, ICLR 2022)",
            "epsilon": spent.epsilon, "delta": spent.delta, "rdp_order": spent.order,
            "accountant": "dp_accounting RDP, RepeatAndSelectDpEvent over the worst-case trial",
            "epsilon_valid": base.privacy.noise_seed is None and (self.sampler_cfg or {}).get("seed") is None,
            "per_trial_worst_case_epsilon_rdp": spent.per_trial_epsilon,
            "trial_count": {**law.as_dict(), "drawn": "secret: private/" + TRIALS_FILE},
            "worst_case_over": {"keys": relevant, "combinations": [list(c) for c in combos],
                                "data_norm_release": base.model.get("norm") == "data"},
            "score": {"mechanism": str(base.tuning.score_mechanism), "noise": base.tuning.score_noise,
                      "metric": "noisy_val_accuracy", "sensitivity": 1},
            "total_epsilon_target": total_target, "common_noise_multiplier": sigma,
            "released": released,
            "private_folder": PRIVATE_DIR,
        }
        write_json_atomic(self.sweep_dir / PRIVACY_FILE, summary)
        write_json_atomic(self.sweep_dir / PRIVATE_DIR / TRIALS_FILE, {
            "secret": "K and every trial's figures: publishing them voids the search's guarantee",
            "trials_run": len(records), "released_trial": None if best is None else best["trial"],
            "trials": records})

    def _baseline(self, *, fixed: list[str], epsilon: float) -> None:
        """One run at the centre of the space (:func:`space_centre`: hyperparameters fixed
        without looking at any data, no search) at the search's total ε: what the budget
        buys without tuning. A release of its own (its ε adds up)."""
        overrides = tuple(fixed + [f"privacy.epsilon={epsilon!r}", "privacy.noise_multiplier=null",
                                   "tuning.score_noise=null", "search.trial=baseline",
                                   f"search.folder={BASELINE_DIR}"])
        list(self.launcher.launch([overrides], initial_job_idx=self.job_idx))
        self.job_idx += 1


class RegisterPrivateTuning(Callback):
    """A Hydra callback whose construction registers :class:`PrivateTuningSweeper` (and,
    through :class:`~dp_sweeps.sweeps.search.RegisterSweeper`, dp_sweeps' launchers):
    ``hparams_search=private_tuning`` lists it under ``hydra.callbacks``."""

    def __init__(self) -> None:
        RegisterSweeper()
        Plugins.instance().register(PrivateTuningSweeper)

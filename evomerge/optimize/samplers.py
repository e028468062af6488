"""Optuna's samplers as optimizers: one small class each over :class:`SamplerOptimizer`.

The sampler itself does the work: ``ask`` is ``study.ask(distributions)`` as many
times as there are free slots (WAITING trials are popped first by Optuna), so every
worker stays busy; ``tell`` is ``study.tell``. Options are the sampler's constructor
arguments, checked by name against its signature; ``seed`` comes from the run.

Multi-objective support, as in Optuna 5: TPE (MOTPE), NSGA-II, NSGA-III, GP (logEHVI)
and random sampling handle several objectives natively and record all of them;
Optuna's CmaEsSampler handles one, so several objectives need a scalarization.
With a scalarization, every sampler optimizes the one scalarized value.

Example:
    >>> import optuna
    >>> from optuna.distributions import FloatDistribution
    >>> from evomerge.optimize import Objective
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> opt = TPEOptimizer({"x": FloatDistribution(-2, 2)}, [Objective("loss", "minimize")],
    ...                    seed=0, n_startup_trials=3)
    >>> study = optuna.create_study(directions=opt.directions(), sampler=opt.sampler())
    >>> for _ in range(8):
    ...     for trial in opt.ask(study, 2):
    ...         opt.tell(study, trial, [(trial.params["x"] - 1) ** 2])
    >>> len(study.trials), study.best_value < 1
    (16, True)
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.trial import Trial

from evomerge.errors import ConfigError
from evomerge.optimize._option_types import check_option_types
from evomerge.optimize.base import Optimizer, register

__all__ = [
    "SamplerOptimizer",
    "TPEOptimizer",
    "NSGAIIOptimizer",
    "NSGAIIIOptimizer",
    "GPOptimizer",
    "CmaEsSamplerOptimizer",
    "RandomOptimizer",
]


class SamplerOptimizer(Optimizer):
    """An Optuna sampler behind the :class:`Optimizer` protocol; subclasses name the sampler."""

    sampler_cls: ClassVar[type[optuna.samplers.BaseSampler]]
    #: An extra package the sampler imports lazily (checked up front, not at the first ask).
    requires: ClassVar[str | None] = None

    def _configure(self, options: dict[str, Any]) -> None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            raise ConfigError(
                f"optimizer {self.name!r} needs the {self.requires!r} package: "
                f"pip install {self.requires}, or pick another optimizer"
            )
        self._options = check_option_types(f"optimizer {self.name!r}", self.sampler_cls.__init__, options)
        self._sampler = self._make_sampler(self.seed)

    @classmethod
    def option_names(cls) -> frozenset[str]:
        params = inspect.signature(cls.sampler_cls.__init__).parameters.values()
        # The run's seed is the sampler's seed; it is not an option of its own.
        return frozenset(
            p.name
            for p in params
            if p.name not in ("self", "seed") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )

    def _make_sampler(self, seed: int | None) -> optuna.samplers.BaseSampler:
        try:
            with warnings.catch_warnings():
                # NSGA-III and friends are "experimental" in Optuna: chosen on purpose here.
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return self.sampler_cls(seed=seed, **self._options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"optimizer {self.name!r}: bad option value: {exc}") from None

    def sampler(self) -> optuna.samplers.BaseSampler:
        return self._sampler

    def ask(self, study: optuna.Study, max_trials: int) -> list[Trial]:
        self._check_study(study)
        if study.sampler is not self._sampler:
            # Otherwise another sampler would silently do the proposing.
            raise ValueError(
                f"the study's sampler is not optimizer {self.name!r}'s: "
                "create or load the study with sampler=optimizer.sampler()"
            )
        trials = [study.ask(self.distributions) for _ in range(max(0, max_trials))]
        self._pending.update((t.number, t) for t in trials)
        return trials

    def restore(self, study: optuna.Study) -> None:
        """Rebuild the ideal point; reseed so a resumed run does not replay its first draws.

        Optuna's samplers keep their history in the study; only their random state
        would repeat. The new seed derives from the run's seed and the number of trials,
        so a resume stays reproducible. The study's sampler is swapped in place.
        """
        super().restore(study)
        if self.seed is not None and study.trials:
            seed = int(np.random.SeedSequence([self.seed, len(study.trials)]).generate_state(1)[0])
            if study.sampler is self._sampler:
                study.sampler = self._sampler = self._make_sampler(seed)
            else:
                self._sampler = self._make_sampler(seed)


@register
class TPEOptimizer(SamplerOptimizer):
    """Tree-structured Parzen estimator (:class:`optuna.samplers.TPESampler`); MOTPE for several objectives."""

    name = "tpe"
    sampler_cls = optuna.samplers.TPESampler
    supports_multi_objective = True


@register
class NSGAIIOptimizer(SamplerOptimizer):
    """NSGA-II genetic algorithm (:class:`optuna.samplers.NSGAIISampler`)."""

    name = "nsga2"
    sampler_cls = optuna.samplers.NSGAIISampler
    supports_multi_objective = True


@register
class NSGAIIIOptimizer(SamplerOptimizer):
    """NSGA-III with reference points (:class:`optuna.samplers.NSGAIIISampler`), for many objectives."""

    name = "nsga3"
    sampler_cls = optuna.samplers.NSGAIIISampler
    supports_multi_objective = True


@register
class GPOptimizer(SamplerOptimizer):
    """Gaussian-process Bayesian optimization (:class:`optuna.samplers.GPSampler`); logEHVI for several."""

    name = "gp"
    sampler_cls = optuna.samplers.GPSampler
    supports_multi_objective = True


@register
class CmaEsSamplerOptimizer(SamplerOptimizer):
    """Optuna's own CMA-ES (:class:`optuna.samplers.CmaEsSampler`, needs ``cmaes``); one objective.

    Unlike ``cma`` it tells the ES trial by trial, so it keeps every slot busy.
    """

    name = "cmaes"
    sampler_cls = optuna.samplers.CmaEsSampler
    supports_multi_objective = False
    requires = "cmaes"


@register
class RandomOptimizer(SamplerOptimizer):
    """Independent uniform sampling (:class:`optuna.samplers.RandomSampler`): a baseline."""

    name = "random"
    sampler_cls = optuna.samplers.RandomSampler
    supports_multi_objective = True

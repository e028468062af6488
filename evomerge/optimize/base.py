"""The Optimizer protocol: ask candidates from, and tell scores to, an Optuna study.

Every trial of a search lives in one Optuna study, whatever proposes it. An
:class:`Optimizer` is a thin layer over that study in the style of Optuna's samplers:
it says which directions the study has and which sampler it is created with, asks
new trials (:meth:`Optimizer.ask`) and tells their scores (:meth:`Optimizer.tell`).
Algorithms with state of their own (pycma's CMA-ES) keep it in the study too (see
:mod:`evomerge.optimize._state`), so a search resumes from its storage alone, and each
optimizer knows how to recover the trials a crash left running (:meth:`Optimizer.recover`).

Objectives are named metrics with a direction. Optimizers that handle several
objectives record all of them in the study; single-objective ones see a declared
:class:`Scalarization` of them (always *higher is better*), and each trial keeps its
raw scores in its record (:mod:`evomerge.record`: ``scores``, or ``screen_scores`` for
a PRUNED trial), where :meth:`Optimizer.recorded_scores` finds them again.

Example:
    >>> import optuna
    >>> from optuna.distributions import FloatDistribution
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> space = {"x": FloatDistribution(-1.0, 1.0), "y": FloatDistribution(-1.0, 1.0)}
    >>> objectives = [Objective("acc", "maximize"), Objective("size", "minimize")]
    >>> opt = build_optimizer("random", space, objectives, seed=0)
    >>> study = optuna.create_study(directions=opt.directions(), sampler=opt.sampler())
    >>> for trial in opt.ask(study, 4):
    ...     x, y = trial.params["x"], trial.params["y"]
    ...     opt.tell(study, trial, [1 - x * x, abs(y)])
    >>> len(study.best_trials) >= 1, opt.directions()
    (True, ['maximize', 'minimize'])
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge import record
from evomerge.errors import ConfigError
from evomerge.objective import Direction, Objective  # re-exported: part of this protocol

__all__ = [
    "Direction",
    "Objective",
    "Scalarization",
    "Optimizer",
    "OPTIMIZERS",
    "register",
    "build_optimizer",
]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scalarization:
    """A declared way to fold several objectives into one value where higher is better.

    ``weighted_sum``: ``sum_i w_i * f_i``; ``chebyshev``: ``-max_i w_i * (z_i - f_i)``,
    where ``f_i = sign_i * score_i`` (minimized objectives are negated) and ``z`` is the
    ideal point, sign-adjusted the same way. ``reference`` fixes ``z`` (in the metrics'
    own units); with ``reference=None`` the caller passes the best score seen so far per
    objective as ``ideal``. The difference is taken without ``abs`` so that beating the
    reference still counts as better: the value is monotone in every objective.
    Weights carry the objectives' scales; nothing is normalized behind the user's back.

    Example:
        >>> objs = [Objective("acc", "maximize"), Objective("loss", "minimize")]
        >>> round(Scalarization("weighted_sum", (1.0, 0.5))([0.8, 2.0], objs), 12)
        -0.2
        >>> Scalarization("chebyshev", (1.0, 0.5), reference=(1.0, 1.0))([0.8, 2.0], objs)
        -0.5
    """

    kind: Literal["weighted_sum", "chebyshev"]
    weights: tuple[float, ...]
    reference: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("weighted_sum", "chebyshev"):
            raise ConfigError(
                f"scalarization kind {self.kind!r} is unknown: expected 'weighted_sum' or 'chebyshev'"
            )
        # Accept lists from YAML; store tuples so the dataclass stays hashable.
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if self.reference is not None:
            object.__setattr__(self, "reference", tuple(float(r) for r in self.reference))
        for i, w in enumerate(self.weights):
            if not math.isfinite(w) or w < 0:
                raise ConfigError(
                    f"scalarization weight {w} (position {i}) is invalid: weights must be finite and >= 0"
                )
        if self.weights and not any(self.weights):
            raise ConfigError("scalarization weights are all zero: at least one must be > 0")
        if self.reference is not None:
            if self.kind != "chebyshev":
                raise ConfigError("scalarization reference is only used by 'chebyshev', not 'weighted_sum'")
            if len(self.reference) != len(self.weights):
                raise ConfigError(
                    f"scalarization reference has {len(self.reference)} values for "
                    f"{len(self.weights)} weights: give one per objective"
                )

    def __call__(
        self,
        scores: Sequence[float],
        objectives: Sequence[Objective],
        ideal: Sequence[float] | None = None,
    ) -> float:
        """The scalarized value of ``scores`` (one per objective); higher is better."""
        if not (len(scores) == len(objectives) == len(self.weights)):
            raise ValueError(
                f"{len(scores)} scores, {len(objectives)} objectives and {len(self.weights)} weights"
            )
        f = [o.sign * float(s) for o, s in zip(objectives, scores)]
        if self.kind == "weighted_sum":
            return float(sum(w * fi for w, fi in zip(self.weights, f)))
        z_raw = self.reference if self.reference is not None else ideal
        if z_raw is None:
            raise ValueError("chebyshev scalarization needs a reference or an ideal point")
        z = [o.sign * float(v) for o, v in zip(objectives, z_raw)]
        return -float(max(w * (zi - fi) for w, zi, fi in zip(self.weights, z, f)))


class Optimizer(ABC):
    """Proposes trials of an Optuna study and learns from their scores.

    Subclasses set :attr:`name` and :attr:`supports_multi_objective`, implement
    :meth:`sampler`, :meth:`ask` and :meth:`option_names`, and may hook
    :meth:`_after_tell`. The study is created with ``directions=optimizer.directions()``
    and ``sampler=optimizer.sampler()``; the driver then loops ``ask`` -> evaluate ->
    ``tell``. After loading an existing study, call :meth:`restore` once.

    Values recorded in the study: with no scalarization, each objective's raw score
    under its own direction; with a scalarization, one ``maximize`` value.
    """

    name: ClassVar[str]
    supports_multi_objective: ClassVar[bool] = False

    def __init__(
        self,
        distributions: Mapping[str, BaseDistribution],
        objectives: Sequence[Objective],
        *,
        scalarization: Scalarization | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> None:
        self.distributions: dict[str, BaseDistribution] = dict(distributions)
        self.objectives: list[Objective] = list(objectives)
        self.scalarization = scalarization
        self.seed = seed
        self._check_setup(options)
        # Best raw score seen per objective (COMPLETE trials only): chebyshev's ideal point.
        self._ideal: list[float] | None = None
        # Trials handed out by this instance and not told yet, by number.
        self._pending: dict[int, Trial] = {}
        self._configure(dict(options))

    def _configure(self, options: dict[str, Any]) -> None:
        """Subclasses read their (already name-checked) options here instead of overriding ``__init__``."""

    # ------------------------------------------------------------------ protocol

    @classmethod
    @abstractmethod
    def option_names(cls) -> frozenset[str]:
        """Names of the options this optimizer accepts as keyword arguments."""

    @abstractmethod
    def sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler to create or load the study with."""

    @abstractmethod
    def ask(self, study: optuna.Study, max_trials: int) -> list[Trial]:
        """Up to ``max_trials`` new RUNNING trials, WAITING (enqueued) trials first.

        Every returned trial has all of :attr:`distributions` suggested. May return
        fewer, even none, when the algorithm waits for results in flight.
        """

    @property
    def finished(self) -> bool:
        """True once the algorithm has nothing more to propose (e.g. CMA-ES out of restarts).

        A finished optimizer still hands out WAITING trials; the driver stops when
        ``ask`` returns nothing and no trial is in flight.
        """
        return False

    def directions(self) -> list[Direction]:
        """The study's directions: the objectives' own, or ``["maximize"]`` when scalarized."""
        if self.scalarization is not None:
            return ["maximize"]
        return [o.direction for o in self.objectives]

    def study_values(self, scores: Sequence[float]) -> list[float]:
        """The values ``study.tell`` records for these per-objective scores."""
        scores = self._check_scores(scores)
        if self.scalarization is None:
            return scores
        return [self.scalarization(scores, self.objectives, self._ideal_with(scores))]

    def scalar_value(self, scores: Sequence[float]) -> float:
        """One higher-is-better value for these scores: the scalarization, or the signed score."""
        scores = self._check_scores(scores)
        if self.scalarization is not None:
            return self.scalarization(scores, self.objectives, self._ideal_with(scores))
        if len(self.objectives) != 1:
            raise ValueError(f"{len(self.objectives)} objectives and no scalarization: no single value")
        return self.objectives[0].sign * scores[0]

    def tell(
        self,
        study: optuna.Study,
        trial: Trial | FrozenTrial | int,
        scores: Sequence[float] | None,
        state: TrialState = TrialState.COMPLETE,
        *,
        recorded: bool = False,
    ) -> None:
        """Record a finished trial in the study and let the algorithm learn from it.

        ``scores`` are per-objective values in :attr:`objectives` order, ``None`` for a
        failed trial; for a PRUNED trial they are optional low-fidelity screening scores.
        A COMPLETE trial without finite scores is recorded as FAIL (Optuna would do the
        same for NaN) so that the algorithm sees one consistent outcome. ``recorded``
        says the caller already wrote the scores into the trial's record (the driver
        writes every metric); otherwise the objectives' scores are written here.
        """
        number = trial if isinstance(trial, int) else trial.number
        if state not in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            raise ValueError(f"cannot tell trial {number} with state {state.name}")
        values = None if scores is None else self._check_scores(scores)
        if values is not None and not all(math.isfinite(v) for v in values):
            if state == TrialState.COMPLETE:
                _logger.warning("trial %d: non-finite scores %s, recorded as FAIL", number, values)
                state = TrialState.FAIL
            values = None
        if state == TrialState.COMPLETE and values is None:
            state = TrialState.FAIL
        if state == TrialState.FAIL:
            values = None

        handle = self._pending.pop(number, None)
        if values is not None and not recorded:
            # Raw scores go into the record before the trial is finished (after that
            # Optuna refuses writes): the study keeps every objective even when it records
            # one scalarized value, and a restore can recompute what the algorithm saw.
            if handle is None:
                handle = _trial_handle(study, number)
            key = "scores" if state == TrialState.COMPLETE else "screen_scores"
            record.write(handle, **{key: {o.metric: v for o, v in zip(self.objectives, values)}})
        study_values = self.study_values(values) if state == TrialState.COMPLETE else None
        # A FrozenTrial (from study.trials) is told by number; Optuna takes Trial or int.
        study.tell(trial if isinstance(trial, Trial) else number, values=study_values, state=state)
        if state == TrialState.COMPLETE:
            self._observe(values)
        self._after_tell(study, number, values, state)

    def restore(self, study: optuna.Study) -> None:
        """Bring a new optimizer in line with an existing (loaded) study, before asking.

        The base version rebuilds the ideal point from the trials' recorded scores;
        stateful optimizers also load their saved state and replay what the study holds.
        """
        self._pending.clear()
        for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            scores = self.recorded_scores(ft)
            if scores is not None:
                self._observe(scores)

    def recover(self, study: optuna.Study) -> int:
        """Trials a crash left RUNNING are failed and their candidates asked again.

        This version enqueues each one's params (a baseline stays a baseline); optimizers
        that re-ask lost candidates themselves on :meth:`restore` override it. Call it
        before :meth:`restore`. Returns how many trials were recovered.
        """
        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in stale:
            study.tell(t.number, state=TrialState.FAIL)
            if self._asks_again(t):
                continue
            baseline = record.get(t, "baseline")
            attrs = {"requeued_from": t.number, **({"baseline": baseline} if baseline is not None else {})}
            study.enqueue_trial(t.params, user_attrs=attrs)
        return len(stale)

    def _asks_again(self, trial: FrozenTrial) -> bool:
        """True when :meth:`restore` asks this crashed trial's candidate again by itself."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """A picklable snapshot of what the optimizer keeps outside the study."""
        return {"ideal": None if self._ideal is None else list(self._ideal)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Load a snapshot made by :meth:`state_dict`."""
        ideal = state.get("ideal")
        self._ideal = None if ideal is None else list(ideal)

    # ------------------------------------------------------------------ helpers

    def recorded_scores(self, ft: FrozenTrial) -> list[float] | None:
        """The raw per-objective scores a finished trial carries, if they can be found."""
        found = record.objective_values(ft, self.objectives)
        if found is not None:
            return found
        # A study written without the attribute: unscalarized values are the scores.
        if (
            ft.state == TrialState.COMPLETE
            and self.scalarization is None
            and ft.values is not None
            and len(ft.values) == len(self.objectives)
        ):
            return [float(v) for v in ft.values]
        return None

    def _after_tell(
        self, study: optuna.Study, number: int, scores: list[float] | None, state: TrialState
    ) -> None:
        """Hook for algorithms that learn outside the study; the study is already told."""

    def _observe(self, scores: Sequence[float]) -> None:
        self._ideal = self._ideal_with(scores)

    def _ideal_with(self, scores: Sequence[float]) -> list[float]:
        if self._ideal is None:
            return list(scores)
        best = [max if o.direction == "maximize" else min for o in self.objectives]
        return [pick(a, b) for pick, a, b in zip(best, self._ideal, scores)]

    def _check_scores(self, scores: Sequence[float]) -> list[float]:
        values = [float(s) for s in scores]
        if len(values) != len(self.objectives):
            raise ValueError(f"{len(values)} scores for {len(self.objectives)} objectives")
        return values

    def _check_study(self, study: optuna.Study) -> None:
        got = [d.name.lower() for d in study.directions]
        if got != self.directions():
            raise ConfigError(
                f"the study's directions {got} do not match optimizer {self.name!r}'s "
                f"{self.directions()}: were the objectives or the scalarization changed?"
            )

    def _check_setup(self, options: Mapping[str, Any]) -> None:
        if not self.distributions:
            raise ConfigError(f"optimizer {self.name!r}: the search space has no parameters")
        if not self.objectives:
            raise ConfigError(f"optimizer {self.name!r}: no objective was given")
        metrics = [o.metric for o in self.objectives]
        for m in metrics:
            if metrics.count(m) > 1:
                raise ConfigError(f"objective {m!r} is listed more than once")
        n = len(self.objectives)
        if self.scalarization is None:
            if n > 1 and not self.supports_multi_objective:
                raise ConfigError(
                    f"optimizer {self.name!r} optimizes one objective; {n} objectives were given: "
                    "add a scalarization (weighted_sum or chebyshev)"
                )
        elif len(self.scalarization.weights) != n:
            raise ConfigError(
                f"scalarization has {len(self.scalarization.weights)} weights for {n} objectives "
                f"({', '.join(metrics)}): give one weight per objective"
            )
        self.check_option_names(options)

    @classmethod
    def check_option_names(cls, options: Mapping[str, Any]) -> None:
        """Raise a one-line ConfigError for the first option this optimizer does not take."""
        known = cls.option_names()
        for key in options:
            if key not in known:
                raise ConfigError(
                    f"optimizer {cls.name!r} has no option {key!r}; its options are: "
                    f"{', '.join(sorted(known)) or '(none)'}"
                )


def _trial_handle(study: optuna.Study, number: int) -> Trial:
    """A live :class:`~optuna.trial.Trial` for a trial number (to set user attributes).

    Optuna has no public number -> Trial lookup; these two storage calls are the ones
    its own ``study.tell`` uses.
    """
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return Trial(study, trial_id)


OPTIMIZERS: dict[str, type[Optimizer]] = {}
"""Registry: optimizer name -> class. Filled by :func:`register` as modules import."""

_O = TypeVar("_O", bound=type[Optimizer])


def register(cls: _O) -> _O:
    """Class decorator: add an optimizer to :data:`OPTIMIZERS` under its ``name``."""
    if cls.name in OPTIMIZERS and OPTIMIZERS[cls.name] is not cls:
        raise ValueError(f"optimizer name {cls.name!r} is registered twice")
    OPTIMIZERS[cls.name] = cls
    return cls


def build_optimizer(
    name: str,
    distributions: Mapping[str, BaseDistribution],
    objectives: Sequence[Objective],
    *,
    scalarization: Scalarization | None = None,
    seed: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> Optimizer:
    """Build the optimizer ``name`` from the registry; a bad setup raises one-line ConfigError.

    Example:
        >>> from optuna.distributions import FloatDistribution
        >>> build_optimizer("nope", {"x": FloatDistribution(0, 1)}, [Objective("a", "maximize")])
        Traceback (most recent call last):
        ...
        evomerge.errors.ConfigError: unknown optimizer 'nope': expected one of cma, cmaes, gp, nsga2, nsga3, random, tpe
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown optimizer {name!r}: expected one of {', '.join(sorted(OPTIMIZERS))}")
    # Checked here too: an option named like a keyword below (seed) would be a TypeError.
    cls.check_option_names(options or {})
    return cls(
        distributions,
        objectives,
        scalarization=scalarization,
        seed=seed,
        **dict(options or {}),
    )

"""CMA-ES by pycma (the ``cma`` package), asked and told one whole generation at a time.

pycma searches the unit cube (see :mod:`evomerge.optimize._unit_cube`); each
candidate of a generation becomes one trial, enqueued with its exact parameters and
the user attributes ``cma_generation`` (counted across restarts), ``cma_index`` and
``cma_restart``. A generation's candidates are handed out over as many
:meth:`CmaOptimizer.ask` calls as the driver's free slots allow, and ``ask`` returns
nothing more until every one of them is told; then pycma is told the whole
generation at once. No evaluation is discarded and generations never mix: with
population size P, after G generations exactly G*P candidate trials exist.

Outcomes pycma sees (it minimizes, so it is given the negated value):

- COMPLETE: the scalarized value of the scores (or the signed score of the one objective).
- PRUNED: the scalarized screening scores when given, else the penalty.
- FAIL: the penalty: option ``penalty`` if set, else the worst value seen so far
  (this generation included) minus 1; -1.0 when nothing has succeeded yet. CMA-ES only
  ranks values, so any value below the worst means "worst of all".

Restarts (IPOP): when pycma's stop criteria fire and restarts remain, a new ES starts
from a uniformly random point of the cube with twice the previous population size.
Without restarts left the optimizer is :attr:`~CmaOptimizer.finished`.

State: after every generation (and before the first) the ES, its random generator and
the counters are pickled into the study's system attributes (as Optuna's own
CmaEsSampler keeps its ES; see :mod:`evomerge.optimize._state`), so a search resumes
from its storage alone, on any machine. pycma draws from a
``numpy.random.RandomState`` of our own (option ``randn``), pickled with the ES, so a
restored optimizer asks exactly the candidates the uninterrupted one would have.
:meth:`CmaOptimizer.restore` loads that state and replays the study: for each
generation from the saved one on, trials whose ``cma_*`` attributes and parameters
match a candidate and that finished COMPLETE or PRUNED are reused as its evaluation;
candidates without one (FAIL, RUNNING or WAITING at the crash, never asked) are asked
again as new trials with identical parameters. A FAIL is tried again because an
interrupted evaluation looks the same as a broken one in the study. Stale RUNNING
trials are failed by :meth:`CmaOptimizer.recover` (called before ``restore``), which
enqueues nothing: the replay asks their candidates again. While running, telling a
candidate FAIL through the optimizer is a real failure: it gets the penalty.

Enqueued WAITING trials (baselines) are always asked first; their scores are
recorded in the study but not given to pycma (they are not samples of its
distribution), though they count for the "worst seen" penalty and the ideal point.

Example:
    >>> import optuna
    >>> from optuna.distributions import FloatDistribution
    >>> from evomerge.optimize import Objective
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> space = {f"w{i}": FloatDistribution(0.0, 1.0) for i in range(3)}
    >>> opt = CmaOptimizer(space, [Objective("loss", "minimize")], seed=1, popsize=6)
    >>> study = optuna.create_study(directions=opt.directions(), sampler=opt.sampler())
    >>> first = opt.ask(study, 4)                 # 4 free slots: 4 of the 6 candidates
    >>> len(first), len(opt.ask(study, 4))        # then the other 2
    (4, 2)
    >>> opt.ask(study, 4)                         # generation in flight: wait
    []
    >>> for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
    ...     opt.tell(study, t.number, [sum((v - 0.3) ** 2 for v in t.params.values())])
    >>> opt.generation, len(opt.ask(study, 10))
    (1, 6)
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from typing import Any, ClassVar, Mapping

import numpy as np
import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

from evomerge.errors import ConfigError
from evomerge.optimize._state import load_state, save_state
from evomerge.optimize._unit_cube import UnitCube
from evomerge.optimize.base import Optimizer, register


def _cma() -> Any:
    """pycma, imported when a CMA-ES optimizer is used (it takes seconds to import: not
    paid by every run and every command that only registers the optimizers)."""
    import cma

    return cma

__all__ = ["CmaOptimizer"]

_logger = logging.getLogger(__name__)

_STATE_VERSION = 1

# Options of our own (in unit-cube terms) and pycma options we set ourselves.
_OWN_OPTIONS = frozenset({"x0", "sigma0", "popsize", "restarts", "penalty"})
_MANAGED_PYCMA = frozenset({"bounds", "randn", "seed", "popsize", "x0", "sigma0"})
# Quiet by default: pycma otherwise prints and writes outcmaes/ into the working directory.
_QUIET = {"verbose": -9, "verb_log": 0, "verb_disp": 0}
# Trials reused per candidate on replay, best first. FAIL is not reused: an interrupted
# evaluation looks the same as a broken one, and trying a failure again costs little.
_STATE_RANK = {TrialState.COMPLETE: 0, TrialState.PRUNED: 1}


@register
class CmaOptimizer(Optimizer):
    """CMA-ES (pycma) over the unit cube, whole generations at a time, with IPOP restarts.

    Options:
        x0: dict of parameter values to start from (missing ones: the cube centre).
        sigma0: initial step size in unit-cube scale (default 0.25).
        popsize: population size P (default pycma's ``4 + floor(3 ln d)``).
        restarts: IPOP restarts with doubled population when pycma stops (default 9:
            accuracy-like scores plateau and trip pycma's flat-fitness stop early).
        penalty: scalarized value given to failed trials (default: worst seen - 1).
        anything in ``cma.CMAOptions()`` except bounds, randn, seed: passed to pycma.
    """

    name: ClassVar[str] = "cma"
    supports_multi_objective: ClassVar[bool] = False

    def _configure(self, options: dict[str, Any]) -> None:
        self._cube = UnitCube(self.distributions, owner=self.name)
        if self._cube.dim < 2:
            # pycma's covariance adaptation is meaningless in 1-D and it warns on every step.
            raise ConfigError(
                f"optimizer 'cma' needs at least 2 parameters; the search space has {self._cube.dim}: "
                "use 'tpe' or 'gp' for it"
            )
        self._x0 = self._parse_x0(options.get("x0"))
        self._sigma0 = self._positive("sigma0", options.get("sigma0", 0.25))
        popsize = options.get("popsize")
        self._restarts = self._whole("restarts", options.get("restarts", 9), least=0)
        penalty = options.get("penalty")
        self._penalty: float | None = None if penalty is None else self._number("penalty", penalty)
        self._pycma_opts = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}

        # pycma would otherwise draw from numpy's global RNG: keep our own, pickled with the ES.
        self._rng = np.random.RandomState(self.seed)
        if popsize is not None:
            popsize = self._whole("popsize", popsize, least=2)
        self._check_pycma_values(popsize)
        self._es = self._new_es(self._x0, popsize)
        self._popsize0: int = int(self._es.popsize)
        self._generation = 0  # generations told so far, across restarts
        self._restart = 0
        self._finished = False
        self._stop_reasons: list[dict[str, Any]] = []
        self._worst: float | None = None  # lowest scalar value seen (for the default penalty)
        self.last_values: list[float] | None = None  # what the last generation was told (higher is better)
        self._sampler: optuna.samplers.BaseSampler | None = None
        self._study: optuna.Study | None = None  # where the state is saved: the study last asked or told
        self._reset_generation()

    # ------------------------------------------------------------------ options

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return _OWN_OPTIONS | (frozenset(_cma().CMAOptions()) - _MANAGED_PYCMA)

    @staticmethod
    def _number(key: str, value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(f"optimizer 'cma': option {key} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"optimizer 'cma': option {key} must be a number, got {value!r}") from None

    @classmethod
    def _positive(cls, key: str, value: Any) -> float:
        v = cls._number(key, value)
        if not v > 0:
            raise ConfigError(f"optimizer 'cma': option {key} must be > 0, got {value!r}")
        return v

    @classmethod
    def _whole(cls, key: str, value: Any, *, least: int) -> int:
        v = cls._number(key, value)
        if not np.isfinite(v) or v != int(v):
            raise ConfigError(f"optimizer 'cma': option {key} must be a whole number, got {value!r}")
        if v < least:
            raise ConfigError(f"optimizer 'cma': option {key} must be >= {least}, got {value!r}")
        return int(v)

    def _check_pycma_values(self, popsize: int | None) -> None:
        """A pycma option whose default is a number must be one: pycma fails on it mid-search."""
        dim = self._cube.dim
        loc = {"N": dim, "dim": dim, "popsize": popsize or 4 + int(3 * math.log(dim))}
        defaults = _cma().CMAOptions()
        for key, given in self._pycma_opts.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "'x' is not a safe string": the error below says it
                    default = defaults.eval(key, loc=loc)
                    value = _cma().CMAOptions({key: given}).eval(key, loc=loc)
            except Exception:  # noqa: BLE001 - an expression pycma itself cannot read: left to pycma
                continue
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and not isinstance(value, (int, float)):
                raise ConfigError(f"optimizer 'cma': option {key} must be a number (pycma's default is {default:g}), got {given!r}")

    def _parse_x0(self, x0: Any) -> np.ndarray:
        if x0 is None:
            return np.full(self._cube.dim, 0.5)
        if not isinstance(x0, Mapping):
            raise ConfigError(f"optimizer 'cma': option x0 must map parameter names to values, got {x0!r}")
        for name, value in x0.items():
            if name not in self.distributions:
                raise ConfigError(f"optimizer 'cma': option x0 names {name!r}, which is not a search parameter")
            if not self._cube.contains(name, value):
                raise ConfigError(
                    f"optimizer 'cma': option x0 value {value!r} for {name!r} is outside {self.distributions[name]}"
                )
        return self._cube.to_unit(x0)

    def _new_es(self, x0: np.ndarray, popsize: int | None) -> Any:
        opts: dict[str, Any] = {**_QUIET, **self._pycma_opts}
        opts.update(bounds=[0.0, 1.0], randn=self._rng.randn, seed=np.nan)
        if popsize is not None:
            opts["popsize"] = popsize
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pycma warns about harmless option combinations
                return _cma().CMAEvolutionStrategy(list(x0), self._sigma0, opts)
        except Exception as exc:  # pycma raises assorted types for bad option values
            raise ConfigError(f"optimizer 'cma': invalid pycma options {self._pycma_opts}: {exc}") from None

    # ------------------------------------------------------------------ protocol

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def generation(self) -> int:
        """Number of generations told to pycma so far (all restarts)."""
        return self._generation

    @property
    def restart(self) -> int:
        """Index of the current IPOP restart (0 for the first ES)."""
        return self._restart

    @property
    def popsize(self) -> int:
        """Population size of the current ES."""
        return int(self._es.popsize)

    @property
    def stop_reasons(self) -> list[dict[str, Any]]:
        """pycma's termination conditions, one dict per ES that stopped."""
        return list(self._stop_reasons)

    def sampler(self) -> optuna.samplers.BaseSampler:
        # Only fills parameters an enqueued baseline leaves out; candidates are fixed params.
        if self._sampler is None:
            self._sampler = optuna.samplers.RandomSampler(seed=self.seed)
        return self._sampler

    def ask(self, study: optuna.Study, max_trials: int) -> list[Trial]:
        self._check_study(study)
        self._study = study
        out: list[Trial] = []
        while len(out) < max_trials:
            if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                trial = study.ask(self.distributions)
                self._adopt(trial)
                out.append(trial)
                continue
            if self._finished:
                break
            if self._X is None:
                self._start_generation()
            index = self._next_unasked()
            if index is None:
                break  # the whole generation is in flight: wait for it
            attrs = {"cma_generation": self._generation, "cma_index": index, "cma_restart": self._restart}
            # Nothing else is WAITING (checked above), so study.ask pops exactly this trial.
            study.enqueue_trial(self._cube.to_params(self._X[index]), user_attrs=attrs)
            trial = study.ask(self.distributions)
            if trial.user_attrs.get("cma_index") != index:
                raise RuntimeError(f"trial {trial.number} is not the enqueued CMA candidate {index}")
            self._bind(index, trial.number)
            self._pending[trial.number] = trial
            out.append(trial)
        return out

    def _after_tell(
        self, study: optuna.Study, number: int, scores: list[float] | None, state: TrialState
    ) -> None:
        self._study = study
        index = self._index_of.get(number)
        if index is None:
            # A baseline, or a trial asked before a restore: in the study, not in the ES.
            if scores is not None:
                self._see(self.scalar_value(scores))
            return
        self._results[index] = (state, scores, None)
        if len(self._results) == len(self._X):
            self._finish_generation()

    # ------------------------------------------------------------------ generations

    def _reset_generation(self) -> None:
        self._X: list[np.ndarray] | None = None
        self._trial_of: dict[int, int] = {}  # candidate index -> trial number
        self._index_of: dict[int, int] = {}  # trial number -> candidate index
        # candidate index -> (state, scores, scalar value when scores cannot be recomputed)
        self._results: dict[int, tuple[TrialState, list[float] | None, float | None]] = {}

    def _start_generation(self) -> None:
        if self._generation == 0 and self._restart == 0:
            self._save()  # so a crash in generation 0 can still reuse its evaluations
        self._X = [np.array(x, dtype=float) for x in self._es.ask()]

    def _next_unasked(self) -> int | None:
        assert self._X is not None
        for i in range(len(self._X)):
            if i not in self._trial_of:
                return i
        return None

    def _bind(self, index: int, number: int) -> None:
        self._trial_of[index] = number
        self._index_of[number] = index

    def _adopt(self, trial: Trial) -> None:
        """Take a popped WAITING trial as a current candidate if it is one (crash leftover)."""
        attrs = trial.user_attrs
        if self._finished or attrs.get("cma_generation") != self._generation:
            return
        if self._X is None:
            self._start_generation()
        assert self._X is not None
        index = attrs.get("cma_index")
        if attrs.get("cma_restart") == self._restart and index in range(len(self._X)):
            if index not in self._trial_of and self._matches(index, trial.params):
                self._bind(index, trial.number)
                self._pending[trial.number] = trial

    def _matches(self, index: int, params: Mapping[str, Any]) -> bool:
        assert self._X is not None
        want = self._cube.to_params(self._X[index])
        return all(name in params and np.isclose(params[name], v, rtol=1e-12, atol=1e-12) for name, v in want.items())

    def _value(self, state: TrialState, scores: list[float] | None, scalar: float | None) -> float | None:
        if scalar is not None:
            return scalar
        if scores is not None and state in (TrialState.COMPLETE, TrialState.PRUNED):
            return self.scalar_value(scores)
        return None

    def _see(self, value: float) -> None:
        self._worst = value if self._worst is None else min(self._worst, value)

    def _finish_generation(self) -> None:
        assert self._X is not None
        values = [self._value(*self._results[i]) for i in range(len(self._X))]
        for v in values:
            if v is not None:
                self._see(v)
        if self._penalty is not None:
            penalty = self._penalty
        else:
            penalty = -1.0 if self._worst is None else self._worst - 1.0
        told = [penalty if v is None else v for v in values]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. pycma's flat-fitness notice
            self._es.tell(self._X, [-v for v in told])  # pycma minimizes
        self.last_values = told
        self._generation += 1
        self._reset_generation()
        stop = dict(self._es.stop())
        if stop:
            self._stop_reasons.append(stop)
            if self._restart < self._restarts:
                self._restart += 1
                x0 = self._rng.uniform(0.0, 1.0, self._cube.dim)
                self._es = self._new_es(x0, self._popsize0 * 2**self._restart)
                _logger.info("cma: %s; restart %d with popsize %d", stop, self._restart, self._es.popsize)
            else:
                self._finished = True
                _logger.info("cma: %s; no restarts left", stop)
        self._save()

    # ------------------------------------------------------------------ state

    def _fingerprint(self) -> dict[str, Any]:
        # What must be equal for a saved ES to mean the same thing in this optimizer.
        return {
            "space": [(n, repr(d)) for n, d in self.distributions.items()],
            "objectives": [(o.metric, o.direction) for o in self.objectives],
            "scalarization": repr(self.scalarization),
        }

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the ES (with its RNG) and counters at the last generation boundary."""
        state = {
            **super().state_dict(),
            "version": _STATE_VERSION,
            "fingerprint": self._fingerprint(),
            # One deepcopy for both keeps the ES's randn bound to this very RNG.
            "es_rng": (self._es, self._rng),
            "popsize0": self._popsize0,
            "generation": self._generation,
            "restart": self._restart,
            "finished": self._finished,
            "stop_reasons": self._stop_reasons,
            "worst": self._worst,
            "last_values": self.last_values,
        }
        return copy.deepcopy(state)

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` snapshot (a generation boundary)."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"cma state has version {state.get('version')!r}, expected {_STATE_VERSION}")
        if state["fingerprint"] != self._fingerprint():
            raise ConfigError(
                "cma state was saved for another search space, objectives or scalarization: "
                "start a new run instead of resuming this one"
            )
        state = copy.deepcopy(dict(state))
        super().load_state(state)
        self._es, self._rng = state["es_rng"]
        self._popsize0 = state["popsize0"]
        self._generation = state["generation"]
        self._restart = state["restart"]
        self._finished = state["finished"]
        self._stop_reasons = list(state["stop_reasons"])
        self._worst = state["worst"]
        self.last_values = state["last_values"]
        self._reset_generation()

    def _save(self) -> None:
        if self._study is not None:
            save_state(self._study, self.state_dict(), label=self._generation)

    def _asks_again(self, trial: FrozenTrial) -> bool:
        # The replay in restore asks a lost candidate of the ES again; a baseline is enqueued.
        return "cma_generation" in trial.user_attrs

    def restore(self, study: optuna.Study) -> None:
        """Load the state saved in the study (if any) and replay its finished candidates."""
        self._study = study
        saved = load_state(study)
        if saved is not None:
            self.load_state(saved)
        else:
            self._reset_generation()
        super().restore(study)  # ideal point from every recorded score
        self._replay(study)

    def _replay(self, study: optuna.Study) -> None:
        finished: dict[tuple[int, int, int], FrozenTrial] = {}
        for ft in study.get_trials(deepcopy=False, states=tuple(_STATE_RANK)):
            a = ft.user_attrs
            if "cma_generation" not in a or a["cma_generation"] < self._generation:
                continue
            key = (a["cma_generation"], a.get("cma_restart", 0), a.get("cma_index", -1))
            if key not in finished or _STATE_RANK[ft.state] < _STATE_RANK[finished[key].state]:
                finished[key] = ft
        while finished and not self._finished:
            self._start_generation()
            assert self._X is not None
            for index in range(len(self._X)):
                ft = finished.get((self._generation, self._restart, index))
                if ft is None:
                    continue
                if not self._matches(index, ft.params):
                    _logger.warning(
                        "cma restore: trial %d does not match candidate %d of generation %d; not reused",
                        ft.number, index, self._generation,
                    )
                    continue
                self._bind(index, ft.number)
                scores = self.recorded_scores(ft)
                scalar = None
                if scores is None and ft.state == TrialState.COMPLETE and ft.values:
                    scalar = float(ft.values[0])  # scalarized value recorded without raw scores
                self._results[index] = (ft.state, scores, scalar)
            if len(self._results) < len(self._X):
                break  # this generation has candidates left to evaluate
            self._finish_generation()

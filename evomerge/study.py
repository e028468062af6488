"""The driver loop: ask -> dispatch -> tell, with a budget, a progress bar and a Pareto front.

The driver alone talks to the Optuna storage. For each candidate the optimizer asks,
the search space turns its params into a recipe, an executor merges and scores it on
a worker, and the result comes back here: user attributes (scores, recipe, timings,
worker, fidelity, hypervolume) are set, the optimizer tells the study, and the Pareto
folder is brought in line.

Example:
    >>> run = SearchRun.create("search.yaml", runs_dir=Path("runs"))   # doctest: +SKIP
    >>> summary = run.run()                                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.pareto import (
    HOLDOUT_ATTR,
    OBJECTIVES_ATTR,
    RECIPE_ATTR,
    SCORES_ATTR,
    Constraint,
    ParetoArchive,
    dominated_by_front,
    hypervolume,
    write_json_atomic,
)
from evomerge.run_config import RunConfig, load_run_config, parse_run_config
from evomerge.status import grouped_errors
from evomerge.worker import EvaluatorSpec, Job, JobResult, WorkerSpec

CONFIG_NAME = "config.yaml"
JOURNAL_NAME = "study.journal"
META_NAME = "run.json"


@dataclass
class _Pending:
    """A trial between ask and tell."""

    trial: Any  # optuna.trial.Trial
    recipe: dict
    stage: str  # "screen", "full" or "holdout"
    full: Optional[JobResult] = None
    screen: Optional[JobResult] = None


@dataclass
class RunState:
    complete: int = 0
    failed: int = 0
    pruned: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    best: dict[str, float] = field(default_factory=dict)
    front_size: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (trial, error) failed in this session


#: A session stops asking when this many of its trials failed and none finished: a broken
#: evaluator or source fails every trial alike, and each failure may cost a full evaluation.
FAILURES_BEFORE_ANY_SUCCESS = 10


class SearchRun:
    """One search: a run folder, its study, its executor and its front."""

    def __init__(self, config: RunConfig, run_dir: Path, *, storage: Optional[str] = None, base_dir: Optional[Path] = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.name = config.name or self.run_dir.name
        self.base_dir = base_dir
        self.storage_url = storage
        self._storage: Any = None  # one per run object: a journal file is replayed once, then read incrementally
        self._validate()

    # ------------------------------------------------------------------ set-up
    @classmethod
    def create(
        cls,
        config_path: Path,
        *,
        runs_dir: Path = Path("runs"),
        name: Optional[str] = None,
        storage: Optional[str] = None,
        overrides: Optional[dict[str, Any]] = None,
    ) -> "SearchRun":
        """Validate a config and create its run folder (refused when it already exists)."""
        config_path = Path(config_path)
        config = load_run_config(config_path)
        data = config.model_dump(mode="json")
        for key, value in (overrides or {}).items():
            _set_path(data, key, value)
        base_dir = config_path.resolve().parent
        data["sources"] = _absolute_sources(data["sources"], base_dir)
        if isinstance(data["search_space"], str) and Path(base_dir / data["search_space"]).is_file():
            data["search_space"] = str((base_dir / data["search_space"]).resolve())
        for ev in data["evaluators"]:
            if (base_dir / ev["preset"]).is_file():
                ev["preset"] = str((base_dir / ev["preset"]).resolve())
            function = ev.get("options", {}).get("function")
            if isinstance(function, str) and ":" in function:  # file.py:name next to the run config
                target, fn_name = function.rsplit(":", 1)
                if target.endswith(".py") and (base_dir / target).is_file():
                    ev["options"]["function"] = f"{(base_dir / target).resolve()}:{fn_name}"
        data["seed_recipes"] = [str((base_dir / r).resolve()) if (base_dir / r).is_file() else r for r in data["seed_recipes"]]
        run_name = name or data.get("name") or config_path.stem
        data["name"] = run_name
        config = parse_run_config(data, where=str(config_path))
        run_dir = Path(runs_dir) / run_name
        if (run_dir / CONFIG_NAME).exists():
            raise ConfigError(f"run {run_name!r} already exists in {runs_dir}; continue it with: evomerge resume {run_dir}")
        run = cls(config, run_dir, storage=storage, base_dir=base_dir)  # validates before anything is written
        if config.sources.align is not None and not config.sources.align.originals:
            from evomerge.align.sources import align_run_sources

            data = config.model_dump(mode="json")
            data["sources"] = align_run_sources(data["sources"], run_dir / "aligned", base_dir=base_dir, progress=True)
            config = parse_run_config(data, where=str(config_path))
            run = cls(config, run_dir, storage=storage, base_dir=base_dir)
        if storage:
            run.load_study()  # an unreachable storage fails here, before the folder is made
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / META_NAME, {"storage": storage, "evomerge": __version__})
        frozen = run_dir / f".{CONFIG_NAME}.tmp"
        frozen.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False))
        frozen.replace(run_dir / CONFIG_NAME)
        return run

    @classmethod
    def open(cls, run_dir: Path, *, storage: Optional[str] = None) -> "SearchRun":
        """Reopen an existing run from its frozen config (the source of truth for a resume)."""
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_NAME).is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no {CONFIG_NAME}); runs are made by evomerge search")
        meta = {}
        if (run_dir / META_NAME).is_file():
            meta = json.loads((run_dir / META_NAME).read_text())
        config = load_run_config(run_dir / CONFIG_NAME)
        run = cls(config, run_dir, storage=storage or meta.get("storage"))
        run.check_study_matches()
        return run

    def use_executor(self, **changes: Any) -> None:
        """Run this session with other executor settings (``kind``, ``cpus_per_worker``...).

        Only the live config changes: ``config.yaml`` keeps the run's own executor.
        """
        from pydantic import ValidationError

        from evomerge.errors import validation_message

        current = self.config.executor
        try:
            executor = type(current).model_validate({**current.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError(f"executor.{validation_message(exc)}") from None
        self.config = self.config.model_copy(update={"executor": executor})

    def check_study_matches(self) -> None:
        """Refuse a config whose search space or objectives no longer fit the stored trials."""
        import optuna

        try:
            study = optuna.load_study(study_name=self.name, storage=self.storage())
        except KeyError:
            if not self.storage_url:  # its own journal: stopped after the folder was made, before the first trial
                return  # nothing to match; a resume starts the search
            raise ConfigError(
                f"{self.run_dir}: storage {self.storage_url} holds no study named {self.name!r} (another database than the run's?)"
            ) from None
        dists = self.space.distributions()
        for t in study.get_trials(deepcopy=False):
            for name, dist in t.distributions.items():
                if name not in dists or dists[name] != dist:
                    raise ConfigError(
                        f"{self.run_dir / CONFIG_NAME}: search space no longer matches the study "
                        f"(trial {t.number} has parameter {name} {dist}, the config gives {dists.get(name, 'nothing')})"
                    )
            break  # one trial suffices: all share the space
        if len(study.directions) != len(self.optimizer.directions()):
            raise ConfigError(f"{self.run_dir / CONFIG_NAME}: objectives or optimizer no longer match the study")

    def recover(self, study: Any) -> int:
        """Trials a crash left RUNNING are marked FAIL and their candidates asked again.

        cma re-asks them itself (its restore replays the study); for the other
        optimizers their params are enqueued. Returns how many were recovered.
        """
        from optuna.trial import TrialState

        stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for t in stale:
            study.tell(t.number, state=TrialState.FAIL)
            if "cma_generation" not in t.user_attrs:
                attrs = {k: v for k, v in t.user_attrs.items() if k == "baseline"}
                study.enqueue_trial(t.params, user_attrs=dict(attrs, requeued_from=t.number))
        return len(stale)

    def _validate(self) -> None:
        """Everything that can be checked without loading a model: fail early, one line."""
        import torch

        from evomerge.evaluate import build_evaluator
        from evomerge.optimize import Objective, Scalarization, build_optimizer
        from evomerge.sources import SourceModel, check_compatible, check_tokenizer
        from evomerge.space import SearchSpace

        cfg = self.config
        if cfg.device.startswith("cuda") and cfg.executor.kind == "serial" and not torch.cuda.is_available():
            raise ConfigError(
                f"device: {cfg.device}, but this machine has no CUDA device (a serial run merges and scores here): "
                "use device: cpu, or executor: {kind: ray} on a cluster whose workers have GPUs"
            )
        refs = self.model_refs()
        self.sources = [SourceModel.open(r, allow_pickle=cfg.sources.allow_pickle) for r in refs]
        check_compatible(self.sources)
        check_tokenizer(self.sources[0].path, "the search")  # the workers' tokenizer
        space_kwargs = dict(base_model=cfg.sources.base_model, models=cfg.sources.models, num_layers=self.sources[0].num_layers)
        if isinstance(cfg.search_space, str):
            self.space = SearchSpace.from_yaml(cfg.search_space, **space_kwargs)
        else:
            self.space = SearchSpace.from_dict(cfg.search_space, where="search_space", **space_kwargs)
        # Evaluators are built here without a model: their data and metric names are checked.
        self.evaluator_specs = []
        produced: dict[str, str] = {}
        names = set()
        for ref in cfg.evaluators:
            ev = build_evaluator(ref.preset, split=ref.split, **ref.options)
            name = ref.name or ev.name
            if name in names:
                raise ConfigError(f"evaluators: two evaluators are named {name!r}; give one of them another `name:`")
            names.add(name)
            if ref.holdout_split:
                build_evaluator(ref.preset, split=ref.holdout_split, **ref.options)
            for metric, direction in ev.metrics.items():
                produced[f"{name}/{metric}"] = direction
            self.evaluator_specs.append(EvaluatorSpec(ref.preset, name, ref.split, ref.holdout_split, ref.limit, dict(ref.options)))
        for o in cfg.objectives:
            if o.metric not in produced:
                raise ConfigError(f"objectives: metric {o.metric!r} is produced by no evaluator (they produce: {', '.join(sorted(produced))})")
        for c in cfg.constraints:
            if c.metric not in produced:
                raise ConfigError(f"constraints: metric {c.metric!r} is produced by no evaluator")
        self.objectives = [Objective(o.metric, o.direction) for o in cfg.objectives]
        scal = None
        if cfg.scalarization is not None:
            weights = cfg.scalarization.weights or [1.0 / len(self.objectives)] * len(self.objectives)
            scal = Scalarization(cfg.scalarization.kind, tuple(weights), tuple(cfg.scalarization.reference) if cfg.scalarization.reference else None)
        self.optimizer = build_optimizer(
            cfg.optimizer.name,
            self.space.distributions(),
            self.objectives,
            scalarization=scal,
            seed=cfg.seed,
            state_dir=self.run_dir / "optimizer",
            options=dict(cfg.optimizer.options),
        )
        from evomerge.merge.recipe import Recipe

        self.seed_points = [self.space.params_from_recipe(Recipe.from_yaml(Path(r))) for r in cfg.seed_recipes]
        if cfg.reference_point is not None and len(cfg.reference_point) != len(self.objectives):
            raise ConfigError("reference_point: needs one value per objective")

    def model_refs(self) -> list[str]:
        s = self.config.sources
        refs = ([s.base_model] if s.base_model else []) + [m for m in s.models if m != s.base_model]
        return refs

    def worker_spec(self, threads: Optional[int] = None) -> WorkerSpec:
        return WorkerSpec(
            models=tuple(self.model_refs()),
            base_model=self.config.sources.base_model,
            evaluators=tuple(self.evaluator_specs),
            allow_pickle=self.config.sources.allow_pickle,
            device=self.config.device,
            dtype=self.config.dtype,
            threads=threads,
        )

    # ------------------------------------------------------------------ study
    def storage(self) -> Any:
        """The run's Optuna storage, opened once: each fresh journal storage replays the whole file."""
        if self._storage is None:
            self._storage = self._open_storage()
        return self._storage

    def _open_storage(self) -> Any:
        import optuna

        if self.storage_url:
            try:
                return optuna.storages.get_storage(self.storage_url)
            except Exception as exc:  # noqa: BLE001 - any connection problem is the URL's
                raise ConfigError(f"storage {self.storage_url}: cannot be reached ({' '.join(str(exc).split())[:200]})") from None
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(self.run_dir / JOURNAL_NAME)))

    def load_study(self) -> Any:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Using an existing study ..." on every open
        study = optuna.create_study(
            storage=self.storage(),
            study_name=self.name,
            directions=self.optimizer.directions(),
            sampler=self.optimizer.sampler(),
            load_if_exists=True,
        )
        names = [o.metric for o in self.objectives] if len(self.optimizer.directions()) == len(self.objectives) else ["scalarized"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # so optuna-dashboard shows the metrics by name
        return study

    # ------------------------------------------------------------------ loop
    def run(
        self,
        *,
        trials: Optional[int] = None,
        timeout: Optional[float] = None,
        executor: Any = None,
        workers: Optional[int] = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Run until the budget (COMPLETE + PRUNED trials, or wall time) is spent."""
        import optuna

        from evomerge.execute import build_executor

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        budget = trials if trials is not None else self.config.budget.trials
        timeout = timeout if timeout is not None else self.config.budget.timeout
        study = self.load_study()
        self.recover(study)
        self.optimizer.restore(study)  # continues a resumed run; a no-op on a fresh study
        self._enqueue_baselines(study)
        own_executor = executor is None
        if executor is None:
            ex = self.config.executor
            options = ex.ray_options() if ex.kind == "ray" else {}
            executor = build_executor(ex.kind, self.worker_spec(), workers=workers or ex.workers, **options)
        archive = ParetoArchive(
            self.run_dir,
            self.objectives,
            constraints=[Constraint(c.metric, c.min, c.max) for c in self.config.constraints],
            write_model=self._model_writer() if self.config.keep_pareto_models else None,
        )
        state = self._count(study)
        pending: dict[int, _Pending] = {}
        start = time.monotonic()
        done_before = state.complete + state.pruned  # failures count per session: a resume starts afresh
        max_failures = max(FAILURES_BEFORE_ANY_SUCCESS, 2 * (budget or 10))
        stopped = None
        bar = _Progress(progress, budget, self.objectives)
        try:
            with bar:
                while True:
                    time_up = timeout is not None and time.monotonic() - start >= timeout
                    done = state.complete + state.pruned
                    remaining = None if budget is None else budget - done - len(pending)
                    free = executor.slots - executor.in_flight()
                    failed = len(state.errors)
                    if failed >= max_failures or (failed >= FAILURES_BEFORE_ANY_SUCCESS and done == done_before):
                        stopped = f"{failed} trials failed in this session" + ("" if done > done_before else ", none finished")
                    if not time_up and free > 0 and (remaining is None or remaining > 0) and stopped is None:
                        n = free if remaining is None else min(free, remaining)
                        for trial in self.optimizer.ask(study, n):
                            self._dispatch(trial, pending, executor)
                    if executor.in_flight() == 0:
                        break
                    for result in executor.poll():
                        seen = len(state.errors)
                        self._handle(result, study, pending, executor, archive, state)
                        for number, error in state.errors[seen:]:
                            bar.failure(number, error)
                        bar.update(state)
        except KeyboardInterrupt:
            self._interrupt(study, pending, executor)
            raise
        finally:
            if own_executor:
                executor.shutdown()
        front = archive.sync(study.get_trials(deepcopy=False))
        self.save_plots(study, front)
        summary = self.summary(study, archive, elapsed=time.monotonic() - start)
        summary["stopped"] = stopped
        summary["errors"] = grouped_errors(state.errors)
        return summary

    def save_plots(self, study: Any, front: list) -> list[Path]:
        from evomerge.plots import attach_to_study, save_plots

        paths = save_plots(self, study, front)
        if paths:
            attach_to_study(self.run_dir, study, paths)
        return paths

    def _dispatch(self, trial: Any, pending: dict[int, _Pending], executor: Any) -> None:
        recipe = self.space.to_recipe(trial.params, random_seed=self.config.seed, dtype=self.config.dtype).to_dict()
        trial.set_user_attr(RECIPE_ATTR, recipe)
        stage = "screen" if self.config.fidelity is not None else "full"
        pending[trial.number] = _Pending(trial, recipe, stage)
        limit = self.config.fidelity.screen if stage == "screen" else None
        executor.submit(Job(trial.number, recipe, kind=stage, limit=limit))

    def _handle(self, r: JobResult, study: Any, pending: dict[int, _Pending], executor: Any, archive: ParetoArchive, state: RunState) -> None:
        from optuna.trial import TrialState

        p = pending.get(r.trial)
        if p is None:
            return
        p.trial.set_user_attr(f"worker_id_{r.kind}" if r.kind != "full" else "worker_id", r.worker_id)
        state.merge_seconds += r.merge_seconds
        state.eval_seconds += r.eval_seconds
        if r.error is not None:
            p.trial.set_user_attr("error", r.error)
            p.trial.set_user_attr("failed_stage", r.kind)
            del pending[r.trial]
            self.optimizer.tell(study, p.trial, None, TrialState.FAIL)
            state.failed += 1
            state.errors.append((r.trial, r.error))
            return
        front_values = [t.user_attrs[OBJECTIVES_ATTR] for t in archive.front(study.get_trials(deepcopy=False))]
        if r.kind == "screen":
            p.screen = r
            vec = self._vector(r.scores)
            p.trial.set_user_attr("screen_scores", r.scores)
            p.trial.set_user_attr("screen_fidelity", r.fidelity)
            if dominated_by_front(vec, front_values, self.objectives, self.config.fidelity.slack):
                p.trial.set_user_attr(OBJECTIVES_ATTR, vec)
                del pending[r.trial]
                self.optimizer.tell(study, p.trial, vec, TrialState.PRUNED)
                state.pruned += 1
                return
            p.stage = "full"
            executor.submit(Job(r.trial, p.recipe, kind="full"))
            return
        if r.kind == "full":
            p.full = r
            vec = self._vector(r.scores)
            needs_holdout = any(e.holdout_split for e in self.evaluator_specs)
            if needs_holdout and not dominated_by_front(vec, front_values, self.objectives):
                p.stage = "holdout"
                executor.submit(Job(r.trial, p.recipe, kind="holdout"))
                return
        else:  # holdout of a front candidate
            p.trial.set_user_attr(HOLDOUT_ATTR, r.scores)
        full = p.full
        vec = self._vector(full.scores)
        t = p.trial
        t.set_user_attr(SCORES_ATTR, full.scores)
        t.set_user_attr(OBJECTIVES_ATTR, vec)
        t.set_user_attr("merge_seconds", full.merge_seconds)
        t.set_user_attr("eval_seconds", full.eval_seconds)
        t.set_user_attr("fidelity", "full")
        reference = self._reference_point(study, vec)
        t.set_user_attr("hypervolume", hypervolume(front_values + [vec], self.objectives, reference))
        del pending[r.trial]
        self.optimizer.tell(study, t, vec, TrialState.COMPLETE)
        state.complete += 1
        for o, v in zip(self.objectives, vec):
            best = state.best.get(o.metric)
            if best is None or (v > best if o.direction == "maximize" else v < best):
                state.best[o.metric] = v
        front = archive.sync(study.get_trials(deepcopy=False))
        state.front_size = len(front)

    def _vector(self, scores: dict[str, float]) -> list[float]:
        return [float(scores[o.metric]) for o in self.objectives]

    def _reference_point(self, study: Any, vec: list[float]) -> list[float]:
        """Declared, else 10% worse than the first completed trial (the uniform baseline)
        in every objective, fixed for the rest of the run so hypervolumes compare."""
        if self.config.reference_point is not None:
            return list(self.config.reference_point)
        ref = study.user_attrs.get("reference_point")
        if ref is None:
            ref = [
                v - (0.1 * abs(v) + 1e-9) if o.direction == "maximize" else v + (0.1 * abs(v) + 1e-9)
                for o, v in zip(self.objectives, vec)
            ]
            study.set_user_attr("reference_point", ref)
        return ref

    def _enqueue_baselines(self, study: Any) -> None:
        if study.user_attrs.get("baselines_enqueued"):
            return
        if "uniform" in self.config.baselines:
            study.enqueue_trial(self.space.uniform_params(), user_attrs={"baseline": "uniform"})
        for path, point in zip(self.config.seed_recipes, self.seed_points):
            study.enqueue_trial(point, user_attrs={"baseline": str(path)})
        study.set_user_attr("baselines_enqueued", True)

    def _interrupt(self, study: Any, pending: dict[int, _Pending], executor: Any) -> None:
        from optuna.trial import TrialState

        executor.cancel_all()
        for p in list(pending.values()):
            p.trial.set_user_attr("error", "interrupted")
            # Told to the study only, not the optimizer: a resumed cma run asks these candidates again.
            study.tell(p.trial, state=TrialState.FAIL)
        pending.clear()

    def _model_writer(self):
        engine_box: dict[str, Any] = {}

        def write(recipe: dict, folder: Path) -> None:
            from evomerge.merge.engine import MergeEngine
            from evomerge.merge.recipe import Recipe

            if "engine" not in engine_box:
                engine_box["engine"] = MergeEngine(self.sources, device="cpu")
            engine = engine_box["engine"]
            engine.write(Recipe.from_dict(recipe), folder)
            engine.clear_cache()  # the driver keeps no task vectors between writes

        return write

    def trials_done(self) -> int:
        """COMPLETE + PRUNED trials so far: what the trial budget counts."""
        state = self._count(self.load_study())
        return state.complete + state.pruned

    def _count(self, study: Any) -> RunState:
        from optuna.trial import TrialState

        s = RunState()
        for t in study.get_trials(deepcopy=False):
            s.complete += t.state == TrialState.COMPLETE
            s.failed += t.state == TrialState.FAIL
            s.pruned += t.state == TrialState.PRUNED
        return s

    # ------------------------------------------------------------------ report
    def summary(self, study: Any, archive: ParetoArchive, elapsed: float = 0.0) -> dict[str, Any]:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        front = archive.front(trials)
        ref = self.config.reference_point or study.user_attrs.get("reference_point")
        return {
            "study": self.name,
            "run_dir": str(self.run_dir),
            "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "n_failed": sum(t.state == TrialState.FAIL for t in trials),
            "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "n_running": sum(t.state == TrialState.RUNNING for t in trials),
            "objectives": [{"name": o.metric, "direction": o.direction} for o in self.objectives],
            "pareto": [
                {
                    "trial": t.number,
                    "values": t.user_attrs[OBJECTIVES_ATTR],
                    "holdout_values": [t.user_attrs.get(HOLDOUT_ATTR, {}).get(o.metric) for o in self.objectives]
                    if t.user_attrs.get(HOLDOUT_ATTR)
                    else None,
                    "path": str(archive.dir / str(t.number)),
                }
                for t in front
            ],
            "hypervolume": hypervolume([t.user_attrs[OBJECTIVES_ATTR] for t in front], self.objectives, ref) if ref else 0.0,
            "elapsed_seconds": elapsed,
        }


def _absolute_sources(sources: dict, base_dir: Path) -> dict:
    """Model paths relative to the config file become absolute (hub ids stay)."""

    def fix(ref: Optional[str]) -> Optional[str]:
        if ref is None:
            return None
        p = base_dir / ref
        return str(p.resolve()) if not Path(ref).is_absolute() and p.exists() else ref

    out = dict(sources)
    out["base_model"] = fix(sources.get("base_model"))
    out["models"] = [fix(m) for m in sources["models"]]
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


class _Progress:
    """Trials done, failures, best per objective, front size; each new kind of failure once."""

    def __init__(self, enabled: bool, total: Optional[int], objectives: list):
        self.enabled, self.total, self.objectives = enabled, total, objectives
        self._p = None
        self._told: set[str] = set()

    def failure(self, trial: int, error: str) -> None:
        if self._p is None or error in self._told:
            return
        self._told.add(error)
        self._p.console.print(f"trial {trial} failed: {error}", markup=False, highlight=False)

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("search"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self._p.__enter__()
            self._task = self._p.add_task("search", total=self.total, info="")
        return self

    def update(self, s: RunState) -> None:
        if self._p is None:
            return
        best = " ".join(f"{k}={v:.4g}" for k, v in s.best.items())
        info = f"failed {s.failed} pruned {s.pruned} | best {best} | front {s.front_size}"
        room = max(12, self._p.console.width - 48)  # label, bar, counts, time: cut the details, not them
        info = info if len(info) <= room else info[: room - 1] + "…"
        self._p.update(self._task, completed=s.complete + s.pruned, info=info)

    def __exit__(self, *exc: Any) -> bool:
        if self._p is not None:
            self._p.__exit__(*exc)
        return False

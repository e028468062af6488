"""``search()`` and ``resume()``: a run made, or continued, from its parts.

:func:`create` freezes a config into a new run (its study first, then its folder) and
returns a :class:`Search`: the run handle plus the built parts. :func:`open_search`
does the same for an existing run, from its folder or from its storage alone.
:meth:`Search.run` takes the study's lease, recovers what a crash left running,
restores the optimizer from the study, enqueues the baselines once, and drives the
search to its budget. :func:`search` and :func:`resume` are those steps in one call;
both take ready-made parts (a search space, evaluator objects, an optimizer, an
executor, the archive's model writer) in place of what the config would build.

Example (a script, no YAML files of its own)::

    from evomerge.run import search
    from evomerge.optimize import build_optimizer

    summary = search(
        {"sources": {"base_model": "zoo/base", "models": ["zoo/add", "zoo/sort"]},
         "search_space": "task_arithmetic_global", "evaluators": [],
         "objectives": [{"metric": "mine/score"}], "budget": {"trials": 20}},
        name="scripted", evaluators=[MyEvaluator()],
    )
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

from evomerge import record
from evomerge.errors import ConfigError
from evomerge.run.builder import Parts, build, prepare_config
from evomerge.run.handle import CONFIG_NAME, Run
from evomerge.run_config import RunConfig


class Search:
    """A run handle with its built parts: what a driver is made of."""

    def __init__(self, run: Run, parts: Parts, *, executor: Any = None, write_model: Optional[Callable[[dict, Path], Any]] = None):
        self.handle, self.parts = run, parts
        self._executor, self._write_model = executor, write_model

    # the run's facts, for scripts and benchmarks
    config = property(lambda self: self.parts.config)
    run_dir = property(lambda self: self.handle.run_dir)
    name = property(lambda self: self.handle.name)
    objectives = property(lambda self: self.parts.objectives)
    space = property(lambda self: self.parts.space)
    sources = property(lambda self: self.parts.sources)
    optimizer = property(lambda self: self.parts.optimizer)

    def worker_spec(self, threads: Optional[int] = None) -> Any:
        return self.parts.worker_spec(threads)

    def load_study(self) -> Any:
        """The run's study, created with the optimizer's directions and sampler if new."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Using an existing study ..." on every open
        opt = self.parts.optimizer
        study = optuna.create_study(storage=self.handle.storage(), study_name=self.name, directions=opt.directions(), sampler=opt.sampler(), load_if_exists=True)
        names = [o.metric for o in self.objectives] if len(opt.directions()) == len(self.objectives) else ["scalarized"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)  # so optuna-dashboard shows the metrics by name
        return study

    def use_executor(self, **changes: Any) -> None:
        """Run this session with other executor settings; ``config.yaml`` keeps the run's own."""
        from pydantic import ValidationError

        from evomerge.errors import validation_message
        from evomerge.run_config import EXECUTORS, executor_config

        current = self.config.executor.model_dump()
        kind = changes.get("kind", current["kind"])
        if kind in EXECUTORS and kind != current["kind"]:  # fields of the other kind do not carry over
            current = {k: v for k, v in current.items() if k in EXECUTORS[kind].config.model_fields}
        try:
            executor = executor_config({**current, **changes})
        except ValidationError as exc:
            raise ConfigError(f"executor.{validation_message(exc)}") from None
        except ValueError as exc:
            raise ConfigError(f"executor.{exc}") from None
        self.parts.config = self.config.model_copy(update={"executor": executor})

    def trials_done(self) -> int:
        return self.handle.trials_done()

    # ------------------------------------------------------------------ the session
    def run(
        self,
        *,
        trials: Optional[int] = None,
        timeout: Optional[float] = None,
        executor: Any = None,
        workers: Optional[int] = None,
        progress: bool = True,
        lease_timeout: Optional[float] = None,
    ) -> dict[str, Any]:
        """Drive the search until the budget (COMPLETE + PRUNED trials, or wall time) is spent."""
        from evomerge.run.driver import Driver, MemberPolicy, WorkerWrites
        from evomerge.worker import node_token
        from evomerge.run.lease import Lease
        from evomerge.run.report import grouped_errors, summary

        budget = trials if trials is not None else self.config.budget.trials
        timeout = timeout if timeout is not None else self.config.budget.timeout
        study = self.load_study()
        with Lease(study, timeout=lease_timeout):
            opt = self.parts.optimizer
            opt.recover(study)
            opt.restore(study)  # continues a resumed run; a no-op on a fresh study
            self._enqueue_baselines(study)
            own = executor is None and self._executor is None
            executor = executor or self._executor or self.parts.executor(workers)
            # Front members are written by the worker whose live model holds them (a script may
            # pass its own writer); the driver never opens source weights.
            writes = WorkerWrites() if self._write_model is None and self.config.keep_pareto_models else None
            archive = self.handle.archive(self._write_model if self._write_model is not None else writes)
            members = None
            if writes is not None:
                members = MemberPolicy(archive.dir, self.objectives, archive.constraints, token=node_token(self.run_dir))
            driver = Driver(
                study, optimizer=opt, executor=executor, archive=archive, stages=self.parts.stages,
                to_recipe=self.parts.to_recipe, objectives=self.objectives, reference_point=self.config.reference_point,
                progress=progress, members=members, writes=writes,
            )
            try:
                state = driver.run(trials=budget, timeout=timeout)
            finally:
                if own:
                    executor.shutdown()
            archive.write_model = self._write_model  # the workers are gone: nothing more to write
            front = archive.sync(study.get_trials(deepcopy=False), holdout=record.holdouts(study.user_attrs))
        self.save_plots(study, front)
        out = summary(self.handle, study, archive, elapsed=state.elapsed)
        out["stopped"] = state.stopped
        out["errors"] = grouped_errors(state.errors)
        out["members_written"] = state.members_written
        out["write_seconds"] = state.write_seconds
        out["background_write_seconds"] = state.background_write_seconds
        out["holdout_jobs"] = state.holdout_jobs
        out["holdout_seconds"] = state.holdout_seconds
        out["holdout_deferred"] = state.holdout_deferred
        return out

    def save_plots(self, study: Any, front: list) -> list[Path]:
        from evomerge.plots import attach_to_study, save_plots

        paths = save_plots(self.handle, study, front, space=self.space)
        if paths:
            attach_to_study(self.run_dir, study, paths)
        return paths

    def _enqueue_baselines(self, study: Any) -> None:
        if study.user_attrs.get("baselines_enqueued"):
            return
        if "uniform" in self.config.baselines:
            study.enqueue_trial(self.space.uniform_params(), user_attrs={"baseline": "uniform"})
        for path, point in zip(self.config.seed_recipes, self.parts.seed_points):
            study.enqueue_trial(point, user_attrs={"baseline": str(path)})
        study.set_user_attr("baselines_enqueued", True)


# ---------------------------------------------------------------------------- making and opening
def create(
    config: Union[str, Path, dict, RunConfig],
    *,
    runs_dir: Path = Path("runs"),
    name: Optional[str] = None,
    storage: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    progress: bool = False,
    **objects: Any,
) -> Search:
    """Validate a config and make its run: the study (with the frozen config), then the folder.

    Refused when the run folder, or a study of that name with trials, already exists.
    ``objects``: ``space``, ``evaluators``, ``optimizer``, ``executor``, ``write_model``.
    """
    config = prepare_config(config, name=name, overrides=overrides)
    run_dir = Path(runs_dir) / config.name
    if (run_dir / CONFIG_NAME).exists():
        raise ConfigError(f"run {config.name!r} already exists in {runs_dir}; continue it with: evomerge resume {run_dir}")
    built, rest = _split(objects)
    parts = build(config, run_dir, **built)  # validates before anything is written
    if config.sources.align is not None and not config.sources.align.originals:
        from evomerge.align.sources import align_run_sources
        from evomerge.run_config import parse_run_config

        data = config.model_dump(mode="json")
        data["sources"] = align_run_sources(data["sources"], run_dir / "aligned", progress=progress)
        config = parse_run_config(data, where=str(run_dir / CONFIG_NAME))
        parts = build(config, run_dir, **built)
    run = Run(config, run_dir, storage_url=storage)
    search = Search(run, parts, **rest)
    if storage:
        run.storage()  # an unreachable storage fails here, before the folder is made
    else:
        run_dir.mkdir(parents=True, exist_ok=True)  # the journal lives in it
    if run.has_study() and run.study().trials:
        how = f"evomerge resume --storage {storage} --study {config.name}" if storage else f"evomerge resume {run_dir}"
        raise ConfigError(f"{storage or run_dir} already holds a study named {config.name!r}; continue it with: {how}")
    search.load_study()
    run.freeze(num_layers=parts.sources[0].num_layers)
    run.write_folder()
    return search


def open_search(
    run_dir: Optional[Path] = None,
    *,
    storage: Optional[str] = None,
    study: Optional[str] = None,
    runs_dir: Path = Path("runs"),
    **objects: Any,
) -> Search:
    """An existing run, from its folder or (``storage`` and ``study``) from its storage alone."""
    if run_dir is None:
        if not (storage and study):
            raise ConfigError("name the run: its folder, or --storage URL and --study NAME")
        run = Run.from_storage(storage, study, runs_dir=runs_dir)
    else:
        if study is not None:
            raise ConfigError("give the run folder or --study, not both")
        run = Run.open(run_dir, storage=storage)
    run.check_frozen()
    built, rest = _split(objects)
    parts = build(run.config, run.run_dir, **built)
    _check_study_matches(run, parts)
    return Search(run, parts, **rest)


def _split(objects: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    known = {"space", "evaluators", "optimizer", "executor", "write_model"}
    unknown = set(objects) - known
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(sorted(unknown))}")
    built = {k: v for k, v in objects.items() if k in ("space", "evaluators", "optimizer")}
    rest = {k: v for k, v in objects.items() if k in ("executor", "write_model")}
    return built, rest


def _check_study_matches(run: Run, parts: Parts) -> None:
    """Refuse parts whose search space or objectives no longer fit the stored trials."""
    if not run.has_study():
        return
    study = run.study()
    dists = parts.space.distributions()
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if name not in dists or dists[name] != dist:
                raise ConfigError(
                    f"{run.run_dir / CONFIG_NAME}: search space no longer matches the study "
                    f"(trial {t.number} has parameter {name} {dist}, the config gives {dists.get(name, 'nothing')})"
                )
        break  # one trial suffices: all share the space
    if len(study.directions) != len(parts.optimizer.directions()):
        raise ConfigError(f"{run.run_dir / CONFIG_NAME}: objectives or optimizer no longer match the study")


# ---------------------------------------------------------------------------- one call each
def search(
    config: Union[str, Path, dict, RunConfig],
    *,
    runs_dir: Path = Path("runs"),
    name: Optional[str] = None,
    storage: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
    trials: Optional[int] = None,
    timeout: Optional[float] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    lease_timeout: Optional[float] = None,
    **objects: Any,
) -> dict[str, Any]:
    """Make a run from ``config`` and search to its budget; returns the summary.

    ``objects`` replace what the config would build: ``space`` (a SearchSpace),
    ``evaluators`` (Evaluator objects, beside the config's), ``optimizer`` (an Optimizer),
    ``executor`` (an Executor), ``write_model`` (the archive's ``(recipe, folder)`` writer).
    """
    s = create(config, runs_dir=runs_dir, name=name, storage=storage, overrides=overrides, progress=progress, **objects)
    return s.run(trials=trials, timeout=timeout, workers=workers, progress=progress, lease_timeout=lease_timeout)


def resume(
    run_dir: Optional[Path] = None,
    *,
    storage: Optional[str] = None,
    study: Optional[str] = None,
    runs_dir: Path = Path("runs"),
    trials: Optional[int] = None,
    timeout: Optional[float] = None,
    workers: Optional[int] = None,
    executor_changes: Optional[dict[str, Any]] = None,
    progress: bool = True,
    lease_timeout: Optional[float] = None,
    **objects: Any,
) -> dict[str, Any]:
    """Continue a run, from its folder or from ``storage`` + ``study`` on any machine.

    Missing Pareto folders are rebuilt from their recipes (the archive's writer), the
    optimizer continues from the state the study keeps, and the search runs to its
    total budget. ``objects`` as for :func:`search`.
    """
    s = open_search(run_dir, storage=storage, study=study, runs_dir=runs_dir, **objects)
    if executor_changes:
        s.use_executor(**executor_changes)
    return s.run(trials=trials, timeout=timeout, workers=workers, progress=progress, lease_timeout=lease_timeout)


__all__ = ["Search", "create", "open_search", "search", "resume"]

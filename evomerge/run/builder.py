"""From a run config to the parts of a search, each checked before any model weight loads.

:func:`build` opens the sources (headers only), builds the search space, the evaluators
(without a model: their data and metric names are checked), the optimizer and the
stages, and says in one line what is wrong and where. A script may hand any part in
ready-made (``space=``, ``evaluators=``, ``optimizer=``); the config then only fills in
the rest. :func:`prepare_config` turns the config a user wrote into the one a run
freezes (paths made absolute, overrides applied).

Example:
    >>> config = prepare_config("search.yaml", name="mine")               # doctest: +SKIP
    >>> parts = build(config, Path("runs/mine"))                          # doctest: +SKIP
    >>> parts.optimizer.directions(), parts.space.dim                     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from evomerge.errors import ConfigError
from evomerge.run.stages import Stages
from evomerge.run_config import RunConfig, load_run_config, parse_run_config
from evomerge.worker import EvaluatorSpec, WorkerSpec


@dataclass
class Parts:
    """Everything a driver needs besides the study: the search's objects."""

    config: RunConfig
    run_dir: Path
    sources: list[Any]  # SourceModel, base first
    space: Any  # SearchSpace
    evaluators: list[EvaluatorSpec]
    objectives: list[Any]  # Objective
    optimizer: Any  # Optimizer
    stages: Stages
    seed_points: list[dict[str, Any]] = field(default_factory=list)
    lora_live: bool = False  # a linear search over LoRA adapters: workers keep LoRA live models

    @property
    def model_refs(self) -> list[str]:
        return model_refs(self.config)

    def worker_spec(self, threads: Optional[int] = None) -> WorkerSpec:
        c = self.config
        return WorkerSpec(
            models=tuple(self.model_refs),
            base_model=c.sources.base_model,
            evaluators=tuple(self.evaluators),
            allow_pickle=c.sources.allow_pickle,
            device=c.device,
            dtype=c.dtype,
            threads=threads,
            memory_device=c.memory.device_bytes,
            memory_host=c.memory.host_bytes,
            lora_live=self.lora_live,
        )

    def to_recipe(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.space.to_recipe(params, random_seed=self.config.seed, dtype=self.config.dtype).to_dict()

    def executor(self, workers: Optional[int] = None) -> Any:
        """The executor the config names, with this run's worker spec."""
        from evomerge.execute import build_executor

        ex = self.config.executor
        return build_executor(ex, self.worker_spec(), workers=workers or ex.workers)


def model_refs(config: RunConfig) -> list[str]:
    s = config.sources
    return ([s.base_model] if s.base_model else []) + [m for m in s.models if m != s.base_model]


def build(
    config: RunConfig,
    run_dir: Path,
    *,
    space: Any = None,
    evaluators: Optional[Sequence[Any]] = None,
    optimizer: Any = None,
) -> Parts:
    """The parts of the search a config describes, each validated; one ConfigError line otherwise."""
    from evomerge.optimize import Objective, Scalarization, build_optimizer
    from evomerge.adapters import open_sources
    from evomerge.sources import check_compatible, check_tokenizer

    cfg = config
    if cfg.device.startswith("cuda") and cfg.executor.kind == "serial":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {cfg.device}, but this machine has no CUDA device (a serial run merges and scores here): "
                "use device: cpu, or executor: {kind: ray} on a cluster whose workers have GPUs"
            )
    sources = open_sources(model_refs(cfg), base_model=cfg.sources.base_model, allow_pickle=cfg.sources.allow_pickle)
    check_compatible(sources)
    check_tokenizer(sources[0].path, "the search")  # the workers' tokenizer
    if space is None:
        space = _space(cfg, sources[0].num_layers)
    specs, produced = _evaluators(cfg, evaluators)
    for o in cfg.objectives:
        if o.metric not in produced:
            raise ConfigError(f"objectives: metric {o.metric!r} is produced by no evaluator (they produce: {', '.join(sorted(produced))})")
    for c in cfg.constraints:
        if c.metric not in produced:
            raise ConfigError(f"constraints: metric {c.metric!r} is produced by no evaluator")
    objectives = [Objective(o.metric, o.direction) for o in cfg.objectives]
    if cfg.reference_point is not None and len(cfg.reference_point) != len(objectives):
        raise ConfigError("reference_point: needs one value per objective")
    if optimizer is None:
        scal = None
        if cfg.scalarization is not None:
            weights = cfg.scalarization.weights or [1.0 / len(objectives)] * len(objectives)
            ref = tuple(cfg.scalarization.reference) if cfg.scalarization.reference else None
            scal = Scalarization(cfg.scalarization.kind, tuple(weights), ref)
        optimizer = build_optimizer(cfg.optimizer.name, space.distributions(), objectives, scalarization=scal, seed=cfg.seed, options=dict(cfg.optimizer.options))
    from evomerge.merge.chain import load_recipe

    seed_points = [space.params_from_recipe(load_recipe(Path(r))) for r in cfg.seed_recipes]
    stages = Stages.from_config(cfg.fidelity, holdout=any(e.holdout_split for e in specs), holdout_share=cfg.budget.holdout_share)
    return Parts(cfg, Path(run_dir), sources, space, specs, objectives, optimizer, stages, seed_points, lora_live=_lora_live(cfg, sources, space))


def _lora_live(cfg: RunConfig, sources: list[Any], space: Any) -> bool:
    """Whether candidates can be LoRA factors: adapters only, and a method linear in them
    with the base's coefficient 1 (checked on the space's center; reads no weight)."""
    from evomerge.errors import MergeError
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.low_rank import coefficients, low_rank_adapters

    refs = [s.ref for s in sources if s.ref != cfg.sources.base_model]
    try:
        engine = MergeEngine(sources)
        if low_rank_adapters(engine, refs) is None:
            return False
        coefficients(engine, space.to_recipe(space.center(), random_seed=cfg.seed, dtype=cfg.dtype))
    except (MergeError, ConfigError):
        return False
    return True


def _space(cfg: RunConfig, num_layers: int) -> Any:
    from evomerge.dataflow import build_space

    return build_space(cfg.search_space, base_model=cfg.sources.base_model, models=cfg.sources.models, num_layers=num_layers)


def _evaluators(cfg: RunConfig, given: Optional[Sequence[Any]]) -> tuple[list[EvaluatorSpec], dict[str, str]]:
    """Worker specs of the evaluators, and the metrics they produce (``name/metric`` -> direction)."""
    from evomerge.evaluate import build_evaluator

    specs: list[EvaluatorSpec] = []
    produced: dict[str, str] = {}
    names: set[str] = set()

    def add(name: str, metrics: dict[str, str], spec: EvaluatorSpec) -> None:
        if name in names:
            raise ConfigError(f"evaluators: two evaluators are named {name!r}; give one of them another `name:`")
        names.add(name)
        produced.update({f"{name}/{m}": d for m, d in metrics.items()})
        specs.append(spec)

    for ev in given or ():  # objects a script built: they travel to the workers as they are
        add(ev.name, dict(ev.metrics), EvaluatorSpec("<object>", ev.name, "validation", None, None, {}, instance=ev))
    for ref in cfg.evaluators:
        # Built here without a model: their data and metric names are checked.
        ev = build_evaluator(ref.preset, split=ref.split, **ref.options)
        if ref.holdout_split:
            build_evaluator(ref.preset, split=ref.holdout_split, **ref.options)
        name = ref.name or ev.name
        add(name, dict(ev.metrics), EvaluatorSpec(ref.preset, name, ref.split, ref.holdout_split, ref.limit, dict(ref.options)))
    if not specs:
        raise ConfigError("evaluators: at least one entry is needed (or evaluator objects passed to search())")
    return specs, produced


# ---------------------------------------------------------------------------- the frozen config
def prepare_config(
    source: Union[str, Path, dict, RunConfig],
    *,
    name: Optional[str] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> RunConfig:
    """The config a run freezes: overrides applied, paths next to the config file made absolute."""
    if isinstance(source, (str, Path)):
        config_path = Path(source)
        base_dir = config_path.resolve().parent
        data = load_run_config(config_path).model_dump(mode="json")
        where, stem = str(config_path), config_path.stem
    else:
        data = source.model_dump(mode="json") if isinstance(source, RunConfig) else dict(source)
        base_dir, where, stem = Path.cwd(), "run config", None
    for key, value in (overrides or {}).items():
        _set_path(data, key, value)
    data = _absolute_paths(data, base_dir)
    run_name = name or data.get("name") or stem
    if not run_name:
        raise ConfigError(f"{where}: name the run (`name:` in the config, or name=...)")
    data["name"] = run_name
    return parse_run_config(data, where=where)


def _absolute_paths(data: dict, base_dir: Path) -> dict:
    """Model, search space, evaluator, function and seed recipe paths relative to the config become absolute."""
    data = dict(data)
    data["sources"] = _absolute_sources(data["sources"], base_dir)
    if isinstance(data.get("search_space"), str) and Path(base_dir / data["search_space"]).is_file():
        data["search_space"] = str((base_dir / data["search_space"]).resolve())
    for ev in data.get("evaluators", []):
        if (base_dir / ev["preset"]).is_file():
            ev["preset"] = str((base_dir / ev["preset"]).resolve())
        function = ev.get("options", {}).get("function")
        if isinstance(function, str) and ":" in function:  # file.py:name next to the run config
            target, fn_name = function.rsplit(":", 1)
            if target.endswith(".py") and (base_dir / target).is_file():
                ev["options"]["function"] = f"{(base_dir / target).resolve()}:{fn_name}"
    align = data["sources"].get("align") or {}
    if isinstance(align.get("data"), str) and (base_dir / align["data"]).is_file():  # activation data next to the config
        data["sources"]["align"] = dict(align, data=str((base_dir / align["data"]).resolve()))
    data["seed_recipes"] = [str((base_dir / r).resolve()) if (base_dir / r).is_file() else r for r in data.get("seed_recipes", [])]
    return data


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

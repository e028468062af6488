"""The run config: one YAML that names everything a search needs.

Validated in full (sources exist, search space fits the method, objectives are
metrics some evaluator produces, the optimizer can handle the objectives) before any
model weight is loaded. See ``examples/search.yaml`` for a commented example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from evomerge._imports import Kind, Registry
from evomerge.config import check_limit
from evomerge.units import parse_bytes
from evomerge.errors import ConfigError, validation_message
from evomerge.io import read_yaml


#: Learned refinement of an alignment (evomerge.align.refine): its blends and default learning rate.
REFINE_BLENDS = ("midpoint", "path", "layerwise")
DEFAULT_REFINE_LR = 3e-3


#: Held-out re-scoring may take this share of a session's worker time by default: the
#: search keeps at least 80% of its candidates per hour (issue 19's target).
HOLDOUT_SHARE = 0.2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_run_name(name: str) -> str:
    """A run name is a plain folder name: the run folder is RUNS_DIR/NAME, not elsewhere."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\"):
        raise ValueError(f"{name!r} is not a plain folder name (the run folder is RUNS_DIR/NAME)")
    return name


class AlignSourcesConfig(_Strict):
    """Align every source to the base (or the first model) before the search starts."""

    method: Literal["weight", "activation", "mudsc"] = "mudsc"
    alpha: Optional[float] = Field(default=None, ge=0, le=1)
    data: Optional[str] = None  # evaluator preset or .jsonl/text file for activation statistics
    to: Literal["base", "first"] = "base"
    refine: int = Field(default=0, ge=0, strict=True)  # steps of learned refinement after the matching (needs data)
    refine_blend: Literal[REFINE_BLENDS] = "layerwise"  # type: ignore[valid-type]  # the merges refinement is trained on
    originals: Optional[Dict[str, str]] = None  # set by evomerge: aligned folder -> the source it replaces


class SourcesConfig(_Strict):
    base_model: Optional[str] = None
    models: List[str]
    allow_pickle: bool = False
    align: Optional[AlignSourcesConfig] = None

    @field_validator("models")
    @classmethod
    def _nonempty(cls, v: List[str]) -> List[str]:
        if not v:
            raise ValueError("the model list is empty")
        return v


class EvaluatorRef(_Strict):
    """An evaluator preset or file, optionally renamed, with the split to search on."""

    preset: str
    name: Optional[str] = None
    split: str = "validation"
    holdout_split: Optional[str] = None
    limit: Optional[Union[int, float]] = None
    options: Dict[str, Any] = Field(default_factory=dict)

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: Optional[Union[int, float]]) -> Optional[Union[int, float]]:
        return check_limit(v)  # as the evaluators read it: a count, or a fraction in (0, 1]


class ObjectiveConfig(_Strict):
    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"


class ScalarizationConfig(_Strict):
    kind: Literal["weighted_sum", "chebyshev"] = "weighted_sum"
    weights: Optional[List[float]] = None
    reference: Optional[List[float]] = None


class OptimizerConfig(_Strict):
    name: str = "cma"
    options: Dict[str, Any] = Field(default_factory=dict)


class BudgetConfig(_Strict):
    trials: Optional[int] = Field(default=None, ge=1)
    timeout: Optional[float] = Field(default=None, gt=0, description="seconds")
    holdout_share: float = Field(
        default=HOLDOUT_SHARE, gt=0, le=1,
        description="the most of a session's worker time that re-scoring front members on the held-out split may "
        "take, best members first (1: the whole front); `resume` re-scores the rest",
    )

    @model_validator(mode="after")
    def _some_budget(self) -> "BudgetConfig":
        if self.trials is None and self.timeout is None:
            raise ValueError("set trials, timeout or both")
        return self


class FidelityConfig(_Strict):
    """Screen each candidate on a subset; score fully only those that could reach the front."""

    screen: Union[int, float]
    slack: float = Field(default=0.02, ge=0)

    @field_validator("screen")
    @classmethod
    def _screen(cls, v: Union[int, float]) -> Union[int, float]:
        return check_limit(v)


class ConstraintConfig(_Strict):
    metric: str
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _a_range(self) -> "ConstraintConfig":
        if self.min is None and self.max is None:
            raise ValueError(f"{self.metric}: set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.metric}: min {self.min:g} is above max {self.max:g}; no trial could meet it")
        return self


class ExecutorConfig(_Strict):
    """What every executor takes; a kind's own model adds its fields (see :data:`EXECUTORS`)."""

    kind: str = "serial"
    workers: int = Field(default=1, ge=1)

    def options(self) -> Dict[str, Any]:
        """Keyword arguments of the executor's class besides the worker spec and ``workers``."""
        return {}


class RayExecutorConfig(ExecutorConfig):
    cpus_per_worker: Optional[float] = Field(default=None, gt=0)
    gpus_per_worker: Optional[float] = Field(default=None, ge=0)
    ray_address: Optional[str] = None
    ray_dashboard: bool = False
    max_retries: int = Field(default=2, ge=0)

    def options(self) -> Dict[str, Any]:
        return {
            "cpus_per_worker": self.cpus_per_worker,
            "gpus_per_worker": self.gpus_per_worker,
            "address": self.ray_address,
            "dashboard": self.ray_dashboard,
            "max_retries": self.max_retries,
        }


#: Registry: executor kind -> its config model and class. :func:`register_executor` adds one.
EXECUTORS = Registry("executor", {
    "serial": Kind(ExecutorConfig, "evomerge.execute.serial:SerialExecutor"),
    "ray": Kind(RayExecutorConfig, "evomerge.execute.ray:RayExecutor"),
})


def register_executor(kind: str, config: type[ExecutorConfig], executor: Union[type, str]) -> None:
    """Make ``executor: {kind: KIND, ...}`` mean this class, its fields checked by ``config``."""
    EXECUTORS.register(kind, config, executor)


def executor_config(data: Any) -> ExecutorConfig:
    """The config model of ``data['kind']`` validating ``data`` (pydantic's ValidationError if bad)."""
    if isinstance(data, ExecutorConfig):
        return data
    data = dict(data or {})
    kind = data.get("kind", "serial")
    if kind not in EXECUTORS:
        raise ValueError(f"kind: unknown executor {kind!r} (known: {', '.join(sorted(EXECUTORS))})")
    return EXECUTORS[kind].config.model_validate(data)


class MemoryConfig(_Strict):
    """The merge's memory budget, live model included: ``device`` on the GPU (default 75%
    of it), ``host`` when merging on the CPU (default: no limit). Sizes such as 60GB."""

    device: Optional[Union[str, int, float]] = None
    host: Optional[Union[str, int, float]] = None

    @field_validator("device", "host")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v is not None:
            parse_bytes(v, "size")
        return v

    @property
    def device_bytes(self) -> Optional[int]:
        return None if self.device is None else parse_bytes(self.device)

    @property
    def host_bytes(self) -> Optional[int]:
        return None if self.host is None else parse_bytes(self.host)


class RunConfig(_Strict):
    name: Optional[str] = None
    sources: SourcesConfig
    search_space: Union[str, Dict[str, Any]]
    evaluators: List[EvaluatorRef] = Field(default_factory=list)  # may be empty when a script passes evaluator objects
    objectives: List[ObjectiveConfig]
    scalarization: Optional[ScalarizationConfig] = None
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig
    seed: int = 0
    baselines: List[str] = Field(default_factory=lambda: ["uniform"])
    seed_recipes: List[str] = Field(default_factory=list)
    fidelity: Optional[FidelityConfig] = None
    constraints: List[ConstraintConfig] = Field(default_factory=list)
    reference_point: Optional[List[float]] = None
    executor: SerializeAsAny[ExecutorConfig] = Field(default_factory=ExecutorConfig)
    device: str = "cpu"
    # the live model's dtype and that of written models (recipes' `dtype`); merging computes in float32
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    keep_pareto_models: bool = True
    memory: MemoryConfig = Field(default_factory=MemoryConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_run_name(v)

    @field_validator("objectives")
    @classmethod
    def _nonempty(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one entry is needed")
        return v

    @field_validator("executor", mode="wrap")
    @classmethod
    def _executor(cls, v: Any, handler: Any) -> ExecutorConfig:
        try:
            return executor_config(v)
        except ValidationError as exc:  # the kind's own model: its first error, under executor.
            raise ValueError(validation_message(exc)) from None

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: List[str]) -> List[str]:
        for b in v:
            if b != "uniform":
                raise ValueError(f"unknown baseline {b!r} (known: uniform; list recipes under seed_recipes)")
        return v


class CommandCounts(_Strict):
    """Bounds of the counts commands take besides a run config's fields (benchmarks, paths)."""

    repeats: int = Field(default=1, ge=1)
    sources: int = Field(default=1, ge=1)
    params: float = Field(default=1, ge=1)
    threads: int = Field(default=1, ge=1)
    steps: int = Field(default=3, ge=3)  # points of a path, endpoints included
    limit: int = Field(default=1, ge=1)  # examples, as a whole count
    refine_lr: float = Field(default=DEFAULT_REFINE_LR, gt=0)


#: Where the bound of each count option of the command line is declared: (model, field).
OPTION_BOUNDS: Dict[str, tuple] = {
    "trials": (BudgetConfig, "trials"),
    "timeout": (BudgetConfig, "timeout"),
    "workers": (ExecutorConfig, "workers"),
    "refine": (AlignSourcesConfig, "refine"),
    **{name: (CommandCounts, name) for name in CommandCounts.model_fields},
}


def load_run_config(path: Path) -> RunConfig:
    """Parse a run config file; one-line error naming the file and field."""
    return parse_run_config(read_yaml(Path(path), what="run config"), where=str(path))


def parse_run_config(data: Any, *, where: str = "run config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_message(exc)}") from None

"""Pydantic models of the evaluator YAML files (``evaluators/*.yaml``).

An evaluator file names its ``kind`` (``lm_eval``, ``dataset`` or ``python``) and the
fields of that kind; unknown fields are errors. Paths in a file are relative to the
file's folder. :func:`load_evaluator_config` parses a file or a mapping and reports the
first problem in one line naming the file and the field.

Example (a dataset evaluator)::

    kind: dataset
    data_files: {validation: data/add/validation.jsonl, test: data/add/test.jsonl}
    split: validation
    mode: generate
    prompt: "{prompt}"
    target: "{answer}"
    stop: "\\n"
    metrics: [exact_match]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge._imports import Kind, Registry
from evomerge.errors import ConfigError, validation_message
from evomerge.io import read_yaml

Direction = Literal["maximize", "minimize"]
Limit = Union[int, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluatorConfigBase(_Strict):
    """Fields every evaluator kind has; a kind's model adds ``kind: Literal["..."]`` and its own."""

    name: Optional[str] = None  # default: the file's stem
    description: Optional[str] = None
    limit: Optional[Limit] = None  # default subset for every call: a count or a fraction in (0, 1]
    seed: int = 1234  # fixes which examples a limit keeps
    split: Optional[str] = None  # the data split scored (a search names one per evaluator)

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: Optional[Limit]) -> Optional[Limit]:
        return check_limit(v)


class DatasetConfig(EvaluatorConfigBase):
    """A Hugging Face ``datasets`` dataset scored in batches.

    ``path`` is a builder (``json``, ``csv``, ``parquet``), a local folder or a hub
    name; ``data_files`` point at local files. Templates use ``{field}`` placeholders.
    """

    kind: Literal["dataset"]
    path: str = "json"
    dataset_name: Optional[str] = None
    data_files: Optional[Union[str, List[str], Dict[str, Union[str, List[str]]]]] = None
    split: str = "validation"
    mode: Literal["generate", "multiple_choice", "perplexity"]
    prompt: str = ""
    target: Optional[str] = None  # generate, perplexity: the expected text
    choices: Optional[Union[str, List[str]]] = None  # multiple_choice: a list field's name, or templates
    label: Optional[str] = None  # multiple_choice: template giving the gold index or the gold choice
    stop: Optional[str] = "\n"  # generate: where an answer ends
    max_new_tokens: int = Field(default=32, ge=1)
    regex: Optional[str] = None  # generate: regex_match extracts the answer with it
    # generate: exact match alone is scored token for token by default (auto, one teacher-
    # forced pass); greedy compares the decoded text, as lm-eval does
    decoding: Literal["auto", "greedy", "teacher_forced"] = "auto"
    # default: the mode's metrics; a mapping renames them ({accuracy: exact_match})
    metrics: Optional[Union[List[str], Dict[str, str]]] = None
    batch_size: int = Field(default=256, ge=1)
    add_special_tokens: bool = True


class LmEvalConfig(EvaluatorConfigBase):
    """lm-evaluation-harness tasks run on the live model through lm-eval's HF wrapper."""

    kind: Literal["lm_eval"]
    tasks: List[str]
    include_path: List[str] = Field(default_factory=list)
    include_defaults: Optional[bool] = None  # default: only when a task is not in include_path
    split: Optional[str] = None  # evaluate this split instead of the tasks' own
    num_fewshot: Optional[int] = Field(default=None, ge=0)
    batch_size: Union[int, str] = 64
    max_batch_size: Optional[int] = None
    apply_chat_template: Union[bool, str] = False
    fewshot_as_multiturn: bool = False
    system_instruction: Optional[str] = None
    gen_kwargs: Optional[Union[str, Dict[str, Any]]] = None
    metrics: Optional[List[str]] = None  # report only these "task/metric" names
    max_length: Optional[int] = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: List[str]) -> List[str]:
        if not v:
            raise ValueError("name at least one task")
        return v

    @field_validator("include_path", mode="before")
    @classmethod
    def _paths(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class PythonConfig(EvaluatorConfigBase):
    """A function ``module:function`` (or ``file.py:function``) given the model and tokenizer."""

    kind: Literal["python"]
    function: str
    # names and directions; a list means "maximize" each; default: the function's
    # ``metrics`` attribute
    metrics: Optional[Union[Dict[str, Direction], List[str]]] = None
    options: Dict[str, Any] = Field(default_factory=dict)
    split: Optional[str] = None

    @field_validator("function")
    @classmethod
    def _function(cls, v: str) -> str:
        if ":" not in v or not v.rsplit(":", 1)[1]:
            raise ValueError("expected 'module:function' or 'file.py:function'")
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: Any) -> Any:
        if v is not None and not v:
            raise ValueError("declare at least one metric and its direction")
        return v


class SizeConfig(EvaluatorConfigBase):
    """The model's size as metrics to minimize: its decoder layers and its parameters (as
    the written folder holds them: a layer that runs twice counts twice)."""

    kind: Literal["size"]


EvaluatorConfig = EvaluatorConfigBase  # any kind's config model


#: Registry: evaluator kind -> its config model and class. :func:`register_evaluator` adds one.
EVALUATORS = Registry("evaluator", {
    "dataset": Kind(DatasetConfig, "evomerge.evaluate.dataset:DatasetEvaluator"),
    "lm_eval": Kind(LmEvalConfig, "evomerge.evaluate.lm_harness:LmEvalEvaluator"),
    "python": Kind(PythonConfig, "evomerge.evaluate.function:PythonEvaluator"),
    "size": Kind(SizeConfig, "evomerge.evaluate.size:SizeEvaluator"),
})


def register_evaluator(kind: str, config: type[EvaluatorConfigBase], evaluator: Union[type, str]) -> None:
    """Make evaluator files with ``kind: KIND`` build ``evaluator(config, base_dir, where)``.

    ``config`` is a subclass of :class:`EvaluatorConfigBase` with ``kind: Literal[KIND]``.
    """
    EVALUATORS.register(kind, config, evaluator)


def check_limit(limit: Optional[Limit]) -> Optional[Limit]:
    """A limit is None, a positive count, or a fraction in (0, 1]."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise ValueError("limit must be a count or a fraction, not a boolean")
    if isinstance(limit, int):
        if limit < 1:
            raise ValueError(f"limit {limit}: a count must be at least 1")
        return limit
    if isinstance(limit, float):
        if limit.is_integer() and limit > 1:
            return int(limit)
        if not 0.0 < limit <= 1.0:
            raise ValueError(f"limit {limit:g}: expected a whole count of at least 1 or a fraction in (0, 1]")
        return limit
    raise ValueError(f"limit {limit!r}: expected a count or a fraction")


def load_evaluator_config(source: Union[str, Path, dict], *, where: Optional[str] = None, **overrides: Any) -> tuple[EvaluatorConfig, Path]:
    """Parse an evaluator file or mapping; returns the config and the folder paths are relative to.

    ``overrides`` replace fields of the file (``split``, ``batch_size``...).
    """
    if isinstance(source, dict):
        data, base, where = dict(source), Path.cwd(), where or "evaluator"
    else:
        path = Path(source)
        where = where or str(path)
        data = read_yaml(path, what="evaluator file")
        base = path.resolve().parent
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping")
    data.update({k: v for k, v in overrides.items() if v is not None})
    kind = data.get("kind")
    if kind not in EVALUATORS:
        raise ConfigError(f"{where}: kind: expected one of {', '.join(EVALUATORS)}, got {kind!r}")
    try:
        cfg = EVALUATORS[kind].config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {validation_message(exc)}") from None
    if cfg.name is None:
        cfg.name = kind
    return cfg, base

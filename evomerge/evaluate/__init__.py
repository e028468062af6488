"""Evaluators: score a live model with lm-eval tasks, a task dataset or a Python function.

An evaluator is built once from a YAML preset (``evaluators/<name>.yaml``), a file or a
mapping, without any model: its data, templates and metric names are checked then.
It is called on a live model as often as needed::

    >>> from evomerge.evaluate import build_evaluator
    >>> ev = build_evaluator("zoo_add", split="test")     # doctest: +SKIP
    >>> ev.metrics                                        # doctest: +SKIP
    {'exact_match': 'maximize'}
    >>> ev.evaluate(model, tokenizer, limit=0.2)          # doctest: +SKIP
    {'exact_match': 0.86}

Kinds live in :data:`EVALUATORS` (kind -> config model and class, see
:mod:`evomerge.config`); a new kind is one module and one :func:`register_evaluator`
call, from inside the package or out. A run reports each metric as
``<evaluator name>/<metric>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Union

from evomerge.config import EVALUATORS, EvaluatorConfig, EvaluatorConfigBase, Limit, load_evaluator_config, register_evaluator
from evomerge.errors import ConfigError
from evomerge.evaluate.base import Evaluator, subset_indices
from evomerge.evaluate.dataset import DatasetEvaluator
from evomerge.evaluate.function import PythonEvaluator
from evomerge.evaluate.lm_harness import LmEvalEvaluator

__all__ = [
    "EVALUATORS",
    "Evaluator",
    "DatasetEvaluator",
    "LmEvalEvaluator",
    "PythonEvaluator",
    "build_evaluator",
    "register_evaluator",
    "evaluate",
    "subset_indices",
]


def build_evaluator(source: Union[str, Path, dict, EvaluatorConfig], *, split: Optional[str] = None, **overrides: Any) -> Evaluator:
    """An evaluator from a preset name, a YAML file, a mapping or a parsed config.

    ``split`` and ``overrides`` replace fields of the config. Raises
    :class:`~evomerge.errors.ConfigError` (one line, naming the file and field) for an
    unknown task, a missing data file, a template field absent from the data, an
    unknown metric, or any malformed field.
    """
    if split is not None:
        overrides["split"] = split
    if isinstance(source, EvaluatorConfigBase):
        config, base = load_evaluator_config(source.model_dump(), where=source.name or source.kind, **overrides)
        where = config.name or config.kind
    elif isinstance(source, dict):
        config, base = load_evaluator_config(source, **overrides)
        where = config.name or config.kind
    else:
        from evomerge._presets import resolve_preset

        path = resolve_preset(source, "evaluators")
        config, base = load_evaluator_config(path, **overrides)
        where = str(path)
    if config.kind not in EVALUATORS:  # pragma: no cover - config parsing already refuses unknown kinds
        raise ConfigError(f"{where}: unknown evaluator kind {config.kind!r}")
    return EVALUATORS.load(config.kind)(config, base, where)


def evaluate(
    model_dir: Union[str, Path],
    evaluators: Iterable[Union[str, Path, dict, Evaluator]],
    *,
    split: Optional[str] = None,
    limit: Optional[Limit] = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Score a model folder with each evaluator; metrics named ``<evaluator>/<metric>``.

    Every evaluator is built (and its config checked) before the model is loaded.
    """
    built = [e if isinstance(e, Evaluator) else build_evaluator(e, split=split) for e in evaluators]
    names = [e.name for e in built]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"two evaluators are named {dup!r}")
    model, tokenizer = load_model(model_dir, device=device)
    scores: dict[str, float] = {}
    for ev in built:
        for metric, value in ev.evaluate(model, tokenizer, limit=limit).items():
            scores[f"{ev.name}/{metric}"] = value
    return scores


def load_model(model_dir: Union[str, Path], *, device: str = "cpu") -> tuple[Any, Any]:
    """A local Hugging Face causal LM folder and its tokenizer, in eval mode."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a model folder (no config.json)")
    from evomerge.sources import check_model_folder, check_tokenizer

    check_model_folder(path)
    check_tokenizer(path, "evaluate")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer

"""The CLI's thin adapters: an ``--evaluator`` or ``--data`` argument to an object.

``--evaluator E`` is an evaluator preset (or preset file) for
:func:`evomerge.evaluate.build_evaluator`, or a data file (``.jsonl``, ``.json``,
``.txt``), which becomes a next-token loss evaluator. ``--data D`` is a data file
(read as is) or an evaluator preset whose texts feed the activation statistics.

Example:
    >>> ev = resolve_evaluator("val.jsonl")          # doctest: +SKIP
    >>> ev.metrics                                   # doctest: +SKIP
    {'loss': 'minimize', 'token_accuracy': 'maximize'}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.align.lm_loss import LMLossEvaluator
from evomerge.errors import ConfigError

DATA_SUFFIXES = (".jsonl", ".json", ".txt")


def is_data_file(ref: str) -> bool:
    p = Path(ref)
    return p.is_file() and p.suffix in DATA_SUFFIXES


def resolve_evaluator(ref: str, *, split: str = "validation", **options: Any) -> Any:
    """An evaluator object for a preset name, preset file or data file."""
    if is_data_file(ref):
        return LMLossEvaluator(Path(ref), name=Path(ref).stem)
    if Path(ref).suffix in DATA_SUFFIXES:
        raise ConfigError(f"evaluator data file not found: {ref}")
    try:
        from evomerge.evaluate import build_evaluator
    except ImportError:
        raise ConfigError(f"evaluator {ref}: evaluator presets are not available; pass a .jsonl or text data file") from None
    return build_evaluator(ref, split=split, **options)


def resolve_data(ref: str, *, split: str = "validation") -> Any:
    """What ``--data`` names: a data file's path, or the evaluator it names."""
    if Path(ref).is_file() and Path(ref).suffix in DATA_SUFFIXES:
        return Path(ref)
    if not Path(ref).exists() and Path(ref).suffix in DATA_SUFFIXES:
        raise ConfigError(f"data file not found: {ref}")
    return resolve_evaluator(ref, split=split)

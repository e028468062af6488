"""The Evaluator protocol, the registry of kinds, and fixed subsets for ``limit``.

An evaluator is built once (per worker) from its config, without any model: its data
is loaded and checked, and its metric names and directions are known from then on.
It is then called on a live model as often as needed; each call reads the model's
current weights, so merging new weights in place and calling again gives new scores.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Union

import numpy as np

from evomerge.config import Direction, Limit, check_limit
from evomerge.errors import EvaluationError


class Evaluator(ABC):
    """Scores a live model: ``evaluate(model, tokenizer, *, limit=None) -> {metric: value}``.

    Subclasses set ``kind`` and fill ``name`` and ``metrics`` (metric name -> direction,
    "maximize" or "minimize") in their constructor, before any model is seen.
    """

    kind: ClassVar[str]
    name: str
    metrics: dict[str, Direction]

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Limit] = None) -> dict[str, float]:
        """Score ``model``; ``limit`` (a count or a fraction) scores a fixed subset only."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metrics={sorted(self.metrics)})"


def subset_indices(n: int, limit: Optional[Union[int, float]], seed: int) -> Optional[list[int]]:
    """The examples a ``limit`` keeps out of ``n``: a fixed random subset, in order.

    None means all. A count keeps that many (at most ``n``); a fraction keeps
    ``ceil(fraction * n)``. The same ``n``, limit and seed give the same subset, and a
    smaller limit keeps a prefix of a larger one's permutation, so screening subsets
    are nested.
    """
    try:
        limit = check_limit(limit)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    if limit is None:
        return None
    k = min(n, limit if isinstance(limit, int) else int(math.ceil(limit * n)))
    if k >= n:
        return None
    order = np.random.default_rng(seed).permutation(n)[:k]
    return sorted(int(i) for i in order)

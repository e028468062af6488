"""An objective: one named metric and its direction (a leaf, cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from evomerge.errors import ConfigError

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Objective:
    """One named metric and whether larger or smaller is better.

    Example:
        >>> Objective("add/accuracy", "maximize").sign
        1.0
    """

    metric: str
    direction: Direction

    def __post_init__(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(
                f"objective {self.metric!r}: direction {self.direction!r} is not 'maximize' or 'minimize'"
            )

    @property
    def sign(self) -> float:
        """+1 for maximize, -1 for minimize: ``sign * score`` is higher-is-better."""
        return 1.0 if self.direction == "maximize" else -1.0


def losses(values: Sequence[Sequence[float]], objectives: Sequence[Objective]) -> np.ndarray:
    """Objective values turned into losses (maximized objectives negated)."""
    signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in objectives])
    arr = np.asarray(values, dtype=float).reshape(-1, len(objectives))
    return arr * signs


def dominated_by_front(point: Sequence[float], front: Sequence[Sequence[float]], objectives: Sequence[Objective], slack: float = 0.0) -> bool:
    """True when some front member beats ``point`` by more than ``slack`` in every objective
    (weakly in all, strictly in one, when slack is 0)."""
    if not len(front):
        return False
    p = losses([point], objectives)[0]
    f = losses(front, objectives)
    if slack > 0:
        return bool(np.any(np.all(f < p - slack, axis=1)))
    return bool(np.any(np.all(f <= p, axis=1) & np.any(f < p, axis=1)))

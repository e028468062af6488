"""The stages a candidate goes through: screen (optional), full evaluation, held-out check.

A candidate is screened on a subset when the run has ``fidelity:``; one the front
already beats by more than the slack is PRUNED there. Every other one is fully
scored: those are its scores. A fully scored candidate that the front does not
dominate is scored once more on the held-out split when an evaluator has one.

Example:
    >>> from evomerge.objective import Objective
    >>> stages = Stages(screen=Screen(limit=0.2, slack=0.0), holdout=True)
    >>> stages.first()
    ('screen', 0.2)
    >>> objs = [Objective("a", "maximize")]
    >>> stages.after("screen", [0.4], front=[[0.9]], objectives=objs)   # beaten: pruned
    'prune'
    >>> stages.after("full", [0.95], front=[[0.9]], objectives=objs)    # may join the front
    'holdout'
    >>> stages.after("holdout", [0.95], front=[[0.9]], objectives=objs)
    'complete'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from evomerge.pareto import dominated_by_front


@dataclass(frozen=True)
class Screen:
    """Score on ``limit`` examples first; prune what the front beats by more than ``slack``."""

    limit: Union[int, float]
    slack: float = 0.02


@dataclass(frozen=True)
class Stages:
    screen: Optional[Screen] = None
    holdout: bool = False

    @classmethod
    def from_config(cls, fidelity: Any, *, holdout: bool) -> "Stages":
        screen = Screen(fidelity.screen, fidelity.slack) if fidelity is not None else None
        return cls(screen, holdout)

    def first(self) -> tuple[str, Optional[Union[int, float]]]:
        """The first job's kind and example limit."""
        return ("screen", self.screen.limit) if self.screen is not None else ("full", None)

    def after(self, kind: str, values: Sequence[float], *, front: Sequence[Sequence[float]], objectives: Sequence[Any]) -> str:
        """What follows a job of ``kind`` whose objective values are ``values``:
        ``prune``, the next job's kind (``full``, ``holdout``), or ``complete``."""
        if kind == "screen":
            assert self.screen is not None
            return "prune" if dominated_by_front(values, front, objectives, self.screen.slack) else "full"
        if kind == "full" and self.holdout and not dominated_by_front(values, front, objectives):
            return "holdout"
        return "complete"

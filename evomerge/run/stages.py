"""The stages a candidate goes through: screen (optional), then full evaluation.

A candidate is screened on a subset when the run has ``fidelity:``; one the front
already beats by more than the slack is PRUNED there. Every other one is fully
scored: those are its scores, and the trial is COMPLETE. Held-out scoring (``holdout``:
an evaluator has a held-out split) is no stage of a candidate: the driver re-scores
front members in worker slots the optimizer leaves idle and at the end of a session,
there within ``holdout_share`` of the session's worker time (:mod:`evomerge.run.driver`).

Example:
    >>> from evomerge.objective import Objective
    >>> stages = Stages(screen=Screen(limit=0.2, slack=0.0), holdout=True)
    >>> stages.first()
    ('screen', 0.2)
    >>> objs = [Objective("a", "maximize")]
    >>> stages.after("screen", [0.4], front=[[0.9]], objectives=objs)   # beaten: pruned
    'prune'
    >>> stages.after("screen", [0.95], front=[[0.9]], objectives=objs)  # may join the front
    'full'
    >>> stages.after("full", [0.95], front=[[0.9]], objectives=objs)
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
    holdout_share: float = 1.0  # of the session's worker time, for re-scoring once no candidate is in flight

    @classmethod
    def from_config(cls, fidelity: Any, *, holdout: bool, holdout_share: float = 1.0) -> "Stages":
        screen = Screen(fidelity.screen, fidelity.slack) if fidelity is not None else None
        return cls(screen, holdout, holdout_share)

    def holdout_fits(self, *, spent: float, next_cost: float, search: float) -> bool:
        """Whether one more held-out job fits the session's share of worker time:
        ``spent`` seconds of held-out scoring so far (jobs in flight included at
        ``next_cost`` each), ``search`` seconds of candidates. A session that scored no
        candidate (a resume of a finished run) re-scores whatever is missing.

        >>> Stages(holdout=True, holdout_share=0.2).holdout_fits(spent=20, next_cost=6, search=100)
        False
        >>> Stages(holdout=True, holdout_share=0.2).holdout_fits(spent=15, next_cost=6, search=100)
        True
        """
        if self.holdout_share >= 1 or search <= 0:
            return True
        return spent + next_cost <= self.holdout_share * (search + spent + next_cost)

    def first(self) -> tuple[str, Optional[Union[int, float]]]:
        """The first job's kind and example limit."""
        return ("screen", self.screen.limit) if self.screen is not None else ("full", None)

    def after(self, kind: str, values: Sequence[float], *, front: Sequence[Sequence[float]], objectives: Sequence[Any]) -> str:
        """What follows a job of ``kind`` whose objective values are ``values``:
        ``prune``, the next job's kind (``full``), or ``complete``."""
        if kind == "screen":
            assert self.screen is not None
            return "prune" if dominated_by_front(values, front, objectives, self.screen.slack) else "full"
        return "complete"

"""An objective: one named metric and its direction (a leaf, cheap to import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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

"""Merge parameters: the type, default, range and scope of each one a method takes.

Example:
    >>> ParamSpec("density", float, 1.0, low=0.0, high=1.0).validate("0.5", where="density")
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from evomerge.errors import ConfigError


@dataclass(frozen=True)
class ParamSpec:
    """One merge parameter: its type, default, valid range and scope.

    ``shared`` parameters are read from the recipe's global ``parameters`` only;
    the others may be set per model (the base model never takes them).
    """

    name: str
    type: type = float
    default: Any = None
    shared: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    required: bool = False

    def coerce(self, value: Any, where: str = "") -> Any:
        try:
            if self.type is bool:
                if isinstance(value, str):
                    if value.lower() in ("true", "yes", "1"):
                        return True
                    if value.lower() in ("false", "no", "0"):
                        return False
                    raise ValueError(value)
                return bool(value)
            if self.type is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                return float(value)
            if self.type is int:
                return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {self.type.__name__}, got {value!r}") from None
        return value

    def validate(self, value: Any, where: str = "") -> Any:
        v = self.coerce(value, where)
        if self.type in (float, int):
            if not math.isfinite(v):
                raise ConfigError(f"{where}: {v} is not a finite number")
            lo = -math.inf if self.low is None else self.low
            hi = math.inf if self.high is None else self.high
            if not lo <= v <= hi:
                raise ConfigError(f"{where}: {v} is outside [{_fmt(self.low)}, {_fmt(self.high)}]")
        return v


def _fmt(x: Optional[float]) -> str:
    return "-inf" if x is None else f"{x:g}"


UNIT = dict(low=0.0, high=1.0)
WEIGHT = ParamSpec("weight", float, None, required=True)

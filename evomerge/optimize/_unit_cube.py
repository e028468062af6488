"""Map numeric Optuna distributions to and from the unit cube [0, 1]^d.

CMA-ES works best when every coordinate has a comparable scale, so pycma searches
the cube and candidates are mapped back to parameter values: linearly, or through
log-space for ``log=True``; stepped and integer parameters are rounded to their grid.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from evomerge.errors import ConfigError


class UnitCube:
    """Bijection (up to rounding) between parameter dicts and points of [0, 1]^d.

    Example:
        >>> cube = UnitCube({"a": FloatDistribution(0, 2), "b": FloatDistribution(1e-3, 1e-1, log=True)})
        >>> {k: round(v, 12) for k, v in cube.to_params(np.array([0.5, 0.5])).items()}
        {'a': 1.0, 'b': 0.01}
        >>> cube.to_unit({"a": 2.0, "b": 1e-3}).tolist()
        [1.0, 0.0]
    """

    def __init__(self, distributions: Mapping[str, BaseDistribution], owner: str = "cma") -> None:
        self.names: list[str] = list(distributions)
        self.distributions = dict(distributions)
        lo, hi, logs = [], [], []
        for name, dist in self.distributions.items():
            if not isinstance(dist, (FloatDistribution, IntDistribution)):
                raise ConfigError(
                    f"optimizer {owner!r} searches numeric parameters only; {name!r} is "
                    f"{type(dist).__name__}: use an Optuna sampler such as 'tpe' for it"
                )
            log = bool(dist.log)
            lo.append(math.log(dist.low) if log else float(dist.low))
            hi.append(math.log(dist.high) if log else float(dist.high))
            logs.append(log)
        self._lo = np.array(lo)
        self._hi = np.array(hi)
        self._log = np.array(logs)

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_params(self, x: np.ndarray) -> dict[str, Any]:
        """The parameter values at unit-cube point ``x`` (clipped into the cube first)."""
        u = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        z = self._lo + u * (self._hi - self._lo)
        params: dict[str, Any] = {}
        for i, (name, dist) in enumerate(self.distributions.items()):
            v = math.exp(z[i]) if self._log[i] else float(z[i])
            step = getattr(dist, "step", None)
            if step is not None and not self._log[i]:
                v = dist.low + round((v - dist.low) / step) * step
            # Rounding in exp/step arithmetic may step just outside the range; Optuna would warn.
            v = min(max(v, dist.low), dist.high)
            params[name] = int(round(v)) if isinstance(dist, IntDistribution) else float(v)
        return params

    def to_unit(self, params: Mapping[str, Any]) -> np.ndarray:
        """The unit-cube point of ``params`` (missing names sit at the centre)."""
        u = np.full(self.dim, 0.5)
        for i, name in enumerate(self.names):
            if name not in params:
                continue
            v = float(params[name])
            z = math.log(v) if self._log[i] else v
            span = self._hi[i] - self._lo[i]
            u[i] = 0.5 if span == 0 else (z - self._lo[i]) / span
        return np.clip(u, 0.0, 1.0)

    def contains(self, name: str, value: Any) -> bool:
        dist = self.distributions[name]
        try:
            return bool(dist._contains(dist.to_internal_repr(value)))
        except (TypeError, ValueError):
            return False

"""SLERP: spherical interpolation between the base model and one other, per tensor.

``slerp(t, a, b) = ca * a + cb * b`` with weights from the angle between the flattened
tensors, so a tensor costs one pass for ``a.a``, ``b.b`` and ``a.b`` (kept: they depend on
the sources only) and one to write the weighted sum.

Reference: https://en.wikipedia.org/wiki/Slerp (mergekit's ``slerp``)
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.merge.params import UNIT, ParamSpec


def slerp_weights(t: float, aa: float, bb: float, ab: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> tuple[float, float]:
    """``(ca, cb)`` with ``slerp(t, a, b) = ca * a + cb * b``, from ``a.a``, ``b.b`` and ``a.b``.

    Nearly collinear pairs (|cos| above ``dot_threshold``) fall back to linear weights.

    >>> [round(w, 4) for w in slerp_weights(0.5, 1.0, 1.0, 0.0)]   # a quarter turn: both at sin(45)/sin(90)
    [0.7071, 0.7071]
    """
    na = math.sqrt(max(aa, 0.0))
    nb = math.sqrt(max(bb, 0.0))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(1.0, max(-1.0, ab / (na * nb)))
    return (1.0 - t, t) if abs(dot) > dot_threshold else sine_weights(t, dot)


def sine_weights(t: float, cos: float) -> tuple[float, float]:
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, ``t=0`` gives ``v0`` (the reference math)."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(dtype)
    b = v1.reshape(-1).to(dtype)
    aa, bb, ab = float((a * a).sum()), float((b * b).sum()), float((a * b).sum())
    ca, cb = slerp_weights(t, aa, bb, ab, dot_threshold=dot_threshold, eps=eps)
    return (ca * a + cb * b).reshape(v0.shape)


class Slerp(MergeMethod):
    name = "slerp"
    params = (ParamSpec("t", float, None, shared=True, required=True, **UNIT),)
    base = "required"
    reference = "https://en.wikipedia.org/wiki/Slerp"

    def check_inputs(self, recipe: Any, where: str) -> None:
        super().check_inputs(recipe, where)
        if len(recipe.model_refs) != 2:
            raise ConfigError(f"{where}: models: slerp needs exactly two models, one of them the base_model")

    def inputs(self, recipe: Any) -> tuple[str, ...]:
        return tuple(r for r in recipe.model_refs if r != recipe.base_model)

    def traffic(self, n_models: int) -> int:
        return 3  # read the base and the model, write the output

    def merge(self, job: Any) -> None:
        (other,) = job.inputs
        aa, bb, ab = job.pair_sums(job.base, other)
        job.weighted_sum([job.base, other], list(slerp_weights(float(job.shared["t"]), aa, bb, ab)))

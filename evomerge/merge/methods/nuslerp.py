"""NuSLERP: spherical interpolation of two models (or of their task vectors when a base is
named), over whole tensors, rows or columns (mergekit's ``nuslerp``).

Over whole tensors it is ``ca * a + cb * b`` from three sums, like SLERP; over rows or
columns each vector has its own angle, and the tensor is merged a block of vectors at a
time.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.merge.methods.slerp import sine_weights
from evomerge.merge.params import WEIGHT, ParamSpec


def nuslerp_weights(t: float, aa: float, bb: float, ab: float, *, eps: float = 1e-8) -> tuple[float, float]:
    """``(ca, cb)`` of flattened NuSLERP (linear only for exactly collinear vectors)."""
    cos = min(1.0, max(-1.0, ab / (max(math.sqrt(max(aa, 0.0)), 1e-7) * max(math.sqrt(max(bb, 0.0)), 1e-7))))
    return (1.0 - t, t) if 1 - cos * cos <= eps * eps else sine_weights(t, cos)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False, flatten: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """NuSLERP of whole tensors: over the flattened tensor, its rows or its columns."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(a) * unit(b), dim=-1, keepdim=True).clamp(-1, 1)
    collinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(collinear, torch.zeros_like(cos), cos))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / sin_theta
    out = torch.where(collinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


class Nuslerp(MergeMethod):
    name = "nuslerp"
    params = (
        WEIGHT,
        ParamSpec("nuslerp_row_wise", bool, False, shared=True),
        ParamSpec("nuslerp_flatten", bool, True, shared=True),
    )
    base = "optional"

    def check_inputs(self, recipe: Any, where: str) -> None:
        if len([r for r in recipe.model_refs if r != recipe.base_model]) != 2:
            raise ConfigError(f"{where}: models: nuslerp needs exactly two models besides the base_model")

    def traffic(self, n_models: int) -> int:
        return 4  # read the two models and the base, write the output

    def merge(self, job: Any) -> None:
        a, b = job.inputs
        wa, wb = job.per_model[a]["weight"], job.per_model[b]["weight"]
        t = 0.5 if abs(wa + wb) < 1e-6 else wb / (wa + wb)
        if job.shared["nuslerp_flatten"]:
            aa, bb, ab = job.pair_sums(a, b, minus=job.base)
            ca, cb = nuslerp_weights(t, aa, bb, ab)
            if job.base is None:
                job.weighted_sum([a, b], [ca, cb])
            else:
                job.delta_sum([a, b], [ca, cb], base_weight=1.0)
            return
        row_wise = bool(job.shared["nuslerp_row_wise"])
        for sl in job.blocks(vectors_along_first_dim=row_wise):
            x, y = job.read_block(a, sl), job.read_block(b, sl)
            if job.base is not None:
                base = job.read_block(job.base, sl)
                merged = base + nuslerp(t, x - base, y - base, row_wise=row_wise, flatten=False)
            else:
                merged = nuslerp(t, x, y, row_wise=row_wise, flatten=False)
            job.write_block(sl, merged)

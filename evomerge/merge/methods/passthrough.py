"""Passthrough: one model's tensors as they are, optionally scaled (mergekit's passthrough)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.merge.params import ParamSpec


def passthrough(tensor: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The one input as is, optionally scaled."""
    return tensor if scale is None else tensor * scale


class Passthrough(MergeMethod):
    name = "passthrough"
    params = (ParamSpec("scale", float, None),)
    base = "none"

    def check_inputs(self, recipe: Any, where: str) -> None:
        if len(recipe.model_refs) != 1:
            raise ConfigError(f"{where}: models: passthrough takes exactly one model")

    def inputs(self, recipe: Any) -> tuple[str, ...]:
        return tuple(recipe.model_refs)

    def search_inputs(self, models: Sequence[str], base_model: Any) -> list[str]:
        return list(models) + ([base_model] if base_model and base_model not in models else [])

    def traffic(self, n_models: int) -> int:
        return 2  # read one model, write the output

    def merge(self, job: Any) -> None:
        (only,) = job.inputs
        scale = job.per_model[only]["scale"]
        job.weighted_sum([only], [1.0 if scale is None else scale])

"""Linear: a weighted average (``normalize``) or weighted sum of the models' weights.

Reference: Wortsman et al., Model soups, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from evomerge.errors import MergeError
from evomerge.merge.methods.base import MergeMethod, TensorPlan
from evomerge.merge.params import WEIGHT, ParamSpec


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average (``normalize``) or weighted sum of whole tensors (the reference math).

    >>> linear([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], [1.0, 3.0]).tolist()
    [2.5, 5.0]
    """
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    result = torch.zeros_like(tensors[0], dtype=dtype)
    for tensor, w in zip(tensors, weights):
        result.add_(tensor.to(dtype) * torch.tensor(w, dtype=dtype))
    if normalize:
        result.div_(torch.tensor(sum(weights), dtype=dtype))
    return result


class Linear(MergeMethod):
    name = "linear"
    params = (WEIGHT, ParamSpec("normalize", bool, True, shared=True))
    base = "none"  # a base model, when named, is one more weighted input (as in mergekit)
    reference = "https://arxiv.org/abs/2203.05482"

    def inputs(self, recipe: Any) -> tuple[str, ...]:
        return tuple(recipe.model_refs)

    def search_inputs(self, models: Sequence[str], base_model: Any) -> list[str]:
        return list(models) + ([base_model] if base_model and base_model not in models else [])

    def check_plan(self, plan: TensorPlan) -> None:
        if plan.shared["normalize"] and abs(sum(p["weight"] for p in plan.per_model.values())) < 1e-8:
            # normalize divides by the weights' sum: every value of the tensor would be nan or inf
            raise MergeError(
                f"linear: the weights of tensor {plan.name} sum to 0, and normalize divides by their sum; "
                "give a non-zero weight or set normalize: false"
            )

    def linear_coefficients(self, plan: TensorPlan) -> Optional[tuple[float, dict[str, float]]]:
        weights = {m: p["weight"] for m, p in plan.per_model.items()}
        total = sum(weights.values()) if plan.shared["normalize"] else 1.0
        return sum(weights.values()) / total, {m: w / total for m, w in weights.items()}

    def traffic(self, n_models: int) -> int:
        return n_models + 1  # no base read: every input is read once, the output written

    def merge(self, job: Any) -> None:
        weights = [job.per_model[m]["weight"] for m in job.inputs]
        job.weighted_sum(job.inputs, weights, total=sum(weights) if job.shared["normalize"] else None)

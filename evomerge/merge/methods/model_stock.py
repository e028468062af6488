"""Model Stock: move from the models' average toward the base by their task vectors' mean angle.

Over whole tensors the ratio comes from the Gram matrix of the task vectors (kept: it
depends on the sources only), then one weighted-sum pass; ``filter_wise`` gives each row
its own ratio and merges a block of rows at a time.

Reference: Jang et al., Model Stock, https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.merge.params import ParamSpec


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    """Model Stock of whole tensors (the reference math; rows independent when ``filter_wise``)."""
    shape = base.shape
    n = len(tensors)
    if not filter_wise:
        offsets = [w - base for w in tensors]
        gram = [float((a * b).sum()) for i, a in enumerate(offsets) for b in offsets[i:]]
        ratio = model_stock_ratio(gram, n)
        out = tensors[0]
        for w in tensors[1:]:
            out = out + w
        return ratio * out / n + (1 - ratio) * base
    w0 = base.unsqueeze(0) if base.dim() == 1 else base
    offsets = [(w.unsqueeze(0) if w.dim() == 1 else w) - w0 for w in tensors]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denom), denom)
    ratio_rows = torch.where(singular, torch.zeros_like(cos_theta), (n * cos_theta) / safe)
    total = tensors[0].reshape(w0.shape)
    for w in tensors[1:]:
        total = total + w.reshape(w0.shape)
    return (ratio_rows * total / n + (1 - ratio_rows) * w0).reshape(shape)


def offset_gram(base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``(w_i - base) . (w_j - base)`` for every pair i <= j, in float32 (one fused pass when compiled)."""
    b = base.to(torch.float32)
    offsets = [w.to(torch.float32) - b for w in tensors]
    return torch.stack([(x * y).sum() for i, x in enumerate(offsets) for y in offsets[i:]])


def model_stock_ratio(gram: Sequence[float], n: int) -> float:
    """Model Stock's interpolation ratio ``n cos / (1 + (n - 1) cos)`` from :func:`offset_gram`,
    cos the mean cosine of the task vectors' pairs (0 when the denominator vanishes).

    >>> model_stock_ratio([1.0, 0.0, 1.0], 2)    # orthogonal task vectors: stay at the base
    0.0
    """
    it = iter(gram)
    g = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            g[i][j] = g[j][i] = next(it)
    cos = [max(-1.0, min(1.0, g[i][j] / max(math.sqrt(max(g[i][i], 0.0) * max(g[j][j], 0.0)), 1e-6))) for i in range(n) for j in range(i + 1, n)]
    cos_theta = sum(cos) / len(cos)
    denom = 1 + (n - 1) * cos_theta
    return 0.0 if abs(denom) < 1e-6 else n * cos_theta / denom


class ModelStock(MergeMethod):
    name = "model_stock"
    params = (ParamSpec("filter_wise", bool, False, shared=True),)
    base = "required"
    reference = "https://arxiv.org/abs/2403.19522"

    def check_inputs(self, recipe: Any, where: str) -> None:
        super().check_inputs(recipe, where)
        if len(recipe.model_refs) < 3:
            raise ConfigError(f"{where}: models: model_stock needs a base_model and at least two other models")

    def merge(self, job: Any) -> None:
        models = list(job.inputs)
        n = len(models)
        if not job.shared["filter_wise"]:
            ratio = model_stock_ratio(job.gram(models), n)
            job.weighted_sum([job.base, *models], [1 - ratio] + [ratio / n] * n)
            return
        for sl in job.blocks(vectors_along_first_dim=False):
            base = job.read_block(job.base, sl).to(torch.float32)
            merged = model_stock(base, [job.read_block(m, sl).to(torch.float32) for m in models], filter_wise=True)
            job.write_block(sl, merged)

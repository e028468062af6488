"""The ``size`` evaluator: a model's depth and parameter count, as objectives to minimize.

``size/layers`` is the number of decoder layers the model runs; ``size/params`` the
parameters of the model as written to disk (a routed model's repeated layer counts once
per slot, as its exported folder holds it; tied embeddings count once). With accuracy
beside them, a data-flow search's front shows accuracy against size.

Example::

    evaluators: [{preset: zoo_add}, {preset: size}]
    objectives: [{metric: zoo_add/accuracy}, {metric: size/layers, direction: minimize}]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from evomerge.config import Limit, SizeConfig
from evomerge.evaluate.base import Evaluator


class SizeEvaluator(Evaluator):
    kind = "size"

    def __init__(self, config: SizeConfig, base_dir: Path, where: Optional[str] = None):
        self.name = config.name or "size"
        self.metrics = {"layers": "minimize", "params": "minimize"}

    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Limit] = None) -> dict[str, float]:
        return {"layers": float(model.config.num_hidden_layers), "params": float(written_params(model))}


def written_params(model: Any) -> int:
    """Parameters of ``model`` as a folder holds them: every decoder-layer slot counted
    (a repeated layer once per slot), everything else once (tied embeddings once)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return sum(p.numel() for p in model.parameters())
    in_layers = {id(p) for p in layers.parameters()}
    per_slot = sum(p.numel() for _, p in layers.named_parameters(remove_duplicate=False))
    return per_slot + sum(p.numel() for p in model.parameters() if id(p) not in in_layers)

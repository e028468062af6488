"""A deterministic two-objective evaluator for search tests: closeness to each fine-tune.

``closeness/ft0`` and ``closeness/ft1`` are 1 / (1 + ||W - W_ft||) over all weights:
a merge cannot be closest to both, so the search has a real Pareto front.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file


class DistanceEvaluator:
    def __init__(self, targets: dict[str, Path], name: str = "closeness"):
        self.name = name
        self.targets = {k: load_file(str(Path(v) / "model.safetensors")) for k, v in targets.items()}
        self.metrics = {k: "maximize" for k in targets}
        self.calls = 0

    def evaluate(self, model, tokenizer, *, limit=None):
        self.calls += 1
        sd = model.state_dict()
        out = {}
        for key, target in self.targets.items():
            sq = sum(float(((sd[n].float() - t.float()) ** 2).sum()) for n, t in target.items())
            score = 1.0 / (1.0 + sq**0.5)
            if limit is not None:  # a cheap, noisier screen: fewer tensors
                score = round(score, 2)
            out[key] = score
        return out

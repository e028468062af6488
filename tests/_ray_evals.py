"""Evaluators for the Ray tests, importable inside Ray actors (PYTHONPATH = the repository).

``closeness`` scores a merged model by its weight distance to each fine-tune (two
objectives that pull apart), deterministic to the bit, optionally slowed down by a
sleep so that a test can kill a worker while it is busy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

REPO = str(Path(__file__).resolve().parents[1])


class Closeness:
    def __init__(self, targets: dict[str, str], sleep: float = 0.0, name: str = "closeness"):
        self.name = name
        self.targets = {k: load_file(str(Path(v) / "model.safetensors")) for k, v in targets.items()}
        self.metrics = {k: "maximize" for k in targets}
        self.sleep = float(sleep)

    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[float] = None) -> dict[str, float]:
        if self.sleep:
            time.sleep(self.sleep)
        sd = model.state_dict()
        out = {}
        for key, target in self.targets.items():
            sq = sum(float(((sd[n].float() - t.float()) ** 2).sum()) for n, t in target.items())
            out[key] = 1.0 / (1.0 + sq**0.5)
        return out


def build_evaluator(preset: str, split: str = "validation", **options: Any) -> Closeness:
    """Stands in for evomerge.evaluate.build_evaluator in the driver and in the actors."""
    return Closeness(options["targets"], sleep=options.get("sleep", 0.0))


def patch() -> None:
    """Ray ``worker_process_setup_hook``: every actor builds its evaluators here."""
    import evomerge.evaluate

    evomerge.evaluate.build_evaluator = build_evaluator


def runtime_env() -> dict:
    """What a Ray cluster started by a test gives its workers: this repo on the path, the patch."""
    return {"env_vars": {"PYTHONPATH": REPO}, "worker_process_setup_hook": "tests._ray_evals.patch"}

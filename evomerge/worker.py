"""Worker: one engine, one live model, its evaluators; a candidate recipe in, scores out.

A worker is built once (sources opened, model and tokenizer loaded, evaluators built)
and then serves many jobs: for each it merges the recipe into the live model in place
and runs the evaluators. The same class runs in process (serial executor) and inside
a Ray actor. A merge or evaluation error, or a score that is NaN or infinite, is
returned as the job's error; it never takes the worker down.
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

JobKind = Literal["screen", "full", "holdout"]


@dataclass(frozen=True)
class EvaluatorSpec:
    """How a worker builds one evaluator (plain data: crosses process boundaries)."""

    preset: str
    name: str
    split: str
    holdout_split: Optional[str]
    limit: Optional[Union[int, float]]
    options: dict = field(default_factory=dict)
    instance: Any = field(default=None, compare=False)  # an evaluator object a script built (used as is)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself (plain data: crosses process boundaries)."""

    models: tuple[str, ...]  # base first when there is one
    base_model: Optional[str]
    evaluators: tuple[EvaluatorSpec, ...]
    allow_pickle: bool = False
    device: str = "cpu"
    dtype: str = "float32"  # of the live model
    threads: Optional[int] = None
    base_dir: Optional[str] = None
    cache_dir: Optional[str] = None  # prepared task vectors shared by the workers of a node


@dataclass(frozen=True)
class Job:
    trial: int
    recipe: dict
    kind: JobKind = "full"
    limit: Optional[Union[int, float]] = None  # overrides the evaluators' own limit (screening)


@dataclass
class JobResult:
    trial: int
    kind: JobKind
    scores: Optional[dict[str, float]]
    error: Optional[str]
    merge_seconds: float
    eval_seconds: float
    worker_id: str
    fidelity: Optional[Union[int, float]] = None


class Worker:
    """Merges candidates into a live model and scores them."""

    def __init__(self, spec: WorkerSpec, worker_id: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.merge.engine import MergeEngine
        from evomerge.sources import SourceModel

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker start would drown the search's own
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        base_dir = Path(spec.base_dir) if spec.base_dir else None
        sources = [SourceModel.open(m, allow_pickle=spec.allow_pickle, base_dir=base_dir) for m in spec.models]
        self.engine = MergeEngine(sources, device=spec.device, cache_dir=Path(spec.cache_dir) if spec.cache_dir else None)
        ref = sources[0]
        # The live model is loaded once; every candidate is merged into it in place.
        self.model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, spec.dtype)).to(spec.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
        self._evaluators: dict[str, list[tuple[str, Any]]] = {}

    def evaluators(self, holdout: bool) -> list[tuple[str, Any]]:
        """(name, evaluator) pairs for the search split or the held-out split, built once."""
        from evomerge.evaluate import build_evaluator

        key = "holdout" if holdout else "search"
        if key not in self._evaluators:
            built = []
            for e in self.spec.evaluators:
                split = e.holdout_split if holdout else e.split
                if split is None:
                    continue
                built.append((e.name, e.instance if e.instance is not None else build_evaluator(e.preset, split=split, **e.options)))
            self._evaluators[key] = built
        return self._evaluators[key]

    def run(self, job: Job) -> JobResult:
        from evomerge.merge.recipe import Recipe

        merge_s = eval_s = 0.0
        try:
            t0 = time.perf_counter()
            recipe = Recipe.from_dict(job.recipe)
            self.engine.merge_into(self.model, recipe)
            t1 = time.perf_counter()
            merge_s = t1 - t0
            scores: dict[str, float] = {}
            for name, evaluator in self.evaluators(job.kind == "holdout"):
                limit = job.limit if job.limit is not None else _spec_limit(self.spec, name)
                for metric, value in evaluator.evaluate(self.model, self.tokenizer, limit=limit).items():
                    scores[f"{name}/{metric}"] = float(value)
            eval_s = time.perf_counter() - t1
            bad = [k for k, v in scores.items() if not math.isfinite(v)]
            if bad:
                return JobResult(job.trial, job.kind, None, f"non-finite score {bad[0]}={scores[bad[0]]}", merge_s, eval_s, self.worker_id, job.limit)
            return JobResult(job.trial, job.kind, scores, None, merge_s, eval_s, self.worker_id, job.limit)
        except Exception as exc:  # noqa: BLE001 - a failed candidate must not stop the search
            msg = f"{type(exc).__name__}: {exc}".strip()
            last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
            return JobResult(job.trial, job.kind, None, " ".join(msg.split())[:500] + where, merge_s, eval_s, self.worker_id, job.limit)


def _spec_limit(spec: WorkerSpec, name: str) -> Optional[Union[int, float]]:
    for e in spec.evaluators:
        if e.name == name:
            return e.limit
    return None

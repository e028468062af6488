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

from evomerge._background import BackgroundWriter, WriteDone, snapshot_fits

JobKind = Literal["screen", "full", "holdout", "write"]


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
    memory_device: Optional[int] = None  # the merge's budget in bytes (None: the engine's defaults)
    memory_host: Optional[int] = None
    lora_live: bool = False  # a linear search over LoRA adapters: the live model keeps LoRA layers


@dataclass(frozen=True)
class MemberRequest:
    """Write the candidate's model folder if it may join the front the driver had when it
    sent the job (a stale front only makes a worker write a folder the driver drops later).

    ``token``: the run folder's node token; a worker that reads the same token there shares
    the driver's file system and writes the folder in place, otherwise it sends the files.
    ``always``: write whatever the scores (a member whose folder is missing).
    """

    folder: str
    front: tuple[tuple[float, ...], ...] = ()
    objectives: tuple[tuple[str, str], ...] = ()  # (metric, direction)
    constraints: tuple[tuple[str, Optional[float], Optional[float]], ...] = ()  # (metric, min, max)
    token: Optional[str] = None
    always: bool = False


@dataclass(frozen=True)
class Job:
    trial: int
    recipe: dict
    kind: JobKind = "full"
    limit: Optional[Union[int, float]] = None  # overrides the evaluators' own limit (screening)
    member: Optional[MemberRequest] = None


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
    write_seconds: float = 0.0  # writing a front member's folder
    written: Optional[str] = None  # the member folder written in place, or (files set) to be written by the driver
    files: Optional[dict[str, bytes]] = None  # a member's files, when the worker does not share the run folder
    write_error: Optional[str] = None  # writing the member's folder failed (the scores stand)
    write_pending: bool = False  # ``written`` is being written in the background (see evomerge._background)
    writes_done: list[WriteDone] = field(default_factory=list)  # background writes finished since the last result
    note: Optional[str] = None  # a worker's first result: what its merge engine holds where


class Worker:
    """Merges candidates into a live model and scores them."""

    def __init__(self, spec: WorkerSpec, worker_id: Optional[str] = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.adapters import open_sources
        from evomerge.merge.budget import MemoryBudget
        from evomerge.merge.engine import MergeEngine
        from evomerge.merge.low_rank import lora_live_model, low_rank_adapters

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker start would drown the search's own
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        base_dir = Path(spec.base_dir) if spec.base_dir else None
        sources = open_sources(spec.models, base_model=spec.base_model, allow_pickle=spec.allow_pickle, base_dir=base_dir)
        ref = sources[0]
        # The live model is loaded once; every candidate is merged into it in place.
        self.model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, spec.dtype)).to(spec.device)
        self.model.eval()
        live_bytes = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        budget = MemoryBudget(spec.memory_device, spec.memory_host)
        self.engine = MergeEngine(sources, device=spec.device, budget=budget, live_model_bytes=live_bytes, n_models=max(1, len(sources) - 1))
        if spec.lora_live:  # only the LoRA factors change per candidate
            adapters = low_rank_adapters(self.engine, [s.ref for s in sources if s.ref != spec.base_model])
            if adapters:
                self.model = lora_live_model(self.model, adapters)
        self.placement = self.engine.placement.describe()
        self._noted = False
        self.tokenizer = AutoTokenizer.from_pretrained(ref.path)
        self._evaluators: dict[str, list[tuple[str, Any]]] = {}
        self._router: Any = None  # built on the first layer stack (data-flow search)
        self._writer = BackgroundWriter()

    def router(self) -> Any:
        """The router of layer stacks: every source loaded once, as modules to route through."""
        if self._router is None:
            import torch
            from transformers import AutoModelForCausalLM

            from evomerge.merge.routed import Router

            dtype = getattr(torch, self.spec.dtype)
            models = {s.ref: AutoModelForCausalLM.from_pretrained(s.path, dtype=dtype).to(self.spec.device).eval()
                      for s in self.engine.sources.values() if s.ref in self.spec.models}
            self._router = Router(models)
        return self._router

    def live(self, recipe: Any) -> Any:
        """The live model of a candidate: the parameter merge written into the live model in
        place, or a layer stack routed through the sources (a chain's parameter stage merged
        in place first, then routed through as one more source). Copies no weight."""
        from evomerge.errors import MergeError
        from evomerge.merge.chain import RecipeChain
        from evomerge.merge.recipe import Recipe

        if isinstance(recipe, Recipe):
            self.engine.merge_into(self.model, recipe)
            return self.model
        stages = recipe.stages if isinstance(recipe, RecipeChain) else []
        for stage in stages:
            if not isinstance(stage, Recipe) or any(m in recipe.stage_names for m in stage.model_refs):
                raise MergeError(f"chain stage {stage.name}: a worker chains one parameter merge of the sources into a layer stack")
            self.engine.merge_into(self.model, stage)
            self.router().add(stage.name, self.model)
        final = recipe.final if isinstance(recipe, RecipeChain) else recipe
        return self.router().route(final)

    def _write_stack(self, recipe: Any, target: Path) -> None:
        """A routed candidate's folder, from the modules it routes through (no merge again)."""
        import torch

        from evomerge.merge.chain import RecipeChain
        from evomerge.merge.stack import write_stack

        final = recipe.final if isinstance(recipe, RecipeChain) else recipe
        models = self.router().models
        states: dict[str, dict] = {}

        def tensor(ref: str, name: str) -> Any:
            if ref not in states:
                states[ref] = models[ref].state_dict()
            return states[ref][name]

        sources = self.engine.sources
        reference = sources.get(final.first_model) or next(iter(sources.values()))
        write_stack(final, target, tensor=tensor, names=self.engine.names, shape=self.engine.shape,
                    reference=reference, dtype=getattr(torch, self.spec.dtype), full_recipe=recipe)

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
        result = self._run(job)
        if not self._noted:  # the driver says it once per kind of worker
            result.note, self._noted = f"{self.worker_id}: {self.placement}", True
        result.writes_done = self._writer.drain()
        return result

    def flush_writes(self) -> list[WriteDone]:
        """Wait for the member being written in the background; what finished since the last result."""
        self._writer.wait()
        return self._writer.drain()

    def _run(self, job: Job) -> JobResult:
        from evomerge.merge.chain import load_recipe
        from evomerge.merge.recipe import Recipe

        merge_s = eval_s = 0.0
        try:
            t0 = time.perf_counter()
            recipe = load_recipe(job.recipe)
            if job.kind == "write":  # a member's folder, rebuilt from its recipe: merged, not scored
                if not isinstance(recipe, Recipe):
                    self.live(recipe)  # a layer stack is written from the modules it routes through
                return self._member(job, recipe, {}, JobResult(job.trial, job.kind, None, None, 0.0, 0.0, self.worker_id))
            model = self.live(recipe)
            t1 = time.perf_counter()
            merge_s = t1 - t0
            scores: dict[str, float] = {}
            for name, evaluator in self.evaluators(job.kind == "holdout"):
                limit = job.limit if job.limit is not None else _spec_limit(self.spec, name)
                for metric, value in evaluator.evaluate(model, self.tokenizer, limit=limit).items():
                    scores[f"{name}/{metric}"] = float(value)
            eval_s = time.perf_counter() - t1
            bad = [k for k, v in scores.items() if not math.isfinite(v)]
            if bad:
                return JobResult(job.trial, job.kind, None, f"non-finite score {bad[0]}={scores[bad[0]]}", merge_s, eval_s, self.worker_id, job.limit)
            result = JobResult(job.trial, job.kind, scores, None, merge_s, eval_s, self.worker_id, job.limit)
            return self._member(job, recipe, scores, result) if job.kind == "full" else result
        except Exception as exc:  # noqa: BLE001 - a failed candidate must not stop the search
            msg = f"{type(exc).__name__}: {exc}".strip()
            last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
            return JobResult(job.trial, job.kind, None, " ".join(msg.split())[:500] + where, merge_s, eval_s, self.worker_id, job.limit)


    def _member(self, job: Job, recipe: Any, scores: dict[str, float], result: JobResult) -> JobResult:
        """Write the candidate's folder from the live model (no second merge) when the
        request says it may join the front; in place, or as files for the driver."""
        req = job.member
        if req is None or not _wanted(req, scores):
            return result
        import shutil
        import tempfile

        from evomerge.merge.low_rank import is_lora_live
        from evomerge.merge.recipe import Recipe

        t0 = time.perf_counter()
        folder = Path(req.folder)
        shared = req.token is not None and _node_token(folder.parent.parent) == req.token
        target = folder if shared else Path(tempfile.mkdtemp(prefix="evomerge-member-")) / folder.name
        try:
            if shared and job.kind == "full" and isinstance(recipe, Recipe) and not is_lora_live(self.model) and not target.is_dir() \
                    and snapshot_fits(self.engine.placement.live_model_bytes):
                # The live model moves on to the next candidate: write from a host copy, in the background.
                self._writer.wait()
                snapshot = self.engine.snapshot(self.model)
                self._writer.start(job.trial, str(folder), lambda: self.engine.write_live(snapshot, recipe, target))
                result.written, result.write_pending = str(folder), True
                result.write_seconds = time.perf_counter() - t0
                return result
            if not target.is_dir():
                if not isinstance(recipe, Recipe):  # a layer stack (data-flow search)
                    self._write_stack(recipe, target)
                elif job.kind == "write" or is_lora_live(self.model):  # merged from the sources, one tensor at a time
                    self.engine.write(recipe, target)
                else:
                    self.engine.write_live(self.model, recipe, target)
            result.written = str(folder)
            if not shared:
                result.files = {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}
        except Exception as exc:  # noqa: BLE001 - the scores stand; a missing folder is written again later
            if job.kind == "write":
                raise
            result.write_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        finally:
            if not shared:
                shutil.rmtree(target.parent, ignore_errors=True)
        result.write_seconds = time.perf_counter() - t0
        return result


NODE_TOKEN = ".node"  # in a run folder: proves a worker sees the driver's file system


def node_token(run_dir: Path) -> str:
    """The run folder's node token, made once (by the driver): workers that read the same
    token there share the driver's file system."""
    import uuid

    path = Path(run_dir) / NODE_TOKEN
    if not path.is_file():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{NODE_TOKEN}.tmp-{os.getpid()}")
        tmp.write_text(uuid.uuid4().hex + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()


def _node_token(run_dir: Path) -> Optional[str]:
    try:
        return (run_dir / NODE_TOKEN).read_text().strip()
    except OSError:
        return None


def _wanted(req: MemberRequest, scores: dict[str, float]) -> bool:
    if req.always:
        return True
    from evomerge.objective import Objective, dominated_by_front

    for metric, low, high in req.constraints:
        value = scores.get(metric)
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            return False
    objectives = [Objective(m, d) for m, d in req.objectives]
    return not dominated_by_front([scores[m] for m, _ in req.objectives], [list(f) for f in req.front], objectives)


def _spec_limit(spec: WorkerSpec, name: str) -> Optional[Union[int, float]]:
    for e in spec.evaluators:
        if e.name == name:
            return e.limit
    return None

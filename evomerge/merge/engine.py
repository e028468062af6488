"""MergeEngine: plans a recipe tensor by tensor and runs each method's kernel, in place or to disk.

The engine opens the sources (memory-mapped safetensors), checks them, and resolves
every parameter of a recipe for every tensor before anything is merged (errors name
the tensor and parameter). Each tensor then goes to its method as a
:class:`~evomerge.merge._job.TensorJob`: the method reads the sources a chunk at a time
(task vectors are made on the fly, in float32), asks for the statistics it needs
(kept per tensor, all small: norms, magnitude histograms, thresholds already found),
and writes into the live model's tensor or an output buffer. Nothing of full-model
size is kept per source unless the memory budget has room for it: on a GPU, sources
that fit are copied to the device once (the base first) and the others are streamed
per chunk; see :mod:`evomerge.merge.budget`.

Example:
    >>> recipe = Recipe.from_yaml("recipe.yaml")               # doctest: +SKIP
    >>> engine = MergeEngine.from_recipe(recipe)                # doctest: +SKIP
    >>> engine.merge_into(model, recipe)    # live nn.Module    # doctest: +SKIP
    >>> engine.write(recipe, Path("out"))  # HF folder          # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from evomerge.adapters import AdapterSource, open_sources
from evomerge.errors import MergeError, SourceError
from evomerge.io import atomic_folder, check_output_folder
from evomerge.merge.card import model_card
from evomerge.merge._job import TensorJob
from evomerge.merge._kernels import Kernels
from evomerge.merge._selection import HIGH_BINS, MagnitudeHistogram, count_bins, delta_stats_kernel
from evomerge.merge.low_rank import is_lora_live, merge_into_lora
from evomerge.merge.budget import MemoryBudget, Placement, plan_placement, return_freed_host_memory
from evomerge.merge.methods import MergeMethod, TensorPlan, get_method
from evomerge.merge.params import ParamSpec
from evomerge.merge.recipe import Recipe, parse_dtype
from evomerge.sources import SourceModel, check_compatible, layer_index

SHARD_BYTES = 5 * 1024**3
RECENT_KEPT = 1 << 16  # thresholds and masked norms remembered for later candidates (a few per tensor and model)


class DeltaStats:
    """What one model's task vector of one tensor looks like: its L1 norm and the
    histogram of its magnitudes (a few kilobytes)."""

    def __init__(self, l1: float, histogram: MagnitudeHistogram):
        self.l1 = l1
        self.histogram = histogram


class MergeEngine:
    """Merge candidates from a fixed set of source models, fast, repeatably, within a memory budget."""

    def __init__(
        self,
        sources: Sequence[SourceModel],
        *,
        device: str = "cpu",
        compile: Optional[bool] = None,
        budget: MemoryBudget = MemoryBudget(),
        live_model_bytes: int = 0,
        n_models: Optional[int] = None,
        chunk_numel: Optional[int] = None,
    ):
        """``live_model_bytes`` and ``n_models`` (inputs per merge) size the placement;
        ``chunk_numel`` overrides the chunk size the budget gives (tests cut small tensors)."""
        if not sources:
            raise MergeError("no source models given")
        self.sources: dict[str, SourceModel] = {s.ref: s for s in sources}
        self.names = check_compatible(list(sources))
        for s in sources:  # an adapter's base, when the merge does not name it, is read too
            if isinstance(s, AdapterSource) and s.base.ref not in self.sources:
                self.sources[s.base.ref] = s.base
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError(f"device {device} was asked for, but no CUDA device is available here")
        self.kernels = Kernels(compile, device=self.device.type)
        self.placement: Placement = plan_placement(
            [(s.ref, _float_bytes(s)) for s in self.sources.values()],
            device=str(self.device),
            live_model_bytes=live_model_bytes,
            n_models=n_models if n_models is not None else max(1, len(sources) - 1),
            budget=budget,
        )
        self.chunk_numel = chunk_numel or self.placement.chunk_numel
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._stats: dict[tuple, Any] = {}
        self._recent: OrderedDict[tuple, float] = OrderedDict()

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        allow_pickle: bool = False,
        base_dir: Optional[Path] = None,
        device: str = "cpu",
        compile: Optional[bool] = None,
        budget: MemoryBudget = MemoryBudget(),
    ) -> "MergeEngine":
        """Open and check every model a recipe names (the base first)."""
        sources = open_sources(recipe.model_refs, base_model=recipe.base_model, allow_pickle=allow_pickle, base_dir=base_dir)
        return cls(sources, device=device, compile=compile, budget=budget, n_models=len(get_method(recipe.merge_method).inputs(recipe)))

    # ------------------------------------------------------------------ planning
    def source(self, ref: str) -> SourceModel:
        try:
            return self.sources[ref]
        except KeyError:
            raise MergeError(f"recipe names model {ref}, which this engine was not opened with") from None

    def _reference(self, recipe: Recipe) -> SourceModel:
        return self.source(recipe.base_model if recipe.base_model is not None else recipe.models[0].model)

    def plan(self, recipe: Recipe) -> list[TensorPlan]:
        """Resolve every parameter for every tensor; all errors surface here, before merging."""
        method = get_method(recipe.merge_method)
        ref = self._reference(recipe)
        for r in recipe.model_refs:
            self.source(r)
        n_layers = ref.num_layers
        inputs = method.inputs(recipe)
        plans = []
        for name in self.names:
            if not _is_float(ref.dtype(name)):
                plans.append(TensorPlan(name, 0.0, {}, (), {}))
                continue
            layer = layer_index(name)
            t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
            shared = {p.name: self._resolve(recipe, p, name, t, None) for p in method.shared_params}
            per_model = {m: {p.name: self._resolve(recipe, p, name, t, m) for p in method.model_params} for m in inputs}
            plan = TensorPlan(name, t, shared, inputs, per_model)
            method.check_plan(plan)
            plans.append(plan)
        return plans

    @staticmethod
    def _resolve(recipe: Recipe, spec: ParamSpec, tensor: str, t: float, model: Optional[str]) -> Any:
        value = recipe.resolve(spec.name, tensor, t, model)
        if value is None:
            if spec.required:
                who = f"model {model}, " if model else ""
                where = "that model's parameters, or the recipe's parameters for every model" if model else "the recipe's parameters"
                raise MergeError(f"missing required parameter '{spec.name}' for {who}tensor {tensor}: set it in {where}")
            return spec.default
        where = f"parameter '{spec.name}' for {'model ' + model + ', ' if model else ''}tensor {tensor}"
        return spec.validate(value, where=where)

    # ------------------------------------------------------------------ reading
    def _source_name(self, ref: str, name: str) -> str:
        src = self.source(ref)
        if name not in src._meta and name == "lm_head.weight" and src.tied_embeddings:
            return "model.embed_tokens.weight"
        return name

    def full(self, ref: str, name: str) -> torch.Tensor:
        """A source's whole tensor as stored: resident on the device, or memory-mapped
        (an adapter's: made from its base's and its factors, one tensor at a time)."""
        key = (ref, name)
        hit = self._resident.get(key)
        if hit is not None:
            return hit
        src = self.source(ref)
        if isinstance(src, AdapterSource):
            return src.add_update(name, self.full(src.base.ref, name).reshape(-1), 0, math.prod(self.shape(name))).reshape(self.shape(name))
        t = src.tensor(self._source_name(ref, name))
        if ref in self.placement.resident:
            t = t.to(self.device)
            self._resident[key] = t
        return t

    def read(self, ref: str, name: str, a: int, b: int) -> torch.Tensor:
        """Entries [a, b) of a source's flattened tensor, as stored, on the engine's device
        (an adapter's in float32: its base's plus the rows of its update)."""
        src = self.source(ref)
        if isinstance(src, AdapterSource):
            return src.add_update(name, self.read(src.base.ref, name, a, b), a, b)
        return self.full(ref, name).reshape(-1)[a:b].to(self.device)

    def shape(self, name: str) -> tuple[int, ...]:
        return next(iter(self.sources.values())).shape(name)

    # ------------------------------------------------------------------ statistics
    def stat(self, key: tuple, compute: Optional[Callable[[], Any]] = None) -> Any:
        """A per-tensor statistic (small), computed once by ``compute`` and kept."""
        if key not in self._stats:
            if compute is None:
                raise KeyError(key)
            self._stats[key] = compute()
            self._after_statistics()
        return self._stats[key]

    def _after_statistics(self) -> None:
        """Return a statistics pass's freed temporaries to the system (on a CPU). Its small
        kept results land between them in glibc's heap and fragment it: without this,
        DARE's first pass grew the engine's memory by 4 bytes per parameter. Paid once per
        tensor, on the first candidate."""
        if self.device.type == "cpu":
            return_freed_host_memory()

    def delta_stats(self, base: str, models: list[str], name: str, chunks: Iterable[tuple[int, int]]) -> None:
        """L1 norm and magnitude histogram of each model's task vector, in one pass reading the base once."""
        todo = [m for m in models if ("delta", name, base, m) not in self._stats]
        if not todo:
            return
        counts = {m: torch.zeros(2 * HIGH_BINS, dtype=torch.int64) for m in todo}
        l1 = {m: 0.0 for m in todo}
        for a, b in chunks:
            base_chunk = self.read(base, name, a, b)
            sums, bins = self.kernels.run(delta_stats_kernel, b - a, base_chunk, [self.read(m, name, a, b) for m in todo])
            for m, total, chunk_bins in zip(todo, sums.tolist(), bins):
                l1[m] += total
                counts[m] += count_bins(chunk_bins)
        for m in todo:
            self._stats[("delta", name, base, m)] = DeltaStats(l1[m], MagnitudeHistogram.from_counts(counts[m]))
        self._after_statistics()

    def recall(self, key: tuple) -> Optional[float]:
        """A candidate-dependent number found before (a threshold, a masked norm), or None."""
        return self._recent.get(key)

    def remember(self, key: tuple, value: float) -> None:
        """Keep a candidate-dependent number for later candidates (the oldest go first)."""
        self._recent[key] = value
        while len(self._recent) > RECENT_KEPT:
            self._recent.popitem(last=False)

    def clear_cache(self) -> None:
        """Forget statistics and device copies (they are rebuilt on the next merge)."""
        self._stats.clear()
        self._recent.clear()
        self._resident.clear()

    # ------------------------------------------------------------------ merging
    def _merge_tensor(self, recipe: Recipe, method: MergeMethod, plan: TensorPlan, out: torch.Tensor) -> None:
        """Merge one tensor into ``out`` (contiguous, on the engine's device, any float dtype)."""
        if not plan.inputs:  # not a float tensor: the reference's own values
            out.view(-1).copy_(self.full(self._reference(recipe).ref, plan.name).reshape(-1))
            return
        seed = recipe.random_seed if recipe.random_seed is not None else 0
        job = TensorJob(self, plan, recipe.base_model, seed, self.shape(plan.name), out.view(-1))
        method.merge(job)
        if self.device.type == "cpu" and job.numel >= self.chunk_numel:
            return_freed_host_memory()

    def merged_tensor(self, recipe: Recipe, plan: TensorPlan) -> torch.Tensor:
        """The merged value of one tensor: float32 for float tensors, the reference's for others."""
        ref = self._reference(recipe)
        dtype = torch.float32 if plan.inputs else getattr(torch, ref.dtype(plan.name))
        out = torch.empty(self.shape(plan.name), dtype=dtype, device=self.device)
        self._merge_tensor(recipe, get_method(recipe.merge_method), plan, out)
        return out

    # ------------------------------------------------------------------ outputs
    def merge_into(self, model: torch.nn.Module, recipe: Recipe) -> dict[str, float]:
        """Write the merged weights into a live model, in place, with no disk I/O.

        Returns timings. The model must have the sources' architecture; its
        parameter names are the checkpoint's tensor names.
        """
        if is_lora_live(model):  # base + LoRA layers: only the factors change
            return merge_into_lora(self, model, recipe)
        start = time.perf_counter()
        plans = self.plan(recipe)
        method = get_method(recipe.merge_method)
        targets = model.state_dict(keep_vars=True)
        for plan in plans:
            if plan.name not in targets:
                raise MergeError(f"the live model has no tensor named {plan.name}")
            if tuple(targets[plan.name].shape) != self.shape(plan.name):
                raise MergeError(
                    f"shape mismatch at tensor {plan.name}: live model has {list(targets[plan.name].shape)}, "
                    f"sources have {list(self.shape(plan.name))}"
                )
        with torch.no_grad():
            for plan in plans:
                target = targets[plan.name].data
                if target.is_contiguous() and target.device == self.device:
                    self._merge_tensor(recipe, method, plan, target)
                else:  # a view or another device: merge into a buffer, then copy
                    buffer = torch.empty(target.shape, dtype=target.dtype, device=self.device)
                    self._merge_tensor(recipe, method, plan, buffer)
                    target.copy_(buffer)
        return {"merge_seconds": time.perf_counter() - start}

    def write(
        self,
        recipe: Recipe,
        out: Path,
        *,
        overwrite: bool = False,
        progress: bool = False,
        shard_bytes: int = SHARD_BYTES,
    ) -> dict[str, Any]:
        """Write the merged model as a Hugging Face folder, atomically.

        safetensors shards, config, generation config, tokenizer (from
        ``tokenizer_source`` or the base), ``merge_recipe.yaml`` and a model card.
        """
        out = Path(out)
        check_output_folder(out, overwrite)
        start = time.perf_counter()
        plans = self.plan(recipe)
        method = get_method(recipe.merge_method)
        ref = self._reference(recipe)
        out_dtype = self._out_dtype(recipe, ref)
        tok_src = self._tokenizer_source(recipe, ref)

        def dtype_of(name: str) -> torch.dtype:
            return out_dtype if _is_float(ref.dtype(name)) else getattr(torch, ref.dtype(name))

        def tensors() -> Iterable[tuple[str, torch.Tensor]]:
            for plan in plans:
                value = torch.empty(self.shape(plan.name), dtype=dtype_of(plan.name), device=self.device)
                with torch.no_grad():
                    self._merge_tensor(recipe, method, plan, value)
                yield plan.name, value

        with atomic_folder(out, overwrite=overwrite) as tmp, _progress(progress, len(plans), f"merging {recipe.merge_method}", self.placement.describe()) as advance:
            sizes = [(p.name, math.prod(self.shape(p.name)) * _itemsize(dtype_of(p.name))) for p in plans]
            n_shards = write_safetensors(tmp, tensors(), sizes, shard_bytes, on_tensor=advance)
            write_model_files(tmp, ref, recipe, out_dtype, tok_src, title=out.name)
        return {
            "out": str(out),
            "merge_method": recipe.merge_method,
            "n_tensors": len(plans),
            "n_shards": n_shards,
            "dtype": str(out_dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - start,
        }

    def snapshot(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Host copies of a live model's tensors, for :meth:`write_live` once the model has
        moved on to the next candidate (a worker writes front members in the background)."""
        state = self._live_state(model)
        return {n: state[n].detach().to("cpu", copy=True) for n in self.names}

    def write_live(self, model: torch.nn.Module | Mapping[str, torch.Tensor], recipe: Recipe, out: Path, *, overwrite: bool = False,
                   shard_bytes: int = SHARD_BYTES) -> dict[str, Any]:
        """Write a live model that holds ``recipe``'s merge (after :meth:`merge_into`), or its
        :meth:`snapshot`, as the folder :meth:`write` would make, without merging again: its
        tensors in its dtype."""
        out = Path(out)
        check_output_folder(out, overwrite)
        start = time.perf_counter()
        ref = self._reference(recipe)
        state = self._live_state(model) if isinstance(model, torch.nn.Module) else model
        dtype = next((state[n].dtype for n in self.names if state[n].is_floating_point()), torch.float32)
        sizes = [(n, state[n].numel() * state[n].element_size()) for n in self.names]
        with atomic_folder(out, overwrite=overwrite) as tmp:
            n_shards = write_safetensors(tmp, ((n, state[n]) for n in self.names), sizes, shard_bytes)
            write_model_files(tmp, ref, recipe, dtype, self._tokenizer_source(recipe, ref), title=out.name)
        return {"out": str(out), "merge_method": recipe.merge_method, "n_tensors": len(self.names), "n_shards": n_shards,
                "dtype": str(dtype).removeprefix("torch."), "seconds": time.perf_counter() - start}

    def _live_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        missing = [n for n in self.names if n not in state]
        if missing:
            raise MergeError(f"the live model has no tensor named {missing[0]}")
        return state

    def write_adapter(self, recipe: Recipe, out: Path, *, rank: Optional[int] = None, overwrite: bool = False) -> dict[str, Any]:
        """Write the merge as one PEFT LoRA adapter: exact for a linear merge of adapters,
        else truncated to ``rank`` by SVD (see :func:`evomerge.merge.low_rank.write_adapter`)."""
        from evomerge.merge.low_rank import write_adapter

        return write_adapter(self, recipe, out, rank=rank, overwrite=overwrite)

    def _out_dtype(self, recipe: Recipe, ref: SourceModel) -> torch.dtype:
        if recipe.out_dtype:
            return parse_dtype(recipe.out_dtype)
        if recipe.dtype:
            return parse_dtype(recipe.dtype)
        for name in self.names:
            if _is_float(ref.dtype(name)):
                return getattr(torch, ref.dtype(name))
        return torch.float32

    def _tokenizer_source(self, recipe: Recipe, ref: SourceModel) -> SourceModel:
        ts = recipe.tokenizer_source
        if ts in (None, "base"):
            return ref
        if ts in self.sources:
            return self.sources[ts]
        try:
            return SourceModel.open(ts)
        except SourceError as exc:
            raise MergeError(f"tokenizer_source: {exc}") from None


def _is_float(dtype: str) -> bool:
    return dtype in ("float32", "float16", "bfloat16", "float64")


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.empty((), dtype=dtype).element_size()


def _assign_shards(sizes: Iterable[tuple[str, int]], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _float_bytes(src: SourceModel) -> int:
    """Bytes of a source's floating-point tensors as stored (what a device copy costs; an
    adapter's factors)."""
    if isinstance(src, AdapterSource):
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in src.factors.values())
    return sum(math.prod(src.shape(n)) * _itemsize(src.dtype(n)) for n in src.tensor_names if _is_float(src.dtype(n)))


def write_safetensors(
    folder: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    sizes: Sequence[tuple[str, int]],
    shard_bytes: int = SHARD_BYTES,
    on_tensor: Callable[[], None] = lambda: None,
) -> int:
    """Write named tensors (produced one at a time, in ``sizes`` order) as safetensors
    shards and, when there are several, their index; only one shard is held at a time.
    Returns the number of shards."""
    from safetensors.torch import save_file

    shards = _assign_shards(sizes, shard_bytes)
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    weight_map: dict[str, str] = {}
    total_size = 0
    current: dict[str, torch.Tensor] = {}
    index = 0

    def fname(i: int) -> str:
        return "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

    for name, value in tensors:
        if shard_of[name] != index and current:
            save_file(current, str(folder / fname(index)), metadata={"format": "pt"})
            current = {}
        index = shard_of[name]
        current[name] = value.detach().to("cpu").contiguous()
        total_size += value.numel() * value.element_size()
        weight_map[name] = fname(index)
        on_tensor()
    if current:
        save_file(current, str(folder / fname(index)), metadata={"format": "pt"})
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    return len(shards)


def write_model_files(folder: Path, ref: SourceModel, recipe: Any, dtype: torch.dtype, tokenizer: SourceModel, *, title: str,
                      config_changes: Optional[dict[str, Any]] = None) -> None:
    """Everything of a model folder but its weights: config (with the dtype written, and
    ``config_changes``: a layer stack's depth), generation config, tokenizer, chat
    template, the recipe (any recipe object with ``to_yaml``) and a model card."""
    config = dict(ref.config, **(config_changes or {}))
    dtype_key = "torch_dtype" if "torch_dtype" in config else "dtype"
    config[dtype_key] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = ref.path / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)
    for f in tokenizer.tokenizer_files():
        shutil.copy2(f, folder / f.name)
    final = getattr(recipe, "final", recipe)  # a chain's output recipe
    if final.chat_template:
        (folder / "chat_template.jinja").write_text(final.chat_template)
    text = recipe.to_yaml()
    (folder / "merge_recipe.yaml").write_text(text)
    (folder / "README.md").write_text(model_card(text, base_model=getattr(final, "base_model", None), models=recipe.model_refs, title=title))


class _progress:
    """Progress over tensors as :mod:`evomerge.progress` events (drawn by the CLI), or nothing;
    its first line says what the engine holds where."""

    def __init__(self, enabled: bool, total: int, label: str, placement: str = ""):
        from evomerge.progress import task

        self._task, self._done, self._placement = task(label, total, enabled=enabled), 0, placement

    def __enter__(self):
        self._task.__enter__()
        if self._placement:
            self._task.say(self._placement)
        return self._advance

    def _advance(self) -> None:
        self._done += 1
        self._task.advance(self._done)

    def __exit__(self, *exc):
        return self._task.__exit__(*exc)

"""Write a layer stack (a ``slices:`` recipe, alone or ending a chain) as a model folder.

The tensors of output layer ``i`` are those of the slot's source layer, renamed to
``model.layers.i.*`` and multiplied by the slot's ``scale`` where one is set; the
embeddings come from the first slot's model, every other tensor outside the layers
(final norm, head) from the last slot's, as mergekit 0.1.5 writes them. The config is
the first model's with ``num_hidden_layers`` set to the new depth.

Where the tensors come from is the caller's: an engine's sources (memory-mapped, or a
chain's parameter stage merged one tensor at a time) for ``evomerge merge``, or the
live modules a worker routes through for a front member.

Example:
    >>> write_stack(load_recipe("stack.yaml"), Path("out"))   # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch

from evomerge.errors import MergeError
from evomerge.io import atomic_folder, check_output_folder
from evomerge.merge.chain import RecipeChain, load_recipe
from evomerge.merge.recipe import Recipe, parse_dtype
from evomerge.merge.slices import SliceRecipe
from evomerge.sources import SourceModel, layer_index

#: tensor(model ref or stage name, tensor name) -> the tensor as that model holds it
TensorFn = Callable[[str, str], torch.Tensor]
_LAYER_PREFIX = "model.layers."


def stack_plan(recipe: SliceRecipe, names: Iterable[str]) -> list[tuple[str, str, str, Optional[float]]]:
    """``(output name, model, source tensor name, scale)`` for every output tensor, in
    output order: embeddings, the layers in turn, then the rest (norm, head).

    ``names``: the sources' tensor names (one layout shared by every source).
    """
    names = list(names)
    per_layer: dict[int, list[str]] = {}
    outside = []
    for n in names:
        j = layer_index(n)
        if j is None:
            outside.append(n)
        else:
            per_layer.setdefault(j, []).append(n)
    if any(not n.startswith(_LAYER_PREFIX) for ns in per_layer.values() for n in ns):
        raise MergeError(f"layer stacking reads decoder layers under {_LAYER_PREFIX}N (Llama-style layouts)")
    plan: list[tuple[str, str, str, Optional[float]]] = []
    pre = [n for n in outside if "embed_tokens" in n]
    post = [n for n in outside if n not in pre]
    plan += [(n, recipe.first_model, n, recipe.outside_scale(n, last=False)) for n in pre]
    for slot in recipe.slots():
        for n in per_layer.get(slot.layer, []):
            out = f"{_LAYER_PREFIX}{slot.index}.{n[len(f'{_LAYER_PREFIX}{slot.layer}.'):]}"
            plan.append((out, slot.model, n, slot.scale(n)))
    plan += [(n, recipe.last_model, n, recipe.outside_scale(n, last=True)) for n in post]
    return plan


def write_stack(
    recipe: SliceRecipe,
    out: Path,
    *,
    tensor: TensorFn,
    names: Iterable[str],
    shape: Callable[[str], tuple[int, ...]],
    reference: SourceModel,
    dtype: torch.dtype,
    tokenizer: Optional[SourceModel] = None,
    overwrite: bool = False,
    full_recipe: Any = None,
) -> dict[str, Any]:
    """Write the stack as a Hugging Face folder, atomically (see the module docstring).

    ``reference``: the source whose config and files the folder takes (the first
    slot's model, or a source of the same architecture when that is a chain's stage);
    ``shape``: a source tensor's shape; ``dtype``: of the written floats;
    ``full_recipe``: the recipe written beside the weights (a chain), default ``recipe``.
    """
    from evomerge.merge.engine import write_model_files, write_safetensors

    out = Path(out)
    check_output_folder(out, overwrite)
    start = time.perf_counter()
    plan = stack_plan(recipe, names)

    def tensors() -> Iterable[tuple[str, torch.Tensor]]:
        seen: set[tuple[str, str]] = set()
        for out_name, model, name, scale in plan:
            t = tensor(model, name).detach()
            if scale is not None:
                t = t.to(torch.float32) * scale
            t = t.to(dtype) if t.is_floating_point() else t
            if (model, name) in seen and t.data_ptr() == tensor(model, name).data_ptr():
                t = t.clone()  # a repeated layer: safetensors stores each tensor once
            seen.add((model, name))
            yield out_name, t

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = [(out_name, math.prod(shape(name)) * itemsize) for out_name, _, name, _ in plan]
    with atomic_folder(out, overwrite=overwrite) as tmp:
        n_shards = write_safetensors(tmp, tensors(), sizes)
        write_model_files(tmp, reference, full_recipe or recipe, dtype, tokenizer or reference, title=out.name,
                          config_changes={"num_hidden_layers": recipe.depth})
    return {"out": str(out), "merge_method": "passthrough (slices)", "n_tensors": len(plan), "n_shards": n_shards,
            "depth": recipe.depth, "dtype": str(dtype).removeprefix("torch."), "seconds": time.perf_counter() - start}


def build_stack(
    recipe: Union[SliceRecipe, RecipeChain, dict, str, Path],
    out: Path,
    *,
    allow_pickle: bool = False,
    base_dir: Optional[Path] = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> dict[str, Any]:
    """``evomerge merge`` for a layer stack or a chain ending in one: every source opened
    and checked first; a chain's parameter stages merged one tensor at a time, in memory."""
    from evomerge.adapters import open_sources
    from evomerge.merge.engine import MergeEngine

    parsed = load_recipe(recipe)
    chain = parsed if isinstance(parsed, RecipeChain) else None
    final = chain.final if chain else parsed
    if not isinstance(final, SliceRecipe):
        raise MergeError("build_stack writes layer stacks (a slices: recipe, or a chain ending in one)")
    stages: dict[str, Recipe] = {}
    for s in chain.stages if chain else []:
        if not isinstance(s, Recipe) or any(m in stages for m in s.model_refs):
            raise MergeError(f"chain stage {s.name}: evomerge chains a parameter merge of the sources into a layer stack (one models: stage)")
        stages[s.name] = s
    refs = chain.model_refs if chain else final.model_refs
    base = next((s.base_model for s in stages.values() if s.base_model), None)
    sources = open_sources(refs, base_model=base, allow_pickle=allow_pickle, base_dir=base_dir)
    engine = MergeEngine(sources, device=device)
    depth_of = {s.ref: s.num_layers for s in sources} | {name: sources[0].num_layers for name in stages}
    final.check_depths(depth_of)
    plans = {name: {p.name: p for p in engine.plan(r)} for name, r in stages.items()}

    def tensor(model: str, name: str) -> torch.Tensor:
        if model in stages:
            return engine.merged_tensor(stages[model], plans[model][name])
        return engine.full(model, name)

    first = final.first_model
    reference = engine.source(first) if first not in stages else engine.source(refs[0])
    named = final.out_dtype or final.dtype
    dtype = parse_dtype(named) if named else getattr(torch, reference.dtype(engine.names[0]))
    return write_stack(final, Path(out), tensor=tensor, names=engine.names, shape=engine.shape, reference=reference,
                       dtype=dtype, overwrite=overwrite, full_recipe=parsed)

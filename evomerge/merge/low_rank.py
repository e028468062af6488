"""Merges of LoRA adapters in low-rank form: live models with swapped factors, and adapters out.

A merge that is linear in the task vectors (linear, task arithmetic: the method gives
:meth:`~evomerge.merge.methods.base.MergeMethod.linear_coefficients`) of adapters
``delta_i = s_i B_i A_i`` is ``base + sum c_i s_i B_i A_i = base + [c_1 s_1 B_1 | ...] @
[A_1; ...]``: exact, of rank ``sum r_i``. So

- a live model for such a search is the base wrapped in one PEFT LoRA layer per target
  module, the adapters' ``A`` side by side (set once); a candidate only rescales the
  ``B`` blocks, O(rank), not O(parameters) (:func:`lora_live_model`, :func:`merge_into_lora`);
- a merged adapter is written exactly (rank ``sum r_i``) or, for any merge, truncated to a
  chosen rank by SVD of each merged update, with the relative error reported per tensor
  and in total (:func:`write_adapter`).

Example:
    >>> model = lora_live_model(base_model, engine)          # doctest: +SKIP
    >>> merge_into_lora(engine, model, recipe)                # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from evomerge.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSource
from evomerge.errors import MergeError
from evomerge.io import atomic_folder, check_output_folder
from evomerge.merge.card import model_card
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Recipe
from evomerge.sources import layer_index

if TYPE_CHECKING:
    from evomerge.merge.engine import MergeEngine

ADAPTER = "default"


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def low_rank_adapters(engine: "MergeEngine", refs: list[str]) -> Optional[list[AdapterSource]]:
    """The adapters of ``refs`` when every model but a base is a plain LoRA adapter
    (linear layers only, no whole tensors replaced); None otherwise."""
    found = []
    for ref in refs:
        src = engine.source(ref)
        if isinstance(src, AdapterSource):
            if src.replaced or any(f.transposed for f in src.factors.values()):
                return None
            found.append(src)
        elif not any(isinstance(o, AdapterSource) and o.base.ref == ref for o in engine.sources.values()):
            return None  # a full fine-tune: its task vector is not low-rank
    return found or None


def lora_live_model(model: torch.nn.Module, adapters: list[AdapterSource]) -> torch.nn.Module:
    """Wrap a live base model in one LoRA layer per target module, of rank the sum of the
    adapters' ranks; each adapter's ``A`` goes in its block of rows once, every ``B`` is zero."""
    from peft import LoraConfig, get_peft_model

    layout, offset = {}, 0
    for a in adapters:
        layout[a.ref] = (offset, a.rank)
        offset += a.rank
    modules = sorted({_module(n) for a in adapters for n in a.factors})
    config = LoraConfig(r=offset, lora_alpha=offset, target_modules=modules, lora_dropout=0.0, init_lora_weights=False)
    live = get_peft_model(model, config)
    with torch.no_grad():
        for module in modules:
            layer = live.base_model.model.get_submodule(module)
            layer.lora_A[ADAPTER].weight.zero_()
            layer.lora_B[ADAPTER].weight.zero_()
            for a in adapters:
                f = a.factors.get(module + ".weight")
                if f is not None:
                    start, rank = layout[a.ref]
                    layer.lora_A[ADAPTER].weight[start : start + f.rank].copy_(f.a)
    live.evomerge_layout = layout  # which rows of every LoRA layer hold which adapter
    live.eval()
    return live


def is_lora_live(model: torch.nn.Module) -> bool:
    return hasattr(model, "evomerge_layout")


def coefficients(engine: "MergeEngine", recipe: Recipe) -> list[tuple[str, dict[str, float]]]:
    """Per tensor, each input's coefficient on its task vector; refuses merges that are
    not linear in the task vectors or that scale the base."""
    method = get_method(recipe.merge_method)
    out = []
    for plan in engine.plan(recipe):
        if not plan.inputs:
            continue
        linear = method.linear_coefficients(plan)
        if linear is None:
            raise MergeError(f"{method.name} is not linear in the task vectors: it cannot be merged as LoRA factors; use a plain live model or a full merge")
        base_coefficient, coefs = linear
        if abs(base_coefficient - 1.0) > 1e-6:
            raise MergeError(f"{method.name}: tensor {plan.name} scales the base by {base_coefficient:g}, which LoRA factors cannot express (normalize the weights)")
        out.append((plan.name, coefs))
    return out


def merge_into_lora(engine: "MergeEngine", model: torch.nn.Module, recipe: Recipe) -> dict[str, float]:
    """Set a LoRA live model's ``B`` blocks to each adapter's coefficient times its ``B``."""
    start = time.perf_counter()
    layout = model.evomerge_layout
    with torch.no_grad():
        for name, coefs in coefficients(engine, recipe):
            targeted = [(ref, c) for ref, c in coefs.items() if ref in layout and name in engine.source(ref).factors]
            if not targeted:
                continue
            layer = model.base_model.model.get_submodule(_module(name))
            weight = layer.lora_B[ADAPTER].weight
            for ref, c in targeted:
                f = engine.source(ref).factors[name]
                offset, _ = layout[ref]
                weight[:, offset : offset + f.rank].copy_(f.b.to(weight.device, torch.float32) * (c * f.scale))
    return {"merge_seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- adapters out


def write_adapter(engine: "MergeEngine", recipe: Recipe, out: Path, *, rank: Optional[int] = None, overwrite: bool = False) -> dict[str, Any]:
    """Write a merge as one PEFT LoRA adapter on the recipe's base.

    Without ``rank``: exact, when the merge is linear in LoRA adapters (their scaled
    factors side by side, rank the sum of theirs). With ``rank``: each merged update is
    truncated to that rank by SVD; ``errors`` gives each tensor's relative Frobenius
    error ``|delta - delta_r| / |delta|`` and ``error`` the total one.
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    start = time.perf_counter()
    refs = [r for r in recipe.model_refs if r != recipe.base_model]
    adapters = low_rank_adapters(engine, refs)
    base = _base_source(engine, recipe, adapters)
    if rank is None:
        if adapters is None:
            raise MergeError("an exact adapter needs a merge of LoRA adapters only (linear layers); give a rank to truncate the merged updates by SVD")
        factors, errors = _exact_factors(engine, recipe, adapters)
    else:
        if rank < 1:
            raise MergeError(f"rank must be at least 1, got {rank}")
        factors, errors = _svd_factors(engine, recipe, base, rank)
    if not factors:
        raise MergeError("the merge changes no tensor: there is nothing to write as an adapter")
    r = max(a.shape[0] for a, _ in factors.values())
    state: dict[str, torch.Tensor] = {}
    for name, (a, b) in factors.items():
        pad = r - a.shape[0]  # every module at one rank: zero rows and columns change nothing
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])]) if pad else a
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1) if pad else b
        state[f"base_model.model.{_module(name)}.lora_A.weight"] = a.contiguous()
        state[f"base_model.model.{_module(name)}.lora_B.weight"] = b.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.ref),
        "r": r,
        "lora_alpha": r,  # scaling 1: the coefficients are in B
        "lora_dropout": 0.0,
        "target_modules": sorted(_module(n) for n in factors),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    total = _total_error(errors)
    from safetensors.torch import save_file

    with atomic_folder(out, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        text = recipe.to_yaml()
        (tmp / "merge_recipe.yaml").write_text(text)
        how = "exact" if rank is None else f"rank {rank} by SVD, relative error {total:.3g}"
        (tmp / "README.md").write_text(model_card(text, base_model=recipe.base_model, models=recipe.model_refs, title=out.name).replace(
            "This model was merged", f"This LoRA adapter ({how}) on {base.ref} was merged", 1))
    return {
        "out": str(out),
        "merge_method": recipe.merge_method,
        "rank": r,
        "exact": rank is None,
        "n_modules": len(factors),
        "error": total,
        "errors": {n: e[0] / e[1] if e[1] > 0 else 0.0 for n, e in errors.items()},
        "seconds": time.perf_counter() - start,
    }


def _base_source(engine: "MergeEngine", recipe: Recipe, adapters: Optional[list[AdapterSource]]) -> Any:
    if recipe.base_model is not None:
        return engine.source(recipe.base_model)
    if adapters:
        return adapters[0].base
    raise MergeError("an adapter is written on a base: the recipe needs a base_model")


def _exact_factors(engine: "MergeEngine", recipe: Recipe, adapters: list[AdapterSource]) -> tuple[dict, dict]:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, coefs in coefficients(engine, recipe):
        parts = [(engine.source(ref).factors[name], c) for ref, c in coefs.items() if isinstance(engine.source(ref), AdapterSource) and name in engine.source(ref).factors]
        if parts:
            scaled = [f.scaled(c) for f, c in parts]
            factors[name] = (torch.cat([a for a, _ in scaled]), torch.cat([b for _, b in scaled], dim=1))
    return factors, {}


def _svd_factors(engine: "MergeEngine", recipe: Recipe, base: Any, rank: int) -> tuple[dict, dict]:
    """Each merged update (merged - base), one tensor at a time, truncated by SVD."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: dict[str, tuple[float, float]] = {}  # name -> (error norm, update norm)
    for plan in engine.plan(recipe):
        if not plan.inputs:
            continue
        update = engine.merged_tensor(recipe, plan) - engine.full(base.ref, plan.name).to(engine.device, torch.float32)
        norm = float(update.norm())
        if norm == 0.0:
            continue
        if update.dim() != 2 or layer_index(plan.name) is None:
            raise MergeError(f"tensor {plan.name} changes in this merge but a LoRA adapter cannot hold it (only the layers' 2-D weights); write a full model instead")
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        k = min(rank, s.numel())
        factors[plan.name] = (vh[:k].contiguous().cpu(), (u[:, :k] * s[:k]).contiguous().cpu())
        errors[plan.name] = (float(s[k:].square().sum().sqrt()), norm)
    return factors, errors


def _total_error(errors: dict[str, tuple[float, float]]) -> float:
    if not errors:
        return 0.0
    num = math.sqrt(sum(e * e for e, _ in errors.values()))
    den = math.sqrt(sum(n * n for _, n in errors.values()))
    return num / den if den > 0 else 0.0

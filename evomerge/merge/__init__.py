"""Merging: recipes, merge methods and the engine, plus the ``merge`` verb."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.merge.budget import MemoryBudget
from evomerge.merge.engine import MergeEngine
from evomerge.merge.recipe import Recipe

__all__ = ["MergeEngine", "Recipe", "merge"]


def merge(
    recipe: Any,
    out: str | Path,
    *,
    device: str = "cpu",
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    adapter: bool = False,
    rank: int | None = None,
    budget: MemoryBudget | None = None,
) -> dict[str, Any]:
    """Merge the models a recipe names into a Hugging Face folder at ``out`` (a
    ``models:`` merge, a ``slices:`` layer stack, or a chain of them), or, with
    ``adapter``, into one PEFT LoRA adapter (exact for a linear merge of adapters; with
    ``rank``, truncated by SVD, its error reported).

    Everything is checked (recipe, sources, output folder) before any tensor is
    merged; the folder appears complete or not at all.

    Example:
        >>> merge("recipe.yaml", "merged")   # doctest: +SKIP
        {'out': 'merged', 'merge_method': 'ties', 'n_tensors': 20, ...}
    """
    from evomerge.io import check_output_folder
    from evomerge.merge.chain import load_recipe
    from evomerge.merge.stack import build_stack

    base_dir = None
    if isinstance(recipe, (str, Path)):
        base_dir = Path(recipe).resolve().parent
        recipe = Path(recipe)
    recipe = load_recipe(recipe)
    check_output_folder(Path(out), overwrite)
    if not isinstance(recipe, Recipe):  # a layer stack (slices:), alone or ending a chain
        if adapter or rank is not None:
            from evomerge.errors import MergeError

            raise MergeError("--adapter: a layer stack changes the depth; it has no adapter form")
        return build_stack(recipe, Path(out), allow_pickle=allow_pickle, base_dir=base_dir, device=device, overwrite=overwrite)
    # No trust_remote_code is ever needed here: configs are read as JSON, weights as safetensors.
    engine = MergeEngine.from_recipe(recipe, allow_pickle=allow_pickle, base_dir=base_dir, device=device, budget=budget or MemoryBudget())
    if adapter or rank is not None:
        return engine.write_adapter(recipe, Path(out), rank=rank, overwrite=overwrite)
    return engine.write(recipe, Path(out), overwrite=overwrite, progress=progress)

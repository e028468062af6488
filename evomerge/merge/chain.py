"""Any recipe evomerge reads: a ``models:`` merge, a ``slices:`` layer stack, or a chain.

A chain is mergekit-multi's multi-document YAML: named stages first, then the final
unnamed recipe, which may name an earlier stage as a model. evomerge's data-flow
search writes a joint candidate as a chain of two: the parameter merge (``name:
merged``) and the layer stack that routes through it and the sources::

    name: merged
    merge_method: task_arithmetic
    base_model: zoo/base
    models: [{model: zoo/add, parameters: {weight: 0.6}}]
    ---
    merge_method: passthrough
    slices:
      - sources: [{model: merged, layer_range: [0, 4]}]
      - sources: [{model: zoo/sort, layer_range: [3, 4]}]

As a dict (what crosses from driver to worker and is stored with a trial) a chain is
``{"merge_chain": [stage, ..., final]}``.

Example:
    >>> r = load_recipe({"merge_method": "passthrough",
    ...                  "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]})
    >>> type(r).__name__, r.depth
    ('SliceRecipe', 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe, malformed_yaml, recipe_text
from evomerge.merge.slices import SliceRecipe

CHAIN_KEY = "merge_chain"


class RecipeChain(BaseModel):
    """Named stages, then the final recipe (mergekit-multi); a stage's name is a model ref
    for the stages after it."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    stages: list[Any]  # Recipe | SliceRecipe, each named
    final: Any  # Recipe | SliceRecipe

    @classmethod
    def from_list(cls, docs: list, *, where: str = "recipe") -> "RecipeChain":
        if len(docs) < 2:
            raise ConfigError(f"{where}: a chain needs named stages and a final recipe")
        parsed = [_one(d, where=f"{where}: document {i + 1}") for i, d in enumerate(docs)]
        *stages, final = parsed
        names: list[str] = []
        for i, s in enumerate(stages):
            if not s.name:
                raise ConfigError(f"{where}: document {i + 1}: every stage but the last needs a name")
            if s.name in names:
                raise ConfigError(f"{where}: document {i + 1}: two stages are named {s.name!r}")
            names.append(s.name)
        if final.name:
            raise ConfigError(f"{where}: the last document is the output; it takes no name")
        return cls(stages=stages, final=final)

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    @property
    def model_refs(self) -> list[str]:
        """The source models every stage reads (stage names left out), in order."""
        out: list[str] = []
        for r in [*self.stages, self.final]:
            for m in r.model_refs:
                if m not in out and m not in self.stage_names:
                    out.append(m)
        return out

    def to_dict(self) -> dict:
        return {CHAIN_KEY: [r.to_dict() for r in [*self.stages, self.final]]}

    def to_yaml(self) -> str:
        return "---\n".join(r.to_yaml() for r in [*self.stages, self.final])


AnyRecipe = Union[Recipe, SliceRecipe, RecipeChain]


def _one(data: Any, *, where: str) -> Union[Recipe, SliceRecipe]:
    if isinstance(data, dict) and "slices" in data:
        return SliceRecipe.from_dict(data, where=where)
    return Recipe.from_dict(data, where=where)


def load_recipe(source: Union[AnyRecipe, dict, str, Path], *, where: str = "recipe") -> AnyRecipe:
    """A parsed recipe from an object, a dict, YAML text or a file (several YAML
    documents: a chain). Errors are one line naming the file and field."""
    if isinstance(source, (Recipe, SliceRecipe, RecipeChain)):
        return source
    if isinstance(source, dict):
        if CHAIN_KEY in source:
            return RecipeChain.from_list(list(source[CHAIN_KEY]), where=where)
        return _one(source, where=where)
    text, where = recipe_text(source, where)
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise malformed_yaml(where, exc) from None
    if not docs:
        raise ConfigError(f"{where}: the recipe is empty")
    return _one(docs[0], where=where) if len(docs) == 1 else RecipeChain.from_list(docs, where=where)

"""Layer-stacking recipes: mergekit's ``slices:`` form of ``passthrough``.

A slices recipe lists runs of layers, each taken whole from one source model; the
output's layers are the runs' layers in order, renumbered from 0::

    merge_method: passthrough
    slices:
      - sources: [{model: zoo/add, layer_range: [0, 2]}]
      - sources:
          - model: zoo/sort
            layer_range: [1, 4]
            parameters:
              scale: [{filter: o_proj, value: 0.7}, {filter: down_proj, value: 0.7}]
    dtype: float32

As in mergekit 0.1.5, the embeddings come from the first slice's model and the final
norm and head from the last slice's; ``scale`` multiplies a tensor (scaling ``o_proj``
and ``down_proj`` scales what a layer adds to the residual stream). A parameter
resolves per source first, then from the global ``parameters``; gradients interpolate
over a slice's layers (``t = i / (n - 1)``, 1 for a one-layer slice).

Example:
    >>> r = SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [
    ...     {"sources": [{"model": "a", "layer_range": [0, 2]}]},
    ...     {"sources": [{"model": "b", "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]})
    >>> [(s.model, s.layer) for s in r.slots()], r.depth
    ([('a', 0), ('a', 1), ('b', 1)], 3)
    >>> r.slots()[2].scale("model.layers.1.mlp.down_proj.weight")
    0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Literal, Optional, Tuple

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.errors import ConfigError, validation_message
from evomerge.merge.recipe import Parameters, _leaf_values, _RecipeDumper, evaluate_setting, parse_dtype

#: The only parameter a layer-stacking slice takes (mergekit's passthrough ``scale``).
SLICE_PARAMETERS = ("scale",)


class SliceSource(BaseModel):
    """One slice's input: layers ``[a, b)`` of one model."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: Tuple[int, int]
    parameters: Optional[Parameters] = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: Tuple[int, int]) -> Tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range {list(v)}: expected [a, b] with 0 <= a < b")
        return v


class OutputSlice(BaseModel):
    """One run of output layers: exactly one source for passthrough."""

    model_config = ConfigDict(extra="forbid")
    sources: List[SliceSource]


@dataclass(frozen=True)
class Slot:
    """One output layer: which model's layer it is, its place in its slice and its settings."""

    index: int
    model: str
    layer: int
    t: float
    source: SliceSource
    global_parameters: Optional[Parameters]

    @property
    def scaled(self) -> bool:
        """Whether any scope of this layer sets ``scale`` at all (most paths: none)."""
        return any(scope and "scale" in scope for scope in (self.source.parameters, self.global_parameters))

    def scale(self, tensor_name: str) -> Optional[float]:
        """The ``scale`` of one of this layer's tensors (None: not scaled)."""
        for scope in (self.source.parameters, self.global_parameters):
            if scope and "scale" in scope:
                value = evaluate_setting(tensor_name, scope["scale"], self.t)
                if value is not None:
                    return float(value)
        return None


class SliceRecipe(BaseModel):
    """A validated ``slices:`` passthrough recipe (layer stacking, mergekit 0.1.5 syntax)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: Literal["passthrough"]
    slices: List[OutputSlice]
    parameters: Optional[Parameters] = None
    base_model: Optional[str] = None  # mergekit reads it for nothing here; kept when given
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe") -> "SliceRecipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with merge_method and slices")
        if data.get("merge_method") != "passthrough":
            raise ConfigError(f"{where}: merge_method: a slices recipe stacks layers with passthrough only, got {data.get('merge_method')!r}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_message(exc)}") from None
        recipe.validate_semantics(where)
        return recipe

    def validate_semantics(self, where: str = "recipe") -> None:
        if not self.slices:
            raise ConfigError(f"{where}: slices: the list is empty")
        for i, s in enumerate(self.slices):
            if len(s.sources) != 1:
                raise ConfigError(f"{where}: slices[{i}].sources: passthrough takes exactly one source per slice, got {len(s.sources)}")
        for label, params in [("parameters", self.parameters)] + [
            (f"slices[{i}].sources[0].parameters", s.sources[0].parameters) for i, s in enumerate(self.slices)
        ]:
            for key, setting in (params or {}).items():
                if key not in SLICE_PARAMETERS:
                    raise ConfigError(f"{where}: {label}.{key}: unknown parameter for passthrough slices (known: scale)")
                for value in _leaf_values(setting):
                    if isinstance(value, bool) or not isinstance(value, (int, float)):
                        raise ConfigError(f"{where}: {label}.scale: expected a number, got {value!r}")
        for field in ("dtype", "out_dtype"):
            if getattr(self, field) is not None:
                parse_dtype(getattr(self, field), where=f"{where}: {field}")

    # ------------------------------------------------------------------ reading
    @property
    def model_refs(self) -> list[str]:
        """Every model the stack reads, in order of first use."""
        refs: list[str] = []
        for s in self.slices:
            if s.sources[0].model not in refs:
                refs.append(s.sources[0].model)
        return refs

    def slots(self) -> list[Slot]:
        """The output layers in order."""
        out: list[Slot] = []
        for s in self.slices:
            src = s.sources[0]
            a, b = src.layer_range
            n = b - a
            for i in range(n):
                out.append(Slot(len(out), src.model, a + i, i / (n - 1) if n > 1 else 1.0, src, self.parameters))
        return out

    @property
    def depth(self) -> int:
        return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in self.slices)

    @property
    def first_model(self) -> str:
        """The model whose embeddings the output keeps."""
        return self.slices[0].sources[0].model

    @property
    def last_model(self) -> str:
        """The model whose final norm and head the output keeps."""
        return self.slices[-1].sources[0].model

    def outside_scale(self, tensor_name: str, *, last: bool) -> Optional[float]:
        """The ``scale`` of a tensor outside the layers, read as mergekit reads it: the
        first slice's settings for the embeddings, the last one's for the rest, at t = 0."""
        src = self.slices[-1 if last else 0].sources[0]
        return Slot(-1, src.model, -1, 0.0, src, self.parameters).scale(tensor_name)

    def check_depths(self, depth_of: dict[str, int], where: str = "recipe") -> None:
        """Every slice's layers exist in its model (``depth_of``: model -> layer count)."""
        for i, s in enumerate(self.slices):
            src = s.sources[0]
            n = depth_of.get(src.model)
            if n is None:
                raise ConfigError(f"{where}: slices[{i}]: model {src.model} is not among the sources")
            if src.layer_range[1] > n:
                raise ConfigError(f"{where}: slices[{i}].layer_range {list(src.layer_range)}: {src.model} has {n} layers")

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        data = self.model_dump(mode="json", exclude_none=True)
        for s in data["slices"]:  # mergekit writes ranges as lists
            for src in s["sources"]:
                src["layer_range"] = list(src["layer_range"])
        return data

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False).rstrip() + "\n"

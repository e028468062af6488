"""Data-flow search spaces: which layers, from which model, in which order, at what scale.

A candidate is a path through the sources' decoder layers, scored by routing (see
:mod:`evomerge.merge.routed`) and written as a mergekit ``slices:`` passthrough recipe.
The encoding is a **repeated stack**: ``passes`` copies of the ``L`` layer positions,
slot ``(p, j)`` being layer ``j`` on pass ``p``; the path is the kept slots in order.
Per slot the samplers see

- ``keep/P<p>/L<j>``: an integer in {0, 1} (skip or keep the slot); with ``skip: false``
  the first pass has none (every layer runs once, in order: the search picks sources,
  scales and, with more passes, repeats, never a shorter model);
- ``source/P<p>/<group>``: an integer choosing the slot's model among the routed
  sources (left out when there is one), shared by a group of slots (``granularity``:
  ``layer``, ``block:N`` or ``pass``, so a run of layers comes from one model);
- ``scale/P<p>/<group>`` (with ``scale: {low, high}``): a float multiplying what the
  slot's layer adds to the residual stream (its ``o_proj`` and ``down_proj`` outputs:
  exported exactly as mergekit's ``scale`` on those weights).

The space has a fixed size (``passes * L`` slots), only integers and floats, so CMA-ES
(through the unit cube, integers rounded), TPE, NSGA-II and random search all take it.
The structure gives the constraints for free: layers run in ascending order within a
pass, a layer runs at most ``passes`` times, and kept slots that follow each other in
one model become one contiguous slice. A path keeping fewer than ``min_layers`` slots
is completed with the first pass's slots in order (every candidate is a model).

With ``merge:`` (a parameter search space, preset or mapping) the search is joint: the
parameter merge of the sources is one more source, ``merged`` (source 0), its
coefficients searched beside the path (``merge/...`` dimensions); a candidate is then
a mergekit-multi chain: the named parameter merge, then the layer stack.

Example (YAML; ``search_spaces/dataflow_prune.yaml`` is this with ``granularity: pass``
and no scale)::

    kind: dataflow
    passes: 1
    granularity: layer
    scale: {low: 0.5, high: 1.5}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge._presets import resolve_preset
from evomerge.errors import ConfigError, validation_message
from evomerge.io import read_yaml
from evomerge.merge.chain import RecipeChain
from evomerge.merge.recipe import Recipe
from evomerge.merge.slices import SliceRecipe
from evomerge.space import SearchSpace, _labels

MERGED = "merged"  # the joint search's parameter merge, as a source of the path
_GRANULARITY = re.compile(r"^(layer|pass|block:(\d+))$")


class ScaleRange(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float = Field(gt=0)
    high: float = Field(gt=0)


class DataFlowConfig(BaseModel):
    """The YAML of a data-flow search space."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dataflow"]
    description: Optional[str] = None
    passes: int = Field(default=1, ge=1, le=8)
    granularity: str = "layer"
    sources: Optional[List[str]] = None  # refs or folder names; default: every source
    scale: Optional[ScaleRange] = None
    min_layers: int = Field(default=1, ge=1)
    skip: bool = True  # false: no keep/P0/... dimensions, the first pass is always whole
    merge: Optional[Union[str, Dict[str, Any]]] = None

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        m = _GRANULARITY.match(v)
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(f"granularity must be layer, pass or block:N, got {v!r}")
        return v


class DataFlowSpace:
    """A validated data-flow space bound to the run's sources and their layer count."""

    kind = "dataflow"

    def __init__(self, config: DataFlowConfig, *, base_model: Optional[str], models: Sequence[str], num_layers: int, where: str = "search space"):
        self.config, self.where, self.num_layers = config, where, num_layers
        self.base_model, self.models = base_model, list(models)
        all_refs = ([base_model] if base_model else []) + [m for m in self.models if m != base_model]
        labels = _labels(all_refs)
        if config.sources is None:
            routed = all_refs
        else:
            by_name = {**{r: r for r in all_refs}, **{labels[r]: r for r in all_refs}}
            unknown = [s for s in config.sources if s not in by_name]
            if unknown:
                raise ConfigError(f"{where}: sources: {unknown[0]!r} is not a source of the run (known: {', '.join(labels.values())})")
            routed = [by_name[s] for s in config.sources]
        self.merge_space: Optional[SearchSpace] = None
        if config.merge is not None:
            kwargs = dict(base_model=base_model, models=self.models, num_layers=num_layers)
            self.merge_space = (SearchSpace.from_yaml(config.merge, **kwargs) if isinstance(config.merge, str)
                                else SearchSpace.from_dict(config.merge, where=f"{where}: merge", **kwargs))
        self.routed: list[str] = ([MERGED] if self.merge_space else []) + routed
        if config.scale is not None and not config.scale.low < config.scale.high:
            raise ConfigError(f"{where}: scale: low ({config.scale.low:g}) must be below high ({config.scale.high:g})")
        if config.min_layers > num_layers * config.passes:
            raise ConfigError(f"{where}: min_layers {config.min_layers} is more than the {num_layers * config.passes} slots")
        self.labels: dict[str, str] = {}  # no per-layer coefficient rows to plot
        self.dimensions: list[Any] = []

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Any, *, where: str = "search space", **kwargs: Any) -> "DataFlowSpace":
        try:
            config = DataFlowConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_message(exc)}") from None
        return cls(config, where=where, **kwargs)

    # ------------------------------------------------------------------ dimensions
    def _group(self, j: int) -> str:
        g = self.config.granularity
        if g == "layer":
            return f"L{j:02d}"
        if g == "pass":
            return "all"
        return f"B{j // int(g.split(':')[1])}"

    def _groups(self) -> list[str]:
        return list(dict.fromkeys(self._group(j) for j in range(self.num_layers)))

    def _skippable(self, p: int) -> bool:
        """Whether pass ``p``'s slots have keep dimensions (not pass 0 with ``skip: false``)."""
        return self.config.skip or p > 0

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions in a fixed order (the genome's order)."""
        from optuna.distributions import FloatDistribution, IntDistribution

        out: dict[str, Any] = {}
        for p in range(self.config.passes):
            for j in range(self.num_layers):
                if self._skippable(p):
                    out[f"keep/P{p}/L{j:02d}"] = IntDistribution(0, 1)
            for g in self._groups():
                if len(self.routed) > 1:
                    out[f"source/P{p}/{g}"] = IntDistribution(0, len(self.routed) - 1)
                if self.config.scale is not None:
                    out[f"scale/P{p}/{g}"] = FloatDistribution(self.config.scale.low, self.config.scale.high)
        if self.merge_space is not None:
            out.update({f"merge/{k}": v for k, v in self.merge_space.distributions().items()})
        return out

    @property
    def dim(self) -> int:
        return len(self.distributions())

    def uniform_params(self) -> dict[str, Any]:
        """The full-depth model of source 0 (the parameter merge at its uniform point in a
        joint search, else the base or first source), every branch at scale 1 (clipped)."""
        out: dict[str, Any] = {}
        for name in self.distributions():
            kind, rest = name.split("/", 1)
            if kind == "keep":
                out[name] = 1 if rest.startswith("P0/") else 0
            elif kind == "source":
                out[name] = 0
            elif kind == "scale":
                out[name] = min(max(1.0, self.config.scale.low), self.config.scale.high)
        if self.merge_space is not None:
            out.update({f"merge/{k}": v for k, v in self.merge_space.uniform_params().items()})
        return out

    center = uniform_params  # the reference point scripts start from

    # ------------------------------------------------------------------ paths
    def path(self, params: dict[str, Any]) -> list[tuple[str, int, Optional[float]]]:
        """The kept slots in order: (routed source, layer, scale)."""
        missing = [n for n in self.distributions() if n not in params]
        if missing:
            raise ConfigError(f"{self.where}: point lacks parameter {missing[0]}")
        slots = []
        for p in range(self.config.passes):
            for j in range(self.num_layers):
                g = self._group(j)
                src = self.routed[int(params[f"source/P{p}/{g}"])] if len(self.routed) > 1 else self.routed[0]
                scale = float(params[f"scale/P{p}/{g}"]) if self.config.scale is not None else None
                kept = int(params[f"keep/P{p}/L{j:02d}"]) == 1 if self._skippable(p) else True
                slots.append((kept, (src, j, scale)))
        kept = [s for k, s in slots if k]
        if len(kept) < self.config.min_layers:  # completed with the first pass's slots, in order
            extra = [s for k, s in slots[: self.num_layers] if not k][: self.config.min_layers - len(kept)]
            order = {id(s): i for i, (_, s) in enumerate(slots)}
            kept = sorted(kept + extra, key=lambda s: order[id(s)])
        return kept

    def to_recipe(self, params: dict[str, Any], *, random_seed: Optional[int] = None, dtype: str = "float32") -> Union[SliceRecipe, RecipeChain]:
        """The layer stack of one point (a chain behind its parameter merge when joint)."""
        slices: list[dict[str, Any]] = []
        prev: Optional[tuple[str, int, Optional[float]]] = None
        for src, j, scale in self.path(params):
            if prev is not None and prev[0] == src and prev[2] == scale and prev[1] == j - 1:
                slices[-1]["sources"][0]["layer_range"][1] = j + 1
            else:
                entry: dict[str, Any] = {"model": src, "layer_range": [j, j + 1]}
                if scale is not None and scale != 1.0:
                    entry["parameters"] = {"scale": [{"filter": f, "value": scale} for f in ("o_proj", "down_proj")]}
                slices.append({"sources": [entry]})
            prev = (src, j, scale)
        stack = SliceRecipe.from_dict({"merge_method": "passthrough", "slices": slices, "dtype": dtype}, where=self.where)
        if self.merge_space is None:
            return stack
        inner = {k.removeprefix("merge/"): v for k, v in params.items() if k.startswith("merge/")}
        merged = self.merge_space.to_recipe(inner, random_seed=random_seed, dtype=dtype).model_copy(update={"name": MERGED})
        return RecipeChain(stages=[merged], final=stack)

    def params_from_recipe(self, recipe: Any) -> dict[str, Any]:
        """The point of this space a recipe is (for seeding): a layer stack whose layers
        ascend within each pass, behind a parameter merge when the space is joint."""
        inner: dict[str, Any] = {}
        if isinstance(recipe, RecipeChain):
            if self.merge_space is None:
                raise ConfigError(f"{self.where}: a seed chain needs a joint space (merge:)")
            inner = {f"merge/{k}": v for k, v in self.merge_space.params_from_recipe(recipe.stages[0]).items()}
            recipe = recipe.final
        elif isinstance(recipe, Recipe):
            if self.merge_space is None:
                raise ConfigError(f"{self.where}: a seed parameter merge needs a joint space (merge:)")
            inner = {f"merge/{k}": v for k, v in self.merge_space.params_from_recipe(recipe).items()}
            recipe = SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": MERGED, "layer_range": [0, self.num_layers]}]}]})
        out = {k: v for k, v in self.uniform_params().items() if k.startswith(("source/", "scale/"))}
        out.update({k: 0 for k in self.distributions() if k.startswith("keep/")})
        p, last = 0, -1
        taken: dict[tuple[int, str], tuple[str, Optional[float]]] = {}  # (pass, group) -> (source, scale)
        whole: list[int] = []  # the first pass's layers when it has no keep dimensions
        for slot in recipe.slots():
            g = self._group(slot.layer)
            s = slot.scale("x.o_proj.weight")
            scale = min(max(1.0 if s is None else s, self.config.scale.low), self.config.scale.high) if self.config.scale else None
            if slot.layer <= last or taken.get((p, g), (slot.model, scale)) != (slot.model, scale):
                p += 1  # a group's slots share one source and scale: a different one starts a new pass
            if p >= self.config.passes or slot.model not in self.routed:
                raise ConfigError(f"{self.where}: a seed recipe's path does not fit {self.config.passes} pass(es) over {', '.join(self.routed)}")
            taken[(p, g)] = (slot.model, scale)
            if self._skippable(p):
                out[f"keep/P{p}/L{slot.layer:02d}"] = 1
            else:
                whole.append(slot.layer)
            if len(self.routed) > 1:
                out[f"source/P{p}/{g}"] = self.routed.index(slot.model)
            if scale is not None:
                out[f"scale/P{p}/{g}"] = scale
            last = slot.layer
        if not self.config.skip and whole != list(range(self.num_layers)):
            raise ConfigError(f"{self.where}: a seed recipe's first pass must run all {self.num_layers} layers (skip: false)")
        return {**out, **inner}


def build_space(spec: Union[str, Path, Dict[str, Any]], *, base_model: Optional[str], models: Sequence[str], num_layers: int, where: str = "search_space") -> Any:
    """The search space a run config names: a preset or file name, or a mapping; a
    ``kind: dataflow`` one is a :class:`DataFlowSpace`, any other a parameter
    :class:`~evomerge.space.SearchSpace`."""
    kwargs = dict(base_model=base_model, models=models, num_layers=num_layers)
    if isinstance(spec, (str, Path)):
        path = resolve_preset(spec, "search_spaces")
        data, where = read_yaml(path, what="search space file"), str(path)
    else:
        data = spec
    if isinstance(data, dict) and data.get("kind") == DataFlowSpace.kind:
        return DataFlowSpace.from_dict(data, where=where, **kwargs)
    return SearchSpace.from_dict(data, where=where, **kwargs)

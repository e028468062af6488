"""Search spaces: which merge coefficients are searched, where, and within which bounds.

A search space names a merge method and, for each of its parameters, either a fixed
value or a searched range with a granularity:

- ``global``: one value for the whole model;
- ``layer``: one value per decoder layer;
- ``block:N``: one value per block of N consecutive layers;

optionally split by tensor-name filters (``split: [self_attn, mlp]`` gives each its
own values, and the rest a catch-all group). With per-layer or per-block values the
embeddings and the head (``lm_head`` and the final norm) get values of their own
(``outside_layers: separate``, the default) rather than mergekit's default of the
first layer's value. Per-model parameters (``weight``, ``density``, ...) get values per
source model; shared ones (``t``, ``lambda``) once.

:meth:`SearchSpace.to_recipe` turns a point (Optuna params) into a mergekit recipe in
which a per-layer value is a gradient list of one entry per layer, so every trial is
rebuilt exactly by ``evomerge merge``.

Example (YAML, as in ``search_spaces/ties_layerwise.yaml``)::

    merge_method: ties
    granularity: layer
    parameters:
      weight: {low: 0.0, high: 1.0}
      density: {low: 0.1, high: 1.0, granularity: global}
      normalize: true

    >>> space = SearchSpace.from_yaml("ties_layerwise", base_model="base",
    ...     models=["a", "b"], num_layers=4)                          # doctest: +SKIP
    >>> recipe = space.to_recipe(space.center())                      # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge._presets import resolve_preset
from evomerge.errors import ConfigError, validation_message
from evomerge.io import read_yaml
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Recipe

_GRANULARITY = re.compile(r"^(global|layer|block:(\d+))$")
EMBED_FILTER = "embed_tokens"
HEAD_FILTERS = ("lm_head", "model.norm.")


class SearchedParameter(BaseModel):
    """A searched range for one merge parameter."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    granularity: Optional[str] = None
    split: List[str] = Field(default_factory=list)
    outside_layers: Optional[Literal["separate", "first_layer"]] = None

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _GRANULARITY.match(v):
            raise ValueError(f"granularity must be global, layer or block:N, got {v!r}")
        return v


Fixed = Union[bool, int, float, str]


class SearchSpaceConfig(BaseModel):
    """The YAML of a search space (a preset in ``search_spaces/`` or a file)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    description: Optional[str] = None
    granularity: str = "global"
    outside_layers: Literal["separate", "first_layer"] = "separate"
    parameters: Dict[str, Union[SearchedParameter, Fixed]]

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, v: str) -> str:
        if not _GRANULARITY.match(v):
            raise ValueError(f"granularity must be global, layer or block:N, got {v!r}")
        return v


@dataclass(frozen=True)
class Group:
    """One searched value's place: which tensors (filters) and which layers it covers."""

    key: str  # part of the Optuna param name, e.g. "L03", "B1", "all", "embed", "head"
    layers: tuple[int, ...]  # layers covered (empty: outside the layers)


@dataclass(frozen=True)
class Dimension:
    """One Optuna parameter."""

    name: str  # e.g. "weight/add/self_attn/L03"
    param: str
    model: Optional[str]  # model ref for per-model parameters
    split: Optional[str]  # the filter, None for the catch-all
    group: Group
    low: float
    high: float
    log: bool


class SearchSpace:
    """A validated search space bound to concrete models and a layer count."""

    def __init__(
        self,
        config: SearchSpaceConfig,
        *,
        base_model: Optional[str],
        models: Sequence[str],
        num_layers: int,
        where: str = "search space",
    ):
        self.config = config
        self.where = where
        self.method = get_method(config.merge_method, where=f"{where}: merge_method")
        self.base_model = base_model
        self.models = list(models)
        self.num_layers = num_layers
        self.labels = _labels(self.models + ([base_model] if base_model and base_model not in self.models else []))
        self._validate()
        self.dimensions = self._build_dimensions()
        if not self.dimensions:
            raise ConfigError(f"{where}: parameters: nothing is searched (every parameter is fixed)")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, name_or_path: str | Path, **kwargs: Any) -> "SearchSpace":
        path = resolve_preset(name_or_path, "search_spaces")
        return cls.from_dict(read_yaml(path, what="search space file"), where=str(path), **kwargs)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "search space", **kwargs: Any) -> "SearchSpace":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with merge_method and parameters")
        try:
            config = SearchSpaceConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_message(exc)}") from None
        return cls(config, where=where, **kwargs)

    def _validate(self) -> None:
        where = self.where
        known = {p.name for p in self.method.params}
        inputs = self._inputs()
        if self.method.base == "required" and self.base_model is None:
            raise ConfigError(f"{where}: {self.method.name} needs a base_model among the sources")
        if not inputs:
            raise ConfigError(f"{where}: {self.method.name} has no models to merge")
        for name, value in self.config.parameters.items():
            if name not in known:
                raise ConfigError(
                    f"{where}: parameters.{name}: unknown parameter for {self.method.name} (known: {', '.join(sorted(known))})"
                )
            spec = self.method.param(name)
            label = f"{where}: parameters.{name}"
            if isinstance(value, SearchedParameter):
                if not value.low < value.high:
                    raise ConfigError(f"{label}: low ({value.low:g}) must be below high ({value.high:g})")
                if value.log and value.low <= 0:
                    raise ConfigError(f"{label}: a log-scale range needs low > 0, got {value.low:g}")
                for bound in (value.low, value.high):
                    if spec.type is not float:
                        raise ConfigError(f"{label}: '{name}' is a {spec.type.__name__} and cannot be searched; fix it instead")
                    spec.validate(bound, where=f"{label}: bound")
            else:
                spec.validate(value, where=label)
        for spec in self.method.params:
            if spec.required and spec.name not in self.config.parameters:
                raise ConfigError(f"{where}: parameters.{spec.name}: {self.method.name} needs '{spec.name}' (searched or fixed)")

    def _inputs(self) -> list[str]:
        """Models that take per-model parameters, in recipe order."""
        return self.method.search_inputs(self.models, self.base_model)

    def _granularity(self, p: SearchedParameter) -> str:
        return p.granularity or self.config.granularity

    def _groups(self, p: SearchedParameter) -> list[Group]:
        gran = self._granularity(p)
        if gran == "global":
            return [Group("all", tuple(range(self.num_layers)))]
        size = 1 if gran == "layer" else int(gran.split(":")[1])
        groups = []
        for start in range(0, self.num_layers, size):
            layers = tuple(range(start, min(start + size, self.num_layers)))
            key = f"L{start:02d}" if size == 1 else f"B{start // size}"
            groups.append(Group(key, layers))
        if (p.outside_layers or self.config.outside_layers) == "separate":
            groups += [Group("embed", ()), Group("head", ())]
        return groups

    def _build_dimensions(self) -> list[Dimension]:
        dims = []
        for name, value in self.config.parameters.items():
            if not isinstance(value, SearchedParameter):
                continue
            spec = self.method.param(name)
            owners: list[Optional[str]] = [None] if spec.shared else self._inputs()
            for model in owners:
                for split in list(value.split) + [None]:
                    for group in self._groups(value):
                        if split is not None and not group.layers:
                            continue  # filters apply inside the layers only
                        parts = [name] + ([self.labels[model]] if model else []) + ([split] if split else []) + [group.key]
                        dims.append(Dimension("/".join(parts), name, model, split, group, value.low, value.high, value.log))
        return dims

    # ------------------------------------------------------------------ points
    def distributions(self) -> dict[str, Any]:
        """Optuna distributions, in a fixed order (the genome's order)."""
        import optuna

        return {d.name: optuna.distributions.FloatDistribution(d.low, d.high, log=d.log) for d in self.dimensions}

    @property
    def dim(self) -> int:
        return len(self.dimensions)

    def center(self) -> dict[str, float]:
        """The middle of every range (geometric middle on log scale)."""
        return {d.name: math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2 for d in self.dimensions}

    def uniform_params(self) -> dict[str, float]:
        """Equal weights (1/K), full density, midpoint t, lambda 1: the "uniform" baseline.

        For task arithmetic and linear this is exactly the uniform average of the
        models; for other methods the closest point in the space. Values are
        clipped to the bounds.
        """
        k = len(self._inputs())
        defaults = {"weight": 1.0 / k, "density": 1.0, "t": 0.5, "lambda": 1.0, "scale": 1.0}
        out = {}
        for d in self.dimensions:
            spec = self.method.param(d.param)
            v = defaults.get(d.param, spec.default if isinstance(spec.default, (int, float)) else (d.low + d.high) / 2)
            out[d.name] = min(max(float(v), d.low), d.high)
        return out

    def params_from_recipe(self, recipe: Recipe) -> dict[str, float]:
        """The point of this space closest to a recipe (for seeding a search with it)."""
        if recipe.merge_method != self.method.name:
            raise ConfigError(f"{self.where}: a seed recipe uses {recipe.merge_method}, the space searches {self.method.name}")
        out = {}
        for d in self.dimensions:
            tensor, t = self._probe(d)
            v = recipe.resolve(d.param, tensor, t, d.model)
            if v is None:
                v = self.method.param(d.param).default
            if v is None:
                raise ConfigError(f"{self.where}: seed recipe does not set '{d.param}' for {d.model or 'the merge'}")
            out[d.name] = min(max(float(v), d.low), d.high)
        return out

    def _probe(self, d: Dimension) -> tuple[str, float]:
        """A tensor name and layer position this dimension governs."""
        if d.group.key == "embed":
            return "model.embed_tokens.weight", 0.0
        if d.group.key == "head":
            return "lm_head.weight", 0.0
        layer = d.group.layers[0]
        t = layer / (self.num_layers - 1) if self.num_layers > 1 else 1.0
        kind = d.split or "__evomerge_rest__"
        return f"model.layers.{layer}.{kind}.weight", t

    # ------------------------------------------------------------------ recipes
    def to_recipe(self, params: dict[str, float], *, random_seed: Optional[int] = None, dtype: str = "float32") -> Recipe:
        """The mergekit recipe of one point of the space."""
        missing = [d.name for d in self.dimensions if d.name not in params]
        if missing:
            raise ConfigError(f"{self.where}: point lacks parameter {missing[0]}")
        shared: dict[str, Any] = {}
        per_model: dict[str, dict[str, Any]] = {m: {} for m in self._inputs()}
        for name, value in self.config.parameters.items():
            spec = self.method.param(name)
            if isinstance(value, SearchedParameter):
                owners = [None] if spec.shared else self._inputs()
                for model in owners:
                    setting = self._setting(name, model, value, params)
                    (shared if model is None else per_model[model])[name] = setting
            else:
                if spec.shared:
                    shared[name] = value
                else:
                    for model in self._inputs():
                        per_model[model][name] = value
        entries = []
        for m in self.models:
            entry: dict[str, Any] = {"model": m}
            if per_model.get(m):
                entry["parameters"] = per_model[m]
            entries.append(entry)
        if self.base_model and self.base_model not in self.models and self.base_model in per_model:
            entries.append({"model": self.base_model, "parameters": per_model[self.base_model]})
        data: dict[str, Any] = {"merge_method": self.method.name, "models": entries, "dtype": dtype}
        if self.base_model is not None:
            data["base_model"] = self.base_model
        if shared:
            data["parameters"] = shared
        if random_seed is not None and self.method.random:
            data["random_seed"] = random_seed
        return Recipe.from_dict(data, where=self.where)

    def _setting(self, name: str, model: Optional[str], p: SearchedParameter, params: dict[str, float]) -> Any:
        dims = [d for d in self.dimensions if d.param == name and d.model == model]
        if self._granularity(p) == "global" and not p.split:
            return float(params[dims[0].name])
        entries: list[dict[str, Any]] = []
        by_key = {(d.split, d.group.key): params[d.name] for d in dims}
        if (p.outside_layers or self.config.outside_layers) == "separate" and self._granularity(p) != "global":
            entries.append({"filter": EMBED_FILTER, "value": float(by_key[(None, "embed")])})
            for f in HEAD_FILTERS:
                entries.append({"filter": f, "value": float(by_key[(None, "head")])})
        for split in list(p.split) + [None]:
            values = self._per_layer(split, dims, params)
            entry: dict[str, Any] = {"value": values}
            if split is not None:
                entry = {"filter": split, "value": values}
            entries.append(entry)
        return entries

    def _per_layer(self, split: Optional[str], dims: list[Dimension], params: dict[str, float]) -> Any:
        values = [0.0] * self.num_layers
        covering = [d for d in dims if d.split == split and d.group.layers]
        for d in covering:
            for layer in d.group.layers:
                values[layer] = float(params[d.name])
        if len(covering) == 1:
            return values[0]  # global granularity inside a split
        return values


def _labels(models: Sequence[str]) -> dict[str, str]:
    """Short, unique, readable labels for model refs (the folder names)."""
    labels: dict[str, str] = {}
    used: set[str] = set()
    for i, m in enumerate(models):
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(m.rstrip("/")).name) or f"m{i}"
        label = base if base not in used else f"{base}_{i}"
        used.add(label)
        labels[m] = label
    return labels

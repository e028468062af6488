"""mergekit-compatible merge recipes: parse, validate, write, resolve parameters.

A recipe is the YAML mergekit reads::

    merge_method: ties
    base_model: ./zoo/base
    models:
      - model: ./zoo/add
        parameters: {weight: [0.2, 0.8], density: 0.5}
      - model: ./zoo/reverse
        parameters:
          weight:
            - {filter: self_attn, value: 0.3}
            - {value: 0.6}
          density: 0.5
    parameters: {normalize: true}
    dtype: float32

A parameter is a scalar, a list interpolated across layers (a *gradient*), or a list
of ``{filter, value}`` entries where the first entry whose filter is a substring of the
tensor name wins (no filter, or ``*``, matches everything). Per-model settings take
precedence over the global ``parameters``, which take precedence over the method's
defaults, exactly as in mergekit.

Example:
    >>> r = Recipe.from_yaml('''
    ... merge_method: task_arithmetic
    ... base_model: base
    ... models:
    ...   - {model: a, parameters: {weight: [0.0, 1.0]}}
    ... ''')
    >>> r.resolve("weight", "model.layers.1.mlp.up_proj.weight", t=0.5, model="a")
    0.5
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from evomerge.errors import ConfigError, validation_message

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, List[Scalar]]


class ConditionalParameter(BaseModel):
    """A ``{filter: substring, value: ...}`` entry; no filter (or ``*``) matches all."""

    model_config = ConfigDict(extra="forbid")
    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ConditionalParameter, List[ConditionalParameter], ScalarOrGradient]
Parameters = Dict[str, ParameterSetting]


def _model_path(v: Any) -> Any:
    """mergekit also accepts ``{model: {path: ...}}``; keep the path."""
    if isinstance(v, dict) and "path" in v and len(v) == 1:
        return v["path"]
    return v


class InputModel(BaseModel):
    """One entry of ``models:``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Optional[Parameters] = None

    _model_as_text = field_validator("model", mode="before")(_model_path)


class Recipe(BaseModel):
    """A validated mergekit recipe (the ``models:`` form)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: Optional[str] = None
    models: List[InputModel]
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    name: Optional[str] = None
    # evomerge's own: seeds the masks of random methods (DARE, DELLA); mergekit ignores it.
    random_seed: Optional[int] = None

    _base_as_text = field_validator("base_model", mode="before")(_model_path)

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_yaml(cls, text_or_path: str | Path, *, validate: bool = True) -> "Recipe":
        """Parse a recipe from YAML text or a file; errors name the file and field."""
        text, where = recipe_text(text_or_path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise malformed_yaml(where, exc) from None
        return cls.from_dict(data, where=where, validate=validate)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "recipe", validate: bool = True) -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping with merge_method and models, got {type(data).__name__}")
        for unsupported in ("slices", "modules"):
            if unsupported in data:
                raise ConfigError(
                    f"{where}: '{unsupported}:' recipes are not supported; use the 'models:' form"
                )
        if "tokenizer" in data:
            raise ConfigError(f"{where}: 'tokenizer:' (vocabulary merging) is not supported; use tokenizer_source")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {validation_message(exc)}") from None
        if validate:
            recipe.validate_semantics(where)
        return recipe

    def validate_semantics(self, where: str = "recipe") -> None:
        """Check the method, the model list and every parameter value against the method spec."""
        from evomerge.merge.methods import get_method

        method = get_method(self.merge_method, where=f"{where}: merge_method")
        if not self.models:
            raise ConfigError(f"{where}: models: the model list is empty")
        if self.dtype is not None:
            parse_dtype(self.dtype, where=f"{where}: dtype")
        if self.out_dtype is not None:
            parse_dtype(self.out_dtype, where=f"{where}: out_dtype")
        if self.tokenizer_source == "union":
            raise ConfigError(f"{where}: tokenizer_source: 'union' (vocabulary merging) is not supported")
        method.check_inputs(self, where)
        known = {p.name for p in method.params}
        scopes: list[tuple[str, Parameters | None, bool]] = [("parameters", self.parameters, True)]
        for i, m in enumerate(self.models):
            scopes.append((f"models[{i}].parameters", m.parameters, False))
        for label, params, is_global in scopes:
            for key, setting in (params or {}).items():
                if key not in known:
                    raise ConfigError(
                        f"{where}: {label}.{key}: unknown parameter for {self.merge_method} "
                        f"(known: {', '.join(sorted(known)) or 'none'})"
                    )
                spec = method.param(key)
                if not is_global and spec.shared:
                    # mergekit reads shared parameters from the global scope only.
                    raise ConfigError(f"{where}: {label}.{key}: '{key}' is a global parameter; set it under parameters:")
                for value in _leaf_values(setting):
                    spec.validate(value, where=f"{where}: {label}.{key}")

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """YAML mergekit reads; numeric lists in flow style like mergekit writes them."""
        return yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False).rstrip() + "\n"

    # ------------------------------------------------------------------ reading
    @property
    def model_refs(self) -> list[str]:
        """Every model the merge reads, in recipe order; the base is added if absent."""
        refs = [m.model for m in self.models]
        if self.base_model is not None and self.base_model not in refs:
            refs.append(self.base_model)
        return refs

    def model_parameters(self, model: str) -> Parameters | None:
        for m in self.models:
            if m.model == model:
                return m.parameters
        return None

    def resolve(self, name: str, tensor_name: str, t: float, model: str | None = None) -> Any:
        """Value of parameter ``name`` for one tensor at layer position ``t`` in [0, 1].

        ``model`` None reads a shared parameter (global scope only); otherwise the
        model's own setting wins over the global one. Returns None when unset
        (the caller applies the method's default).
        """
        scopes = []
        if model is not None:
            scopes.append(self.model_parameters(model))
        scopes.append(self.parameters)
        for scope in scopes:
            if scope is not None and name in scope:
                value = evaluate_setting(tensor_name, scope[name], t)
                if value is not None:
                    return value
        return None


def recipe_text(source: str | Path, where: str = "recipe") -> tuple[str, str]:
    """(YAML text, where to say errors are) of a recipe given as a file or as text: a
    Path, or a one-line string ending in .yaml / .yml, is a file."""
    text = str(source)
    if isinstance(source, Path) or ("\n" not in text and text.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        return path.read_text(), str(path)
    return text, where


def malformed_yaml(where: str, exc: yaml.YAMLError) -> ConfigError:
    """One line for YAML that does not parse: where, line and column, the problem."""
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return ConfigError(f"{where}: malformed YAML{at}: {getattr(exc, 'problem', None) or 'not valid YAML'}")


def evaluate_setting(tensor_name: str, setting: ParameterSetting, t: float) -> Any:
    """Resolve filters and gradients the way mergekit does.

    Numeric lists interpolate linearly at ``t * (len - 1)``; non-numeric lists pick
    ``values[int(t * (len - 1))]``; a list of conditions returns the first whose filter
    matches (None when none does, so a lower-precedence scope can answer).
    """
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * float(setting[i0]) + frac * float(setting[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t)
        return None
    raise ConfigError(f"unexpected parameter setting: {setting!r}")


def _leaf_values(setting: ParameterSetting) -> list[Scalar]:
    """Every scalar a setting can produce (endpoints of gradients, values of filters)."""
    if isinstance(setting, ConditionalParameter):
        return _leaf_values(setting.value)
    if isinstance(setting, list):
        out: list[Scalar] = []
        for e in setting:
            out.extend(_leaf_values(e) if isinstance(e, (list, ConditionalParameter)) else [e])
        return out
    return [setting]


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}


def parse_dtype(name: str, where: str = "dtype"):
    """torch dtype for a recipe's ``dtype`` string."""
    import torch

    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(f"{where}: unknown dtype {name!r} (expected one of float32, float16, bfloat16, float64)")
    return getattr(torch, _DTYPES[key])


class _RecipeDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.SequenceNode:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_float(dumper: yaml.SafeDumper, data: float) -> yaml.ScalarNode:
    # repr keeps every bit of a float so a written recipe merges exactly the same.
    if math.isfinite(data):
        return dumper.represent_scalar("tag:yaml.org,2002:float", repr(float(data)))
    return yaml.SafeDumper.represent_float(dumper, data)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(float, _represent_float)

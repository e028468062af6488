"""Recipes: mergekit's YAML meaning, round trips, and one-line errors naming the field."""

from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.merge.recipe import Recipe, evaluate_setting

RECIPE = """
merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0.0, 0.5, 1.0]
      density: 0.4
  - model: b
    parameters:
      weight:
        - {filter: self_attn, value: [1.0, 0.0]}
        - {filter: mlp, value: 0.25}
      density: [0.2, 0.8]
parameters:
  weight: 0.9
  lambda: 1.5
dtype: float32
"""


def test_gradient_interpolates_linearly_across_layers():
    r = Recipe.from_yaml(RECIPE)
    assert r.resolve("weight", "model.layers.0.x", 0.0, "a") == 0.0
    assert r.resolve("weight", "model.layers.3.x", 0.25, "a") == pytest.approx(0.25)
    assert r.resolve("weight", "model.layers.9.x", 0.75, "a") == pytest.approx(0.75)
    assert r.resolve("density", "x", 0.5, "b") == pytest.approx(0.5)


def test_first_matching_filter_wins_and_unmatched_falls_back_to_global():
    r = Recipe.from_yaml(RECIPE)
    assert r.resolve("weight", "model.layers.1.self_attn.q_proj.weight", 1.0, "b") == 0.0
    assert r.resolve("weight", "model.layers.1.mlp.up_proj.weight", 0.3, "b") == 0.25
    # no filter matches a norm tensor in b's list -> the global value
    assert r.resolve("weight", "model.layers.1.input_layernorm.weight", 0.3, "b") == 0.9
    # shared parameters come from the global scope only
    assert r.resolve("lambda", "anything", 0.0) == 1.5
    assert r.resolve("normalize", "anything", 0.0) is None  # unset: the method default applies


def test_non_numeric_lists_pick_by_position():
    assert evaluate_setting("t", [True, False, False], 0.4) is True
    assert evaluate_setting("t", [True, False, False], 0.6) is False


def test_yaml_round_trip_keeps_meaning():
    r = Recipe.from_yaml(RECIPE)
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight"]
    for name in names:
        for t in (0.0, 0.3, 1.0):
            for model in ("a", "b"):
                for p in ("weight", "density"):
                    assert again.resolve(p, name, t, model) == r.resolve(p, name, t, model)
    # floats survive bit for bit
    odd = Recipe.from_dict({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.1 + 0.2}}]})
    assert Recipe.from_yaml(odd.to_yaml()).models[0].parameters["weight"] == 0.1 + 0.2


def test_model_refs_add_the_base_once():
    r = Recipe.from_yaml(RECIPE)
    assert r.model_refs == ["a", "b", "base"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: frobnicate\nmodels: [{model: a}]\n", "merge_method: unknown merge method 'frobnicate'"),
        ("merge_method: linear\nmodels: []\n", "models: the model list is empty"),
        (
            "merge_method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: 1, density: 1.5}}\n",
            "models[0].parameters.density: 1.5 is outside [0, 1]",
        ),
        (
            "merge_method: ties\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: 1, density: [0.5, -0.1]}}\n",
            "models[0].parameters.density: -0.1 is outside [0, 1]",
        ),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "base_model: ties needs a base_model"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "models[0].parameters.wieght: unknown parameter"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: abc}}]\n", "weight: expected float, got 'abc'"),
        ("merge_method: linear\nmodels: [{model: a}]\ndtype: float8\n", "dtype: unknown dtype 'float8'"),
        ("merge_method: linear\nmodels: [{model: a}]\nfoo: 1\n", "foo: unknown field"),
        ("models: [{model: a}]\n", "merge_method: missing required field"),
        ("merge_method: linear\nmodels: [{model: a}\n", "malformed YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("merge_method: slerp\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]\nparameters: {t: 0.5}\n", "slerp needs exactly two models"),
        ("merge_method: linear\nslices: []\nmodels: [{model: a}]\n", "'slices:' recipes are not supported"),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_field(text, message, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        Recipe.from_yaml(path)
    msg = str(info.value)
    assert message in msg
    assert msg.startswith(str(path))
    assert "\n" not in msg

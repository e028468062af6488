"""Search spaces: presets, recipes that rebuild each point exactly, one-line errors."""

from __future__ import annotations

import random

import pytest

from evomerge._presets import available_presets
from evomerge._testing import write_family
from evomerge.errors import ConfigError
from evomerge.merge import MergeEngine
from evomerge.space import SearchSpace

REQUIRED = {"task_arithmetic_global", "linear_layerwise", "ties_layerwise", "dare_ties_layerwise", "slerp_layerwise", "breadcrumbs_layerwise"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    folders = write_family(root, 2, seed=2, tokenizer=False)  # 4 layers
    return [str(f) for f in folders]


def space_for(preset: str, family) -> SearchSpace:
    base, *models = family
    if preset.startswith("slerp"):
        return SearchSpace.from_yaml(preset, base_model=base, models=[base, models[0]], num_layers=4)
    if preset.startswith("linear"):
        return SearchSpace.from_yaml(preset, base_model=None, models=models, num_layers=4)
    return SearchSpace.from_yaml(preset, base_model=base, models=models, num_layers=4)


def random_point(space: SearchSpace, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    return {d.name: rng.uniform(d.low, d.high) for d in space.dimensions}


def test_required_presets_ship():
    assert REQUIRED <= set(available_presets("search_spaces"))


def _parameter_presets() -> list[str]:
    """Presets of parameter merges (data-flow presets, ``kind: dataflow``, are tested in test_dataflow.py)."""
    import yaml

    from evomerge._presets import resolve_preset

    return sorted(n for n in available_presets("search_spaces")
                  if (yaml.safe_load(resolve_preset(n, "search_spaces").read_text()) or {}).get("kind") != "dataflow")


@pytest.mark.parametrize("preset", _parameter_presets())
def test_every_point_becomes_a_recipe_that_merges_with_its_values(preset, family):
    space = space_for(preset, family)
    point = random_point(space)
    recipe = space.to_recipe(point, random_seed=3)
    engine = MergeEngine.from_recipe(recipe)
    plans = {p.name: p for p in engine.plan(recipe)}
    for d in space.dimensions:
        tensor, t = space._probe(d)
        # the probe's layer exists in the model under some real tensor of that kind
        real = _real_tensor(plans, tensor)
        plan = plans[real]
        value = plan.shared[d.param] if d.model is None else plan.per_model[d.model][d.param]
        assert value == pytest.approx(point[d.name], abs=1e-12), (d.name, real)
    # round trip: the recipe maps back to the same point
    assert space.params_from_recipe(recipe) == pytest.approx(point)
    # the recipe's YAML merges identically after a write/read cycle
    assert recipe.from_yaml(recipe.to_yaml()) == recipe


def _real_tensor(plans, probe: str) -> str:
    if probe in plans:
        return probe
    if "__evomerge_rest__" in probe:
        return probe.replace("__evomerge_rest__.weight", "input_layernorm.weight")
    for kind in ("self_attn.q_proj", "mlp.up_proj"):
        cand = probe.replace(probe.split(".")[3] + ".weight", kind + ".weight")
        if cand in plans and probe.split(".")[3] in kind:
            return cand
    raise AssertionError(probe)


def test_layerwise_space_has_one_value_per_layer_plus_embed_and_head(family):
    space = space_for("ties_layerwise", family)
    weights = [d for d in space.dimensions if d.param == "weight"]
    assert len(weights) == 2 * (4 + 2)  # 2 models x (4 layers + embed + head)
    assert len([d for d in space.dimensions if d.param == "density"]) == 2
    names = {d.name for d in weights}
    assert "weight/ft0/L03" in names and "weight/ft1/embed" in names and "weight/ft1/head" in names


def test_block_granularity_expands_to_per_layer_lists(family):
    base, *models = family
    space = SearchSpace.from_dict(
        {"merge_method": "task_arithmetic", "granularity": "block:3", "parameters": {"weight": {"low": 0, "high": 1}}},
        base_model=base, models=models, num_layers=4,
    )
    point = {d.name: 0.1 * i for i, d in enumerate(space.dimensions)}
    recipe = space.to_recipe(point)
    setting = recipe.models[0].parameters["weight"]
    layer_values = setting[-1].value
    assert layer_values == [point["weight/ft0/B0"]] * 3 + [point["weight/ft0/B1"]]


def test_uniform_params_is_the_uniform_average_for_task_arithmetic(family):
    space = space_for("task_arithmetic_global", family)
    assert set(space.uniform_params().values()) == {0.5}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"merge_method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0.1, "high": 1.5}}}, "parameters.density: bound: 1.5 is outside [0, 1]"),
        ({"merge_method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "densty": 0.5}}, "parameters.densty: unknown parameter for ties"),
        ({"merge_method": "ties", "parameters": {"weight": {"low": 1, "high": 0}}}, "parameters.weight: low (1) must be below high (0)"),
        ({"merge_method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "normalize": {"low": 0, "high": 1}}}, "'normalize' is a bool and cannot be searched"),
        ({"merge_method": "ties", "parameters": {"density": {"low": 0.1, "high": 1}}}, "ties needs 'weight'"),
        ({"merge_method": "ties", "granularity": "blocks", "parameters": {"weight": {"low": 0, "high": 1}}}, "granularity must be global, layer or block:N"),
        ({"merge_method": "ties", "parameters": {"weight": 0.5}}, "nothing is searched"),
        ({"merge_method": "tie", "parameters": {}}, "unknown merge method 'tie'"),
    ],
)
def test_bad_spaces_fail_with_one_line(data, message, family):
    with pytest.raises(ConfigError, match=None) as info:
        SearchSpace.from_dict(data, base_model=family[0], models=family[1:], num_layers=4, where="space.yaml")
    assert message in str(info.value) and str(info.value).startswith("space.yaml")


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown search_spaces preset 'ties_layrwise'.*ties_layerwise"):
        SearchSpace.from_yaml("ties_layrwise", base_model="b", models=["a"], num_layers=2)

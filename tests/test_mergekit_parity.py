"""evomerge merges exactly like mergekit 0.1.5 (acceptance 2), and in place like on disk (3).

The expected tensors under tests/data/parity/expected/ were written by mergekit 0.1.5
from the recipes beside them (scripts/mergekit_parity.sh regenerates them in a separate
environment). Max relative error is max|ours - mergekit| / max|mergekit| per tensor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge import MergeEngine, Recipe, merge

PARITY = Path(__file__).parent / "data" / "parity"
RECIPES = sorted(p.stem for p in (PARITY / "recipes").glob("*.yaml"))
#: layer stacks (slices:, alone or ending a mergekit-multi chain) have no in-place form
MODELS_FORM = [r for r in RECIPES if "slices:" not in (PARITY / "recipes" / f"{r}.yaml").read_text()]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory) -> Path:
    # Recipes name models relative to the parity folder, as mergekit read them.
    return PARITY


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def test_every_required_method_is_covered():
    methods = {Recipe.from_yaml(PARITY / "recipes" / f"{r}.yaml").merge_method for r in MODELS_FORM}
    required = {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp", "nuslerp", "model_stock", "passthrough"}
    assert required <= methods
    texts = "".join((PARITY / "recipes" / f"{r}.yaml").read_text() for r in RECIPES)
    assert "filter:" in texts and "[0.2, 0.8]" in texts  # filters and per-layer gradients
    assert "slices:" in texts and "\n---\n" in texts  # layer stacks, and a chain (mergekit-multi)


@pytest.mark.parametrize("name", RECIPES)
def test_write_matches_mergekit(name, parity_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(parity_dir)
    out = tmp_path / "out"
    merge(parity_dir / "recipes" / f"{name}.yaml", out)
    ours = load_file(str(out / "model.safetensors"))
    expected = load_file(str(parity_dir / "expected" / f"{name}.safetensors"))
    assert set(ours) == set(expected)
    worst = max(rel_err(ours[k], expected[k]) for k in expected)
    assert worst < TOLERANCE, f"{name}: max relative error {worst:.3e}"


@pytest.mark.parametrize("name", MODELS_FORM)
def test_merge_into_live_model_equals_write(name, parity_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(parity_dir)
    recipe = Recipe.from_yaml(parity_dir / "recipes" / f"{name}.yaml")
    engine = MergeEngine.from_recipe(recipe)
    engine.write(recipe, tmp_path / "out")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = recipe.base_model or recipe.models[0].model
    model = AutoModelForCausalLM.from_pretrained(parity_dir / ref, dtype=torch.float32)
    engine.merge_into(model, recipe)
    live = model.state_dict()
    for k, v in written.items():
        assert torch.equal(live[k], v), k
    # The merged folder itself loads and gives the same weights.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    for k, v in written.items():
        assert torch.equal(loaded[k], v), k


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "task_arithmetic", "linear", "slerp", "nuslerp", "model_stock", "passthrough"])
def test_compiled_kernels_match_mergekit(name, parity_dir, tmp_path, monkeypatch):
    """The fused torch.compile path (used for large tensors) gives mergekit's numbers too."""
    monkeypatch.chdir(parity_dir)
    recipe = Recipe.from_yaml(parity_dir / "recipes" / f"{name}.yaml")
    engine = MergeEngine.from_recipe(recipe, compile=True)
    expected = load_file(str(parity_dir / "expected" / f"{name}.safetensors"))
    for plan in engine.plan(recipe):
        got = engine.merged_tensor(recipe, plan)
        assert rel_err(got, expected[plan.name]) < TOLERANCE, plan.name
    # the fused kernels that write straight into a live model's parameters
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(parity_dir / (recipe.base_model or recipe.models[0].model), dtype=torch.float32)
    engine.merge_into(model, recipe)
    live = model.state_dict()
    for name, ref in expected.items():
        assert rel_err(live[name], ref) < TOLERANCE, name
    assert not engine.kernels._failed, "torch.compile fell back to eager"

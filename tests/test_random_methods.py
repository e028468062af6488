"""DARE and DELLA: kept fraction and rescaling match their definitions; seeds repeat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge._testing import llama_config, write_family
from evomerge.errors import ConfigError
from evomerge.merge import MergeEngine, Recipe
from evomerge.merge.methods.task_arithmetic import row_rank_norm


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fam")
    # no untouched tensors: every entry of every task vector is nonzero
    return write_family(root, 2, seed=5, cfg=llama_config(hidden=64, intermediate=128, layers=2), untouched=(), tokenizer=False)


def recipe(method: str, family, *, density=0.3, seed=None, rescale=None, epsilon=None, models=1) -> Recipe:
    params = {"weight": 1.0, "density": density}
    if epsilon is not None:
        params["epsilon"] = epsilon
    data = {
        "merge_method": method,
        "base_model": str(family[0]),
        "models": [{"model": str(f), "parameters": params} for f in family[1 : 1 + models]],
    }
    if rescale is not None:
        data["parameters"] = {"rescale": rescale}
    if seed is not None:
        data["random_seed"] = seed
    return Recipe.from_dict(data)


def task_vectors(engine: MergeEngine, r: Recipe) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (merged - base, original task vector) for float tensors."""
    out = {}
    base, model = engine.sources[r.base_model], engine.sources[r.models[0].model]
    for plan in engine.plan(r):
        merged = engine.merged_tensor(r, plan)
        b = base.tensor(plan.name).float()
        out[plan.name] = (merged - b, model.tensor(plan.name).float() - b)
    return out


def kept_fraction(tv: dict) -> float:
    kept = sum(int((m != 0).sum()) for m, _ in tv.values())
    total = sum(d.numel() for _, d in tv.values())
    return kept / total


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_keeps_density_fraction_without_rescale(family, density):
    engine = MergeEngine.from_recipe(recipe("dare_linear", family))
    tv = task_vectors(engine, recipe("dare_linear", family, density=density, rescale=False))
    n = sum(d.numel() for _, d in tv.values())
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(kept_fraction(tv) - density) < 5 * sigma
    for merged, delta in tv.values():  # kept entries are the task vector itself
        kept = merged != 0
        assert torch.allclose(merged[kept], delta[kept], rtol=1e-5, atol=1e-7)


def test_dare_rescale_restores_each_tensors_l1_norm(family):
    """The masked norms of later candidates come from per-level sums kept from the first
    (no pass): still each tensor's exact norm, on and off the 4096-level grid of cuts."""
    engine = MergeEngine.from_recipe(recipe("dare_ties", family))
    for density in (0.25, 0.1234, 0.6):
        tv = task_vectors(engine, recipe("dare_linear", family, density=density))
        for name, (merged, delta) in tv.items():
            assert merged.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5), name
            n = merged.numel()
            assert abs((merged != 0).float().mean().item() - density) < 5 * (density * (1 - density) / n) ** 0.5, name


def test_same_seed_same_tensors_other_seed_other_masks(family):
    r7 = recipe("dare_ties", family, seed=7, models=2)
    a = MergeEngine.from_recipe(r7)
    b = MergeEngine.from_recipe(r7)
    for plan in a.plan(r7):
        assert torch.equal(a.merged_tensor(r7, plan), b.merged_tensor(r7, plan))
    r8 = recipe("dare_ties", family, seed=8, models=2)
    plan = a.plan(r8)[1]
    assert not torch.equal(a.merged_tensor(r7, plan), a.merged_tensor(r8, plan))


def test_lower_density_mask_is_a_subset_of_higher(family):
    """Common random numbers: one seed's masks are nested across densities."""
    engine = MergeEngine.from_recipe(recipe("dare_linear", family))
    low = task_vectors(engine, recipe("dare_linear", family, density=0.2, rescale=False))
    high = task_vectors(engine, recipe("dare_linear", family, density=0.6, rescale=False))
    for name in low:
        assert bool(((low[name][0] != 0) & (high[name][0] == 0)).sum() == 0), name


def test_della_keep_probability_rises_with_magnitude_rank(family):
    density, eps = 0.5, 0.2
    r = recipe("della_linear", family, density=density, epsilon=eps, rescale=False)
    engine = MergeEngine.from_recipe(r)
    tv = task_vectors(engine, r)
    assert abs(kept_fraction(tv) - density) < 0.01
    lo_kept = lo_n = hi_kept = hi_n = 0
    for name, (merged, delta) in tv.items():
        if delta.dim() < 2:
            continue
        ranks = row_rank_norm(delta.abs(), delta.numel() // delta.shape[0])
        lo, hi = ranks < 0.25, ranks > 0.75
        lo_kept += int((merged[lo] != 0).sum()); lo_n += int(lo.sum())
        hi_kept += int((merged[hi] != 0).sum()); hi_n += int(hi.sum())
    # expected: density - eps + 2 eps * mean rank of the quarter
    assert lo_kept / lo_n == pytest.approx(density - eps + 2 * eps * 0.125, abs=0.02)
    assert hi_kept / hi_n == pytest.approx(density - eps + 2 * eps * 0.875, abs=0.02)


def test_della_rescale_restores_l1_norm(family):
    r = recipe("della_linear", family, density=0.4, epsilon=0.1)
    tv = task_vectors(MergeEngine.from_recipe(r), r)
    for name, (merged, delta) in tv.items():
        assert merged.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4), name


def test_della_epsilon_must_keep_probabilities_inside_unit_interval(family):
    r = recipe("della", family, density=0.1, epsilon=0.15)
    with pytest.raises(ConfigError, match="epsilon 0.15 with density 0.1"):
        MergeEngine.from_recipe(r).plan(r)

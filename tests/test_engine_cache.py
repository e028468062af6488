"""Engines on one node share task vectors and statistics through mapped cache files."""

from __future__ import annotations

import pytest
import torch

from evomerge._testing import write_family
from evomerge.merge import MergeEngine, Recipe
from evomerge.sources import SourceModel


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return [str(f) for f in write_family(tmp_path_factory.mktemp("fam"), 2, seed=4, tokenizer=False)]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs", "task_arithmetic"])
def test_prepared_cache_gives_the_same_merge_without_recomputing(method, family, tmp_path, monkeypatch):
    base, a, b = family
    params = {"weight": 0.6, "density": 0.5}
    recipe = Recipe.from_dict(
        {"merge_method": method, "base_model": base, "random_seed": 5,
         "models": [{"model": a, "parameters": params}, {"model": b, "parameters": {"weight": 0.3, "density": 0.7}}]}
    )
    plain = MergeEngine([SourceModel.open(x) for x in family])
    expected = {p.name: plain.merged_tensor(recipe, p) for p in plain.plan(recipe)}

    driver = MergeEngine([SourceModel.open(x) for x in family], cache_dir=tmp_path / "cache")
    driver.prepare(recipe)
    files = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir())
    assert "delta" in files

    worker = MergeEngine([SourceModel.open(x) for x in family], cache_dir=tmp_path / "cache")
    # nothing may be recomputed from the sources: every statistic comes from the files
    monkeypatch.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted magnitudes recomputed"))
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: pytest.fail("ranks recomputed"))
    monkeypatch.setattr(worker, "_work", lambda ref, name: pytest.fail("task vector recomputed") if ref != base else plain._work(ref, name))
    for p in worker.plan(recipe):
        assert torch.equal(worker.merged_tensor(recipe, p), expected[p.name]), p.name

"""A run config that aligns its sources before the search (issue 8, acceptance 4's hook).

Skipped until ``sources.align`` is part of the run config schema (run_config.py) and
``evomerge.run.create`` calls :func:`evomerge.align.sources.align_run_sources`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import evomerge.evaluate
from evomerge._testing import llama_config, write_family
from evomerge.align import LlamaSpec, apply_permutations, random_permutations
from evomerge.run_config import SourcesConfig

pytestmark = pytest.mark.skipif("align" not in SourcesConfig.model_fields, reason="run config has no sources.align yet")


class Closeness:
    """1 / (1 + distance to a target state): a merge close to the base scores high."""

    name = "close"
    metrics = {"score": "maximize"}

    def __init__(self, target: Path):
        self.target = load_file(str(target / "model.safetensors"))

    def evaluate(self, model, tokenizer, *, limit=None):
        sd = model.state_dict()
        return {"score": 1.0 / (1.0 + sum(float((sd[n] - t).pow(2).sum()) for n, t in self.target.items()) ** 0.5)}


def test_search_runs_on_aligned_sources(tmp_path: Path, monkeypatch) -> None:
    from evomerge.run.api import create

    cfg = llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2)
    (base,) = write_family(tmp_path / "fam", 0, seed=1, cfg=cfg)
    other = tmp_path / "other"
    other.mkdir()
    spec = LlamaSpec.from_config(cfg)
    save_file(apply_permutations(load_file(str(base / "model.safetensors")), spec, random_permutations(spec, torch.Generator().manual_seed(0))), str(other / "model.safetensors"))
    (other / "config.json").write_text((base / "config.json").read_text())
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", lambda preset, split="validation", **o: Closeness(base), raising=False)
    config = {
        "sources": {"models": [str(base), str(other)], "align": {"method": "weight", "to": "first"}},
        "search_space": "linear_layerwise",
        "evaluators": [{"preset": "close"}],
        "objectives": [{"metric": "close/score"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": 3},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = create(tmp_path / "run.yaml", runs_dir=tmp_path / "runs")
    aligned = str((tmp_path / "runs" / "run" / "aligned" / "other").absolute())
    frozen = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert frozen["sources"]["models"] == [str(base), aligned]
    assert frozen["sources"]["align"]["originals"] == {aligned: str(other)}
    summary = run.run(progress=False)
    # B aligned to A is A itself: every linear merge is A, at distance 0
    assert summary["n_complete"] == 3 and all(m["values"][0] == pytest.approx(1.0) for m in summary["pareto"])

"""LoRA adapters as sources: merging adapters equals materializing each one and merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge._testing import llama_config, write_family, write_lora_adapters
from evomerge.bench.merge import example_recipe
from evomerge.merge import MergeEngine, Recipe


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lora")
    (base,) = write_family(root, 0, seed=4, cfg=llama_config(hidden=48, intermediate=96, layers=3, vocab=64), tokenizer=False)
    adapters, fulls = write_lora_adapters(root, base, 3, rank=4, seed=1)
    return {"base": base, "adapters": adapters, "fulls": fulls}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "dare_linear", "breadcrumbs_ties", "della_linear"])
def test_merging_adapters_equals_merging_the_materialized_models(method, lora_family):
    base = str(lora_family["base"])
    on_adapters = example_recipe(method, base, [str(p) for p in lora_family["adapters"]], variant=1)
    on_fulls = example_recipe(method, base, [str(p) for p in lora_family["fulls"]], variant=1)
    a, f = MergeEngine.from_recipe(on_adapters, compile=False), MergeEngine.from_recipe(on_fulls, compile=False)
    a.chunk_numel = 301  # row blocks of the low-rank updates, cut anywhere
    for pa, pf in zip(a.plan(on_adapters), f.plan(on_fulls)):
        assert pa.name == pf.name
        assert rel_err(a.merged_tensor(on_adapters, pa), f.merged_tensor(on_fulls, pf)) < 1e-5, pa.name


def test_adapters_and_full_fine_tunes_mix(lora_family):
    base = str(lora_family["base"])
    mixed = [str(lora_family["adapters"][0]), str(lora_family["fulls"][1])]
    fulls = [str(lora_family["fulls"][0]), str(lora_family["fulls"][1])]
    r1, r2 = example_recipe("ties", base, mixed), example_recipe("ties", base, fulls)
    e1, e2 = MergeEngine.from_recipe(r1), MergeEngine.from_recipe(r2)
    for p1, p2 in zip(e1.plan(r1), e2.plan(r2)):
        assert rel_err(e1.merged_tensor(r1, p1), e2.merged_tensor(r2, p2)) < 1e-5, p1.name


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_lora_live_model_takes_a_candidate_by_its_factors(method, lora_family):
    """Linear merges of adapters set only the LoRA factors of the live model; it computes
    what the fully merged model computes."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.low_rank import lora_live_model, low_rank_adapters

    base = str(lora_family["base"])
    adapters = [str(p) for p in lora_family["adapters"]]
    engine = MergeEngine.from_recipe(example_recipe(method, base, adapters))
    live = lora_live_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), low_rank_adapters(engine, adapters))
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for variant in (1, 2):
        recipe = example_recipe(method, base, adapters, variant=variant)
        engine.merge_into(live, recipe)
        engine.merge_into(plain, recipe)
        assert rel_err(_logits(live, ids), _logits(plain, ids)) < 1e-5


def test_an_exact_adapter_loads_with_peft_and_gives_the_merged_models_logits(lora_family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = str(lora_family["base"])
    recipe = example_recipe("task_arithmetic", base, [str(p) for p in lora_family["adapters"]], variant=1)
    engine = MergeEngine.from_recipe(recipe)
    info = engine.write_adapter(recipe, tmp_path / "adapter")
    assert info["exact"] and info["rank"] == 12 and info["error"] == 0.0  # three rank-4 adapters side by side
    engine.write(recipe, tmp_path / "full")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(tmp_path / "adapter"))
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assert rel_err(_logits(loaded, ids), _logits(full, ids)) < 1e-4


def test_a_truncated_adapter_reports_its_error_and_it_shrinks_with_the_rank(lora_family, tmp_path):
    base = str(lora_family["base"])
    recipe = example_recipe("ties", base, [str(p) for p in lora_family["adapters"]], variant=1)
    engine = MergeEngine.from_recipe(recipe)
    errors = []
    for rank in (1, 4, 16, 48):
        info = engine.write_adapter(recipe, tmp_path / f"r{rank}", rank=rank)
        assert not info["exact"] and info["rank"] <= rank and set(info["errors"]) and 0 <= info["error"] <= 1
        assert max(info["errors"].values()) >= info["error"] * 0.999 or len(info["errors"]) == 1
        errors.append(info["error"])
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] and errors[-1] < 1e-5  # full rank is exact
    with pytest.raises(Exception, match="exact adapter needs a merge of LoRA adapters only|not linear"):
        engine.write_adapter(recipe, tmp_path / "exact")  # TIES is not linear: it needs a rank
    assert not (tmp_path / "exact").exists()


def _broken(lora_family, tmp_path: Path, case: str) -> tuple[str, str]:
    """A copy of the first adapter broken one way; returns (adapter folder, base folder)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    good = lora_family["adapters"][0]
    bad = tmp_path / f"bad-{case}"
    shutil.copytree(good, bad)
    cfg_file, weights = bad / "adapter_config.json", bad / "adapter_model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    base = str(lora_family["base"])
    if case == "wrong base":
        other = write_family(tmp_path / "other", 0, seed=9, cfg=llama_config(hidden=32, intermediate=64, layers=3, vocab=64), tokenizer=False)[0]
        base = str(other)
    elif case == "no weights":
        weights.unlink()
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif case == "rank mismatch":
        cfg["r"] = 8
    elif case == "pickle":
        torch.save(load_file(str(weights)), bad / "adapter_model.bin")
        weights.unlink()
    elif case == "malformed config":
        cfg_file.write_text('{"r": 4, ')
    elif case == "missing target module":
        state = load_file(str(weights))
        state = {k.replace("q_proj", "qq_proj"): v for k, v in state.items()}
        save_file(state, str(weights))
    elif case == "dora":
        cfg["use_dora"] = True
    elif case == "not lora":
        cfg["peft_type"] = "IA3"
    elif case == "names another base":
        cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    elif case == "half a pair":
        state = load_file(str(weights))
        save_file({k: v for k, v in state.items() if not ("q_proj" in k and "lora_B" in k)}, str(weights))
    if case not in ("malformed config",):
        cfg_file.write_text(json.dumps(cfg))
    return str(bad), base


BAD = {
    "wrong base": "the update of model.layers.0.mlp.down_proj is [48, 96], the base's model.layers.0.mlp.down_proj.weight is [32, 64]: another base model?",
    "no weights": "no adapter_model.safetensors beside adapter_config.json",
    "truncated": "not a readable safetensors file",
    "rank mismatch": "rank mismatch at model.layers.0.mlp.down_proj: its factors have rank 4, adapter_config.json says r = 8",
    "pickle": "adapter_model.bin: pickle checkpoint refused",
    "malformed config": "adapter_config.json: malformed JSON",
    "missing target module": "target module model.layers.0.self_attn.qq_proj is not in the base",
    "dora": "DoRA adapters (use_dora) are not supported",
    "not lora": "peft_type IA3 is not supported",
    "names another base": "says it was trained on 'meta-llama/Llama-3.1-8B'",
    "half a pair": "target module model.layers.0.self_attn.q_proj has no lora_B weights",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_are_one_line_exit_2_and_nothing_written(case, lora_family, tmp_path, capsys):
    from evomerge.cli import main

    adapter, base = _broken(lora_family, tmp_path, case)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {adapter}\n    parameters: {{weight: 0.5}}\n")
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD[case] in err, err
    assert not out.exists()


def test_an_adapter_cannot_be_the_base_and_needs_one(lora_family, tmp_path, capsys):
    from evomerge.cli import main

    adapter = str(lora_family["adapters"][0])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {adapter}\nmodels:\n  - model: {lora_family['adapters'][1]}\n    parameters: {{weight: 0.5}}\n")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    assert "a LoRA adapter cannot be the base model" in capsys.readouterr().err


# ---------------------------------------------------------------------------- a search over adapters
class _LogitCloseness:
    """Two objectives: closeness of the candidate's logits to each of two full fine-tunes'
    (works on a plain or a LoRA live model alike)."""

    name = "logits"

    def __init__(self, fulls: list[Path]):
        from transformers import AutoModelForCausalLM

        self.ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
        self.targets = [_logits(AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32), self.ids) for f in fulls]
        self.metrics = {f"ft{i}": "maximize" for i in range(len(fulls))}

    def evaluate(self, model, tokenizer, *, limit=None):
        got = _logits(model, self.ids)
        return {f"ft{i}": 1.0 / (1.0 + float((got - t).norm())) for i, t in enumerate(self.targets)}


def test_a_search_over_adapters_exports_a_member_as_an_adapter(lora_family, tmp_path):
    """Task arithmetic over two adapters (LoRA live models in the workers): front members are
    full folders, and `evomerge export --adapter` writes one exact adapter whose logits
    are the member's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from evomerge.cli import main
    from evomerge.run import search

    (base,) = write_family(tmp_path / "family", 0, seed=4, cfg=llama_config(hidden=48, intermediate=96, layers=3, vocab=64))  # with a tokenizer
    adapters, fulls = write_lora_adapters(tmp_path / "family", base, 2, rank=4, seed=1)
    config = {
        "sources": {"base_model": str(base), "models": [str(a) for a in adapters]},
        "search_space": "lora_task_arithmetic_layerwise",
        "objectives": [{"metric": "logits/ft0"}, {"metric": "logits/ft1"}],
        "optimizer": {"name": "tpe"},
        "budget": {"trials": 5},
    }
    summary = search(config, runs_dir=tmp_path / "runs", name="adapters", progress=False, evaluators=[_LogitCloseness(fulls)])
    assert summary["n_complete"] == 5 and summary["pareto"]
    run_dir = tmp_path / "runs" / "adapters"
    member = sorted((run_dir / "pareto").glob("[0-9]*"))[0]
    assert (member / "config.json").is_file()  # a full model folder, written by the worker
    assert main(["export", str(run_dir), "--trial", member.name, "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(tmp_path / "adapter"))
    full = AutoModelForCausalLM.from_pretrained(member, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    assert rel_err(_logits(loaded, ids), _logits(full, ids)) < 1e-4
    assert main(["export", str(run_dir), "--trial", member.name, "--out", str(tmp_path / "r0"), "--adapter", "--rank", "0"]) == 2
    assert not (tmp_path / "r0").exists()

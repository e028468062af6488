"""Alignment (issue 8): permutation symmetries, recovery of a known permutation, mismatches.

Acceptance 1: every permutation kind, GQA included, leaves the logits unchanged.
Acceptance 2: ``align`` recovers a known random permutation exactly (B = permuted A).
Acceptance 5: models of different architectures or sizes fail with one line naming
the first mismatch.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge._testing import llama_config, write_family
from evomerge.align import (
    KINDS,
    LlamaSpec,
    align_folder,
    align_models,
    apply_permutations,
    identity_permutations,
    random_permutations,
)
from evomerge.align.permutation import permute_tensor
from evomerge.cli import main
from evomerge.errors import ConfigError, SourceError

VOCAB = 48
# (heads, kv_heads, tied, biases): MHA, GQA, MQA with tied head and q/k/v/o/MLP biases
CONFIGS = {
    "mha": (4, 4, False, False),
    "gqa": (4, 2, False, False),
    "mqa_tied_bias": (4, 1, True, True),
}


@functools.lru_cache(maxsize=None)
def _model(heads: int, kv: int, tie: bool, bias: bool, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama (cached: tests only read it)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
        vocab_size=VOCAB, tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, max_position_embeddings=64,
    )
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: make every tensor matter
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.02))
    return m


def _logits(model: LlamaForCausalLM, state: dict) -> torch.Tensor:
    other = _scratch(model)
    other.load_state_dict(state)
    ids = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return other(input_ids=ids).logits


@functools.lru_cache(maxsize=None)
def _scratch(model: LlamaForCausalLM) -> LlamaForCausalLM:
    return LlamaForCausalLM(model.config).eval()


# tensors each kind must move (so a no-op would fail the test)
_MOVED = {
    "residual": "model.embed_tokens.weight",
    "mlp": "model.layers.1.mlp.down_proj.weight",
    "kv_heads": "model.layers.0.self_attn.k_proj.weight",
    "q_in_group": "model.layers.0.self_attn.q_proj.weight",
    "v_dims": "model.layers.1.self_attn.v_proj.weight",
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS], ids=lambda k: "+".join(k) if len(k) > 1 else k[0])
def test_every_permutation_kind_keeps_logits(config: str, kinds: tuple[str, ...]) -> None:
    heads, kv, tie, bias = CONFIGS[config]
    if kinds == ("kv_heads",) and kv == 1 or kinds == ("q_in_group",) and heads == kv:
        pytest.skip("this kind is trivial here (one key/value head, or one query head per group)")
    model = _model(heads, kv, tie, bias)
    spec = LlamaSpec.from_config(model.config.to_dict())
    state = model.state_dict()
    perms = random_permutations(spec, torch.Generator().manual_seed(1), kinds)
    moved = apply_permutations(state, spec, perms)
    for kind in kinds:
        assert not moved[_MOVED[kind]].equal(state[_MOVED[kind]]), f"{kind} moved nothing"
    diff = (_logits(model, moved) - _logits(model, state)).abs().max().item()
    assert diff < 1e-4, f"{config} {kinds}: logits moved by {diff:.2e}"


def test_a_broken_permutation_changes_logits() -> None:
    """The check above can fail: v rows permuted without the matching o columns."""
    model = _model(4, 2, False, False)
    spec = LlamaSpec.from_config(model.config.to_dict())
    state = dict(model.state_dict())
    name = "model.layers.0.self_attn.v_proj.weight"
    state[name] = state[name][torch.randperm(state[name].shape[0], generator=torch.Generator().manual_seed(0))]
    assert (_logits(model, state) - _logits(model, model.state_dict())).abs().max().item() > 1e-3
    assert apply_permutations(state, spec, identity_permutations(spec))[name].equal(state[name])


def test_rotary_dimensions_stay_in_place() -> None:
    """q/k rows move only in whole heads: within-head order is what rotary pairs rely on."""
    spec = LlamaSpec.from_config(llama_config(heads=4, kv_heads=2))
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    rows = torch.arange(spec.num_attention_heads * spec.head_dim, dtype=torch.float32)[:, None].repeat(1, spec.hidden_size)
    q = permute_tensor("model.layers.0.self_attn.q_proj.weight", rows, spec, perms)[:, 0].long()
    assert (q.reshape(-1, spec.head_dim) % spec.head_dim == torch.arange(spec.head_dim)).all()
    assert not q.equal(torch.arange(len(q)))  # heads did move


# --------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("method,alpha", [("weight", None), ("activation", None), ("mudsc", 0.5), ("mudsc", None)])
def test_align_recovers_a_known_permutation_exactly(permuted_pair, tmp_path: Path, method: str, alpha) -> None:
    a, b, texts = permuted_pair
    out = tmp_path / "aligned"
    summary = align_folder(a, b, out, method=method, alpha=alpha, data=texts)
    want, got = load_file(str(a / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(want)
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    assert worst == 0.0, f"{method}: aligned B differs from A by {worst}"
    record = json.loads((out / "alignment.json").read_text())
    assert record["method"] == method and record["converged"] and len(record["permutations"]["mlp"]) == 2
    if method == "activation":  # nothing propagates between groups: one pass, no confirming pass
        assert record["passes"] == 1
    if alpha is None and method == "mudsc":  # the grid was tried and scored on held-out batches
        assert [g["alpha"] for g in record["grid"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert all(g["metric"] == "loss" for g in record["grid"])
    assert summary["alpha"] == {"weight": 1.0, "activation": 0.0}.get(method, summary["alpha"])
    for f in ("config.json", "tokenizer.json", "README.md"):
        assert (out / f).is_file()


def test_a_llama_with_attention_biases_is_aligned(tmp_path: Path) -> None:
    """Llama's attention_bias puts a bias on o_proj too (Qwen2's does not): it is part of the layout."""
    a = _model(4, 1, True, True)
    assert "model.layers.0.self_attn.o_proj.bias" in a.state_dict()
    spec = LlamaSpec.from_config(a.config.to_dict())
    b = _scratch(a)
    b.load_state_dict(apply_permutations(a.state_dict(), spec, random_permutations(spec, torch.Generator().manual_seed(3))))
    state = align_models(a, b, method="weight").state_dict
    assert all(state[n].equal(t) for n, t in a.state_dict().items())


def test_alignment_keeps_the_models_function(tmp_path: Path) -> None:
    """Two unrelated models: B aligned to A computes exactly what B computed."""
    a, b = _model(4, 2, False, False, seed=1), _model(4, 2, False, False, seed=2)
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(0))
    res = align_models(a, b, method="mudsc", alpha=0.5, data=ids)
    assert not res.permutations.equal(identity_permutations(res.spec))
    other = LlamaForCausalLM(b.config).eval()
    other.load_state_dict(res.state_dict)
    with torch.no_grad():
        assert (other(input_ids=ids).logits - b(input_ids=ids).logits).abs().max().item() < 1e-4


def test_methods_needing_data_say_so(permuted_pair, tmp_path: Path) -> None:
    a, b, _ = permuted_pair
    with pytest.raises(ConfigError, match="needs data"):
        align_folder(a, b, tmp_path / "x", method="activation")
    with pytest.raises(ConfigError, match="alpha applies to method mudsc only"):
        align_folder(a, b, tmp_path / "x", method="weight", alpha=0.3)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        align_folder(a, b, tmp_path / "x", method="mudsc", alpha=1.5, data=["x"])
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- CLI
def test_cli_align_writes_a_loadable_folder(permuted_pair, tmp_path: Path, capsys) -> None:
    a, b, texts = permuted_pair
    out = tmp_path / "out"
    code = main(["align", "--reference", str(a), "--model", str(b), "--method", "mudsc", "--alpha", "0.5", "--data", str(texts), "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["alpha"] == 0.5 and summary["out"] == str(out)
    model = LlamaForCausalLM.from_pretrained(out)
    ref = LlamaForCausalLM.from_pretrained(a)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() == 0.0
    assert main(["align", "--reference", str(a), "--model", str(b), "--method", "weight", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    # without --json, each step is told on stderr as it ends, then one line on stdout
    assert main(["align", "--reference", str(a), "--model", str(b), "--alpha", "0.5", "--data", str(texts), "--out", str(tmp_path / "o2")]) == 0
    cap = capsys.readouterr()
    steps = cap.err.strip().splitlines()
    assert steps[0].startswith("activations of both models over ") and re.fullmatch(r"activations: \d+ tokens in [\d.]+ s", steps[1])
    assert steps[2].startswith("alpha 0.5: ") and cap.out.startswith(f"aligned {b} to {a} with mudsc (alpha 0.5")


def _folder(root: Path, name: str, **changes) -> Path:
    cfg = dict(llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2), **changes)
    (folder,) = write_family(root / name, 0, seed=0, cfg=cfg, tokenizer=False)
    return folder


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({"hidden_size": 64}, "hidden_size differs ({a} has 32, {b} has 64)"),
        ({"num_hidden_layers": 3}, "num_hidden_layers differs ({a} has 2, {b} has 3)"),
        ({"num_key_value_heads": 4}, "num_key_value_heads differs ({a} has 2, {b} has 4)"),
        ({"intermediate_size": 40}, "intermediate_size differs ({a} has 48, {b} has 40)"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings differs ({a} has False, {b} has True)"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architecture differs ({a} is LlamaForCausalLM, {b} is MistralForCausalLM)"),
    ],
)
def test_mismatch_fails_with_one_line_naming_it(tmp_path: Path, capsys, changes: dict, expected: str) -> None:
    a, b = _folder(tmp_path, "a"), _folder(tmp_path, "b", **changes)
    code = main(["align", "--reference", str(a), "--model", str(b), "--method", "weight", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.strip() == f"evomerge align: error: cannot align {b} to {a}: " + expected.format(a=a, b=b)
    assert not (tmp_path / "out").exists()


def test_mismatch_of_a_tensor_and_a_foreign_family(tmp_path: Path) -> None:
    a, b = _folder(tmp_path, "a"), _folder(tmp_path, "b")
    state = load_file(str(b / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(b / "model.safetensors"))
    with pytest.raises(SourceError, match=r"tensor model.layers.1.mlp.up_proj.weight is in .* but missing from"):
        align_models(a, b, method="weight")
    gpt = _folder(tmp_path, "gpt", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(SourceError, match="alignment supports the Llama family .* model_type 'gpt2'"):
        align_models(a, gpt, method="weight")

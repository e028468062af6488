"""Issue 8 support: output ensembles, activation data adapters, aligning a run's sources."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge._testing import llama_config, write_family
from evomerge.align import ALIGNMENT_FILE, LlamaSpec, apply_permutations, random_permutations
from evomerge.align.data import read_texts, split_batches, token_batches
from evomerge.align.ensemble import EnsembleEvaluator, EnsembleModel
from evomerge.align.lm_loss import LMLossEvaluator
from evomerge.align.sources import align_run_sources
from evomerge.errors import ConfigError


def _model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=20)
    return LlamaForCausalLM(cfg).eval()


# --------------------------------------------------------------------------- ensemble
def test_ensemble_averages_distributions_not_logits() -> None:
    a, b = _model(0), _model(1)
    ids = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pa, pb = (torch.softmax(m(input_ids=ids).logits, -1) for m in (a, b))
        out = EnsembleModel([a, b])(ids, labels=ids)
        weighted = EnsembleModel([a, b], weights=[3, 1])(ids).logits
    assert torch.allclose(out.logits.exp(), (pa + pb) / 2, atol=1e-6)
    assert torch.allclose(weighted.exp(), 0.75 * pa + 0.25 * pb, atol=1e-6)
    expected = -torch.log((pa + pb) / 2)[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ensemble_evaluator_scores_below_the_mean_loss() -> None:
    """-log of a mean probability is at most the mean of -log probabilities (Jensen)."""
    a, b = _model(0), _model(1)
    ev = LMLossEvaluator(torch.randint(3, 20, (6, 10), generator=torch.Generator().manual_seed(1)))
    ens = EnsembleEvaluator(ev)
    assert ens.name == "ensemble_lm" and ens.metrics == ev.metrics
    la, lb = ev.evaluate(a, None)["loss"], ev.evaluate(b, None)["loss"]
    le = ens.evaluate([a, b], None)["loss"]
    assert le <= (la + lb) / 2 + 1e-6 and le < max(la, lb)
    assert ens.evaluate([a], None)["loss"] == pytest.approx(la, abs=1e-5)


def test_ensemble_generates_greedily() -> None:
    a = _model(0)
    ids = torch.tensor([[3, 4, 5]])
    out = EnsembleModel([a, a]).generate(ids, max_new_tokens=4)
    with torch.no_grad():
        ref = a.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref[:, : out.shape[1]].tolist()


# --------------------------------------------------------------------------- data
def test_token_batches_from_files_and_evaluators(tmp_path: Path) -> None:
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "ADD 1+2=", "answer": "3"}\n{"text": "hello"}\n\n')
    assert read_texts(jsonl) == ["ADD 1+2=3", "hello"]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\ntwo\n")
    assert read_texts(txt) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"n": [1]}\n')
    with pytest.raises(ConfigError, match="record 1 has no text field"):
        read_texts(tmp_path / "bad.jsonl")

    class WithTexts:
        def texts(self):
            return ["abc", "de"]

    tok = lambda texts, **_: {"input_ids": [[ord(c) - 90 for c in t] for t in texts]}  # noqa: E731
    batches = token_batches(WithTexts(), tok, batch_size=8)
    assert batches[0]["input_ids"].tolist() == [[7, 8, 9], [10, 11, 0]]
    assert batches[0]["attention_mask"].sum().item() == 5
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        token_batches(["abc"])
    with pytest.raises(ConfigError, match="not found"):
        token_batches(tmp_path / "missing.jsonl", tok)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match=r"blank.txt: no text or tokens to read \(empty data\)"):
        token_batches(tmp_path / "blank.txt", tok)  # not the tokenizer's IndexError on an empty batch
    fit, held = split_batches(token_batches(torch.ones(10, 3, dtype=torch.long), batch_size=2))
    assert (len(fit), len(held)) == (4, 1)


def test_lm_loss_limit_counts_like_the_other_evaluators() -> None:
    """An int is a count of sequences, a float a fraction (1.0 = all), as in dataset evaluators."""
    model, ev = _model(0), LMLossEvaluator(torch.randint(3, 20, (10, 12)), batch_size=4)
    first = LMLossEvaluator(torch.randint(3, 20, (10, 12)), batch_size=4)
    first._batches = [{k: v[:1] for k, v in ev.batches()[0].items()}]
    assert ev.evaluate(model, None, limit=1.0) == ev.evaluate(model, None)
    assert ev.evaluate(model, None, limit=1) == first.evaluate(model, None) == ev.evaluate(model, None, limit=0.1)
    assert ev.evaluate(model, None, limit=1) != ev.evaluate(model, None)
    with pytest.raises(ValueError, match="whole count"):
        ev.evaluate(model, None, limit=1.5)


# --------------------------------------------------------------------------- run sources
def test_align_run_sources_rewrites_and_reuses(tmp_path: Path) -> None:
    cfg = llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2)
    base, ft0 = write_family(tmp_path / "fam", 1, seed=0, cfg=cfg)
    other = tmp_path / "other"  # a permuted copy of ft0 stands in for an unrelated model
    other.mkdir()
    spec = LlamaSpec.from_config(cfg)
    state = load_file(str(ft0 / "model.safetensors"))
    save_file(apply_permutations(state, spec, random_permutations(spec, torch.Generator().manual_seed(4))), str(other / "model.safetensors"))
    (other / "config.json").write_text((ft0 / "config.json").read_text())
    sources = {"base_model": str(base), "models": [str(base), str(other)], "align": {"method": "weight"}}
    out = align_run_sources(sources, tmp_path / "run" / "aligned")
    folder = Path(out["models"][1])
    assert out["models"][0] == str(base) and out["base_model"] == str(base)
    assert folder.parent == (tmp_path / "run" / "aligned").absolute()
    assert out["align"]["originals"] == {str(folder): str(other)}
    got = load_file(str(folder / "model.safetensors"))
    assert all(got[n].equal(state[n]) for n in state)  # the permutation was undone
    stamp = (folder / ALIGNMENT_FILE).stat().st_mtime_ns
    again = align_run_sources(sources, tmp_path / "run" / "aligned")
    assert again == out and (folder / ALIGNMENT_FILE).stat().st_mtime_ns == stamp  # reused
    assert align_run_sources(out, tmp_path / "elsewhere") is out  # a frozen config is left alone
    with pytest.raises(ConfigError, match="sources.align.data: method mudsc needs data"):
        align_run_sources(dict(sources, align={"method": "mudsc"}), tmp_path / "x")
    with pytest.raises(ConfigError, match="sources.align.data: unknown evaluators preset 'nope'"):
        align_run_sources(dict(sources, align={"method": "mudsc", "data": "nope"}), tmp_path / "x")
    with pytest.raises(ConfigError, match="sources.align.to: expected base or first"):
        align_run_sources(dict(sources, align={"method": "weight", "to": "last"}), tmp_path / "x")
    assert json.loads((folder / ALIGNMENT_FILE).read_text())["request"]["model"] == str(other)
    assert not math.isnan(json.loads((folder / ALIGNMENT_FILE).read_text())["alpha"])


@pytest.mark.parametrize("decoding", ["greedy", "teacher_forced"])
def test_ensemble_of_copies_scores_like_the_model_with_a_dataset_evaluator(tmp_path: Path, decoding: str) -> None:
    """The wrapper speaks the evaluators' language: forward, and generate with left padding."""
    from transformers import AutoTokenizer

    from evomerge.align.data import texts_from
    from evomerge.evaluate import build_evaluator

    (folder,) = write_family(tmp_path / "fam", 0, seed=2, cfg=llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2))
    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    rng = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    while len(rows) < 12:  # prompts of 2 to 7 characters: batches need left padding
        i = len(rows)
        prompt = "".join("0123456789+="[int(j)] for j in torch.randint(0, 12, (2 + i % 6,), generator=rng))
        with torch.no_grad():
            nxt = int(model(**tok(prompt, return_tensors="pt")).logits[0, -1].argmax())
        if nxt < 5:
            continue  # a special token or a space: no visible answer to compare
        rows.append({"prompt": prompt, "answer": tok.decode(nxt) if i % 2 == 0 else ("A" if tok.decode(nxt) != "A" else "B")})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev = build_evaluator(
        {"kind": "dataset", "data_files": {"validation": str(tmp_path / "d.jsonl")}, "mode": "generate", "prompt": "{prompt}",
         "target": "{answer}", "stop": None, "max_new_tokens": 1, "decoding": decoding, "batch_size": 16},
        split="validation",
    )
    assert ev.evaluate(model, tok) == {"exact_match": 0.5}  # the model's own next character on every other row
    assert EnsembleEvaluator(ev).evaluate([model, model], tok) == {"exact_match": 0.5}
    assert texts_from(ev)[0] == rows[0]["prompt"] + rows[0]["answer"]


def test_residual_similarity_weighs_every_site_alike() -> None:
    """The residual stream is seen after the embedding and after every layer; late
    layers carry larger values. The similarity averages the sites' correlations, so a
    site's scale does not decide the matching (pooling raw values would)."""
    from evomerge.align.activations import activation_moments
    from evomerge.align.similarity import MeanOfSites, Moments

    g = torch.Generator().manual_seed(0)
    a0, a1 = torch.randn(4, 200, generator=g), torch.randn(4, 200, generator=g)
    b0 = a0[[1, 0, 3, 2]] + 0.3 * torch.randn(4, 200, generator=g)  # site 0: a clear match
    b1 = torch.randn(4, 200, generator=g)  # site 1: unrelated
    sites = [Moments.of(a0, b0), Moments.of(a1, b1)]
    mean = MeanOfSites(sites).corr()
    assert torch.allclose(mean, (sites[0].corr() + sites[1].corr()) / 2)
    assert mean.argmax(1).tolist() == [1, 0, 3, 2]
    loud = MeanOfSites([sites[0], Moments.of(1000 * a1, 1000 * b1)]).corr()
    assert torch.allclose(loud, mean, atol=1e-9)
    pooled = Moments.of(torch.cat([a0, 1000 * a1], 1), torch.cat([b0, 1000 * b1], 1)).corr()
    assert pooled.argmax(1).tolist() != [1, 0, 3, 2]  # the loud, unrelated site wins
    # activation_moments reports the residual stream this way, one site per hidden state
    model = LlamaForCausalLM(LlamaConfig(**llama_config(layers=2))).eval()
    stats = activation_moments(model, model, [{"input_ids": torch.randint(0, 48, (2, 6), generator=g)}])
    assert isinstance(stats["residual"], MeanOfSites) and len(stats["residual"].sites) == 3
    assert not any(k.startswith("residual.") for k in stats)


def test_weight_matching_of_a_wide_mlp_starts_from_the_anchors() -> None:
    """MLP 64x the width: before the MLP is matched its scrambled slices outweigh the
    rest of a residual channel's weights; a first residual estimate from all of them
    leads the descent to a wrong fixed point (it did), one from the embeddings, head
    and norms does not."""
    from evomerge.align.matching import match_permutations
    from evomerge.align.weights import residual_moments

    spec = LlamaSpec.from_config(llama_config(hidden=32, layers=1, intermediate=2048, heads=4, kv_heads=2))
    g = torch.Generator().manual_seed(0)
    a = {n: 0.02 * torch.randn(s, generator=g) for n, s in spec.tensor_shapes().items()}
    copy = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in a.items()}  # B = A + noise, permuted
    b = apply_permutations(copy, spec, random_permutations(spec, g))
    res = match_permutations(spec, a, b, alpha=1.0)
    undone = apply_permutations(b, spec, res.permutations)
    assert res.converged and all(undone[k].equal(copy[k]) for k in copy)
    full = residual_moments(spec, a, b, res.permutations)
    anchors = residual_moments(spec, a, b, res.permutations, anchors_only=True)
    assert anchors.n == spec.vocab_size * 2 + 3 < full.n  # embedding and head columns, three norms

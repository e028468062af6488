"""Evaluators on live zoo models: same numbers from lm-eval and dataset, fixed subsets,
fresh scores after in-place weight changes, other modes, speed."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.cli import main
from evomerge.evaluate import build_evaluator, load_model, subset_indices

REPO = Path(__file__).resolve().parents[1]
TASKS = str(REPO / "evaluators" / "zoo_tasks")


@pytest.fixture(scope="module")
def add_model(zoo):
    return load_model(zoo.models["add"])


def lm_eval_evaluator(skill: str, split: str = "test", **kw):
    return build_evaluator({"kind": "lm_eval", "tasks": [f"zoo_{skill}"], "include_path": [TASKS], "split": split, "batch_size": 512, **kw})


@pytest.mark.parametrize("skill", ["add", "reverse"])
def test_lm_eval_and_dataset_report_the_same_accuracy(zoo, skill):
    model, tok = load_model(zoo.models[skill])
    lm = lm_eval_evaluator(skill)
    ds = build_evaluator(f"zoo_{skill}", split="test")
    a, b = lm.evaluate(model, tok)[f"zoo_{skill}/acc"], ds.evaluate(model, tok)["accuracy"]
    assert a == b == pytest.approx(zoo.table[skill][skill], abs=1e-9)
    assert a > 0.8
    # the same fixed subset on both sides
    a, b = lm.evaluate(model, tok, limit=0.2)[f"zoo_{skill}/acc"], ds.evaluate(model, tok, limit=0.2)["accuracy"]
    assert a == b and (a * 100) == pytest.approx(round(a * 100))  # 100 examples


def test_lm_eval_generation_task_agrees_with_the_dataset_evaluator(tmp_path, add_model):
    """Greedy generation through lm-eval's HFLM (left padding, stop at newline) gives the
    dataset evaluator's one-pass exact match, on the same fixed subset."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "gen.yaml").write_text(
        "task: zoo_add_gen\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {REPO / 'evaluators/zoo_tasks/add/test.jsonl'}}}}}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs: {until: [\"\\n\"], max_gen_toks: 8, do_sample: false}\n"
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n"
    )
    model, tok = add_model
    lm = build_evaluator({"kind": "lm_eval", "tasks": ["zoo_add_gen"], "include_path": [str(folder)], "batch_size": 64})
    assert lm.metrics == {"zoo_add_gen/exact_match": "maximize"}
    ds = build_evaluator("zoo_add", split="test")
    assert lm.evaluate(model, tok, limit=100)["zoo_add_gen/exact_match"] == ds.evaluate(model, tok, limit=100)["accuracy"]


def test_teacher_forced_exact_match_equals_greedy_decoding(add_model):
    model, tok = add_model
    fast = build_evaluator("zoo_add", split="test")
    slow = build_evaluator("zoo_add", split="test", decoding="greedy", metrics=["exact_match", "contains", "regex_match"], regex=r"^(\d+)")
    f = fast.evaluate(model, tok, limit=200)["accuracy"]
    s = slow.evaluate(model, tok, limit=200)
    assert f == s["exact_match"] and s["contains"] >= s["exact_match"] and s["regex_match"] == s["exact_match"]


def test_limit_keeps_a_fixed_nested_subset():
    assert subset_indices(500, None, 0) is None and subset_indices(500, 1.0, 0) is None
    a = subset_indices(500, 50, seed=3)
    assert a == subset_indices(500, 50, seed=3) and a == sorted(a) and len(a) == 50
    assert a != subset_indices(500, 50, seed=4)
    assert set(a) <= set(subset_indices(500, 100, seed=3))  # screening subsets are nested
    assert len(subset_indices(500, 0.1, seed=3)) == 50 and len(subset_indices(7, 0.5, seed=0)) == 4
    assert subset_indices(10, 30, seed=0) is None
    with pytest.raises(Exception, match="fraction"):
        subset_indices(10, 1.5, seed=0)


def test_fidelity_subset_score_matches_a_manual_count(zoo, add_model):
    from evomerge._zoo_model import exact_match

    model, tok = add_model
    ev = build_evaluator("zoo_add", split="validation")
    rows = zoo.examples("add", "validation")
    keep = subset_indices(len(rows), 64, ev.config.seed)
    expected = exact_match(model, [(rows[i]["prompt"], rows[i]["answer"]) for i in keep])
    assert ev.evaluate(model, tok, limit=64)["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert build_evaluator("zoo_add", split="validation", limit=64).evaluate(model, tok)["accuracy"] == pytest.approx(expected)


def test_scores_follow_in_place_weight_changes(zoo):
    """Two different recipes merged into one live model: each evaluation sees the weights
    of the latest merge (no stale cache in either evaluator)."""
    pytest.importorskip("evomerge.merge.engine")
    from evomerge.merge.engine import MergeEngine
    from evomerge.merge.recipe import Recipe

    def recipe(weights: dict[str, float]) -> Recipe:
        models = "\n".join(f"  - model: {zoo.models[s]}\n    parameters: {{weight: {w}}}" for s, w in weights.items())
        return Recipe.from_yaml(f"merge_method: task_arithmetic\nbase_model: {zoo.base}\nmodels:\n{models}\ndtype: float32\n")

    only_add, only_sort = recipe({"add": 1.0, "sort": 0.0}), recipe({"add": 0.0, "sort": 1.0})
    engine = MergeEngine.from_recipe(only_add)
    model, tok = load_model(zoo.base)
    lm = build_evaluator({"kind": "lm_eval", "tasks": ["zoo_add", "zoo_sort"], "include_path": [TASKS], "split": "test", "batch_size": 512})
    ds = {s: build_evaluator(f"zoo_{s}", split="test") for s in ("add", "sort")}

    def scores() -> dict[str, float]:
        out = {f"ds/{s}": ev.evaluate(model, tok)["accuracy"] for s, ev in ds.items()}
        out.update(lm.evaluate(model, tok))
        return out

    engine.merge_into(model, only_add)
    first = scores()
    engine.merge_into(model, only_sort)
    second = scores()
    engine.merge_into(model, only_add)
    third = scores()
    table = zoo.table
    assert first["ds/add"] == first["zoo_add/acc"] == pytest.approx(table["add"]["add"], abs=1e-9)
    assert first["ds/sort"] == first["zoo_sort/acc"] == pytest.approx(table["add"]["sort"], abs=1e-9)
    assert second["ds/sort"] == second["zoo_sort/acc"] == pytest.approx(table["sort"]["sort"], abs=1e-9)
    assert second["ds/add"] == second["zoo_add/acc"] == pytest.approx(table["sort"]["add"], abs=1e-9)
    assert third == first and first != second


def test_multiple_choice_and_perplexity_modes(zoo, tmp_path, add_model):
    rows = zoo.examples("add", "test")[:60]
    data = tmp_path / "mc.jsonl"
    with data.open("w") as fh:
        for i, r in enumerate(rows):
            wrong = str(int(r["answer"]) + 3)
            options = [r["answer"] + "\n", wrong + "\n"] if i % 2 else [wrong + "\n", r["answer"] + "\n"]
            fh.write(json.dumps({"q": r["prompt"], "options": options, "label": 0 if i % 2 else 1, "a": r["answer"]}) + "\n")
    model, tok = add_model
    mc = build_evaluator({"kind": "dataset", "data_files": {"test": str(data)}, "split": "test", "mode": "multiple_choice", "prompt": "{q}", "choices": "options", "label": "{label}"})
    assert mc.metrics == {"acc": "maximize", "acc_norm": "maximize"}
    got = mc.evaluate(model, tok)
    assert got["acc"] > 0.9 and 0.0 <= got["acc_norm"] <= 1.0
    # the same log-likelihoods by hand, one example at a time
    hits = 0
    for i, r in enumerate(json.loads(line) for line in data.read_text().splitlines()):
        lls = []
        for opt in r["options"]:
            ids = tok(r["q"] + opt, return_tensors="pt")["input_ids"]
            n = len(tok(r["q"])["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            lls.append(float(logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum()))
        hits += int(np.argmax(lls) == r["label"])
    assert got["acc"] == pytest.approx(hits / len(rows))
    ppl = {"kind": "dataset", "data_files": {"test": str(data)}, "split": "test", "mode": "perplexity", "prompt": "{q}", "target": "{a}"}
    ev = build_evaluator(ppl)
    assert ev.metrics == {"perplexity": "minimize"}
    sort_model, sort_tok = load_model(zoo.models["sort"])
    own, other = ev.evaluate(model, tok)["perplexity"], ev.evaluate(sort_model, sort_tok)["perplexity"]
    assert 1.0 <= own < other and math.isfinite(other)
    whole = build_evaluator({**ppl, "target": None})  # the prompt text itself
    assert whole.evaluate(model, tok)["perplexity"] > 1.0


def test_python_evaluator_from_a_file(tmp_path, add_model):
    (tmp_path / "scores.py").write_text(
        "def score(model, tokenizer, *, scale=1.0, limit=None, split=None):\n"
        "    n = sum(p.numel() for p in model.parameters())\n"
        "    return {'size': n * scale, 'limit': -1 if limit is None else limit, 'on_test': float(split == 'test')}\n"
    )
    (tmp_path / "mine.yaml").write_text(
        "kind: python\nfunction: scores.py:score\nmetrics: {size: minimize, limit: maximize, on_test: maximize}\noptions: {scale: 2.0}\n"
    )
    model, tok = add_model
    ev = build_evaluator(tmp_path / "mine.yaml", split="test")
    assert ev.name == "mine" and ev.metrics["size"] == "minimize"
    out = ev.evaluate(model, tok, limit=5)
    assert out == {"size": 2.0 * sum(p.numel() for p in model.parameters()), "limit": 5.0, "on_test": 1.0}


def test_cli_evaluate_prints_metrics(zoo, capsys):
    code = main(["evaluate", str(zoo.models["count"]), "--evaluator", "zoo_count", "--evaluator", "zoo_add", "--split", "test", "--json"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == {"zoo_count/accuracy": pytest.approx(zoo.table["count"]["count"]), "zoo_add/accuracy": pytest.approx(zoo.table["count"]["add"])}
    assert main(["evaluate", str(zoo.models["count"]), "-e", "zoo_count", "--limit", "50"]) == 0
    out = capsys.readouterr().out
    assert "zoo_count/accuracy" in out and "metric" in out
    # "1" is one example (as in lm-eval), "1.0" all of them; 2.5 is neither
    assert main(["evaluate", str(zoo.models["count"]), "-e", "zoo_count", "--limit", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["zoo_count/accuracy"] in (0.0, 1.0)
    assert main(["evaluate", str(zoo.models["count"]), "-e", "zoo_count", "--limit", "2.5"]) == 2
    assert capsys.readouterr().err.strip() == "evomerge evaluate: error: --limit 2.5: expected a whole count of at least 1 or a fraction in (0, 1]"


def _break_config(folder: Path) -> None:
    (folder / "config.json").write_text("{")


def _drop_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


def _cut_tokenizer(folder: Path) -> None:
    f = folder / "tokenizer.json"
    f.write_text(f.read_text()[:100])


def _truncate_weights(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])


@pytest.mark.parametrize(
    "damage, words",
    [
        (_break_config, "config.json: malformed JSON"),
        (_drop_weights, ": no model.safetensors, model.safetensors.index.json or checkpoint found"),
        (_truncate_weights, "model.safetensors: not a readable safetensors file"),
        (_cut_tokenizer, "tokenizer.json: malformed JSON"),
    ],
)
def test_cli_evaluate_a_broken_model_folder_is_one_line(zoo, tmp_path, capsys, damage, words):
    """A half-downloaded or hand-edited folder: named in one line, not a transformers traceback."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(zoo.models["count"], folder)
    damage(folder)
    assert main(["evaluate", str(folder), "-e", "zoo_count", "--limit", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"evomerge evaluate: error: {folder}") and words in err and "\n" not in err, err


@pytest.fixture
def one_thread():
    """Timing tests run on one thread: two OpenMP threads stall whenever another
    process takes a core, which on a shared machine says nothing about the code."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_lm_eval_later_calls_take_under_a_third_of_the_first(add_model, one_thread):
    model, tok = add_model
    ev = lm_eval_evaluator("add", split="validation")
    t0 = time.perf_counter()
    first = ev.evaluate(model, tok)
    first_s = time.perf_counter() - t0
    later = []
    for _ in range(3):
        t0 = time.perf_counter()
        assert ev.evaluate(model, tok) == first
        later.append(time.perf_counter() - t0)
    assert min(later) < first_s / 3, (first_s, later)


def test_dataset_scores_500_examples_in_under_a_second(add_model, one_thread):
    model, tok = add_model
    ev = build_evaluator("zoo_add", split="validation")
    assert ev.size == 500
    ev.evaluate(model, tok)  # tokenizes once
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        ev.evaluate(model, tok)
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0, times

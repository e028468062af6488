"""The offline zoo: a family where merging is a real problem, built deterministically."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from evomerge._zoo_data import SKILLS, SPLITS
from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.zoo import AVERAGE, BASE, BASE_ALT, ZooRecipe, format_table, load_zoo
from evomerge.zoo import zoo as build_zoo

REPO = Path(__file__).resolve().parents[1]


def test_each_specialist_beats_the_uniform_average_by_0_3_on_its_skill(zoo):
    table = zoo.table
    assert set(table) == {BASE, BASE_ALT, *zoo.skills, AVERAGE}
    assert len(zoo.skills) >= 3
    for skill in zoo.skills:
        own = table[skill][skill]
        assert own >= 0.6, (skill, own)
        assert own - table[AVERAGE][skill] >= 0.3, (skill, own, table[AVERAGE][skill])
        # clearly best at its own skill, poor at the others
        assert all(own > table[other][skill] + 0.5 for other in zoo.skills if other != skill)
        assert all(table[skill][other] < 0.3 for other in zoo.skills if other != skill)
        assert table[BASE][skill] < 0.3


def test_table_is_what_the_dataset_evaluator_measures(zoo):
    """The manifest's numbers are re-measured independently: test split, live model."""
    from safetensors.torch import load_file

    from evomerge.evaluate import build_evaluator, load_model

    model, tok = load_model(zoo.models["sort"])
    ev = build_evaluator("zoo_sort", split="test")
    assert ev.evaluate(model, tok)["accuracy"] == pytest.approx(zoo.table["sort"]["sort"], abs=1e-9)
    states = [load_file(str(zoo.models[s] / "model.safetensors")) for s in zoo.skills]
    model.load_state_dict({k: sum(sd[k] for sd in states) / len(states) for k in states[0]})
    assert ev.evaluate(model, tok)["accuracy"] == pytest.approx(zoo.table[AVERAGE]["sort"], abs=1e-9)


def test_layout_loads_with_transformers_and_splits_are_disjoint(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    z = load_zoo(zoo_dir)
    assert z.manifest["alignment_pair"] == [BASE, BASE_ALT]
    for name, path in z.models.items():
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file(), name
    model = AutoModelForCausalLM.from_pretrained(z.models["add"])
    tok = AutoTokenizer.from_pretrained(z.models["add"])
    assert type(model).__name__ == "LlamaForCausalLM" and tok.is_fast
    ids = tok("ADD 12+3=")["input_ids"]
    assert len(ids) == len("ADD 12+3=") and tok.decode(ids) == "ADD 12+3="
    # greedy generation with transformers stops at the newline, and is right exactly
    # where the teacher-forced check says so
    from evomerge._zoo_model import exact_match

    rows = z.examples("add", "test")[:24]
    right = []
    for r in rows:
        p = tok(r["prompt"], return_tensors="pt")["input_ids"]
        out = model.generate(p, max_new_tokens=6, do_sample=False)
        right.append(tok.decode(out[0, p.shape[1]:], skip_special_tokens=True) == r["answer"] + "\n")
    assert sum(right) / len(rows) == exact_match(model, [(r["prompt"], r["answer"]) for r in rows]) > 0.5
    # the two bases share data and recipe, not their initialization
    from safetensors.torch import load_file

    wa = load_file(str(z.models[BASE] / "model.safetensors"))
    wb = load_file(str(z.models[BASE_ALT] / "model.safetensors"))
    assert wa.keys() == wb.keys() and not torch.equal(wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])
    for skill in z.skills:
        seen: set[str] = set()
        for split in SPLITS:
            rows = z.examples(skill, split)
            inputs = {r["input"] for r in rows}
            assert len(inputs) == len(rows) and not inputs & seen
            seen |= inputs
            assert all(r["prompt"] == SKILLS[skill].prompt(r["input"]) for r in rows)


def test_shipped_task_data_is_the_zoo_data(zoo):
    for skill in zoo.skills:
        for split in ("validation", "test"):
            shipped = REPO / "evaluators" / "zoo_tasks" / skill / f"{split}.jsonl"
            assert shipped.read_bytes() == zoo.data_file(skill, split).read_bytes(), shipped
    assert len(zoo.examples("add", "validation")) == 500


def test_second_call_reuses_the_zoo_and_the_cli_prints_the_table(zoo_dir, capsys):
    t0 = time.perf_counter()
    again = build_zoo(zoo_dir, progress=False)
    assert again.reused and time.perf_counter() - t0 < 2.0
    assert main(["zoo", str(zoo_dir)]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and AVERAGE in out
    for line in format_table(again.table).splitlines()[2:]:
        assert line in out
    assert main(["zoo", str(zoo_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reused"] and data["table"]["add"]["add"] == again.table["add"]["add"]


TINY = ZooRecipe(
    hidden=16, layers=1, heads=2, intermediate=32, base_steps=6, finetune_steps=4, warmup=2,
    train_size=64, validation_size=8, test_size=8, base_batch=8, finetune_batch=8,
)  # fmt: skip


def _weights(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_build_is_deterministic_and_independent_of_worker_count(tmp_path):
    one = build_zoo(tmp_path / "one", recipe=TINY, progress=False, workers=1)
    two = build_zoo(tmp_path / "two", recipe=TINY, progress=False, workers=2)
    assert _weights(one.root) == _weights(two.root) and len(_weights(one.root)) == 2 + len(TINY.skills)
    assert one.table == two.table
    for skill in TINY.skills:
        assert one.data_file(skill, "train").read_bytes() == two.data_file(skill, "train").read_bytes()
    # nothing half-written is left next to the folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_changed_recipe_rebuilds_and_a_foreign_folder_is_refused(tmp_path):
    first = build_zoo(tmp_path / "z", recipe=TINY, progress=False, workers=1)
    changed = replace(TINY, finetune_lr=1e-3)
    assert changed.fingerprint() != TINY.fingerprint()
    second = build_zoo(tmp_path / "z", recipe=changed, progress=False, workers=1)
    assert not second.reused and second.fingerprint == changed.fingerprint()
    assert _weights(first.root).keys() == _weights(second.root).keys()
    assert build_zoo(tmp_path / "z", recipe=changed, progress=False).reused
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        build_zoo(foreign, recipe=TINY, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        build_zoo(foreign / "notes.txt", recipe=TINY, progress=False)


def test_recipe_changes_survive_json_and_stale_ones_are_dropped():
    recipe = replace(TINY, skills=("add", "sort"), mix=(("add", 1.0), ("sort", 2.0)))
    stored = json.loads(json.dumps(recipe.changes()))
    assert ZooRecipe.from_changes(stored) == recipe and ZooRecipe.from_changes({}) == ZooRecipe()
    assert ZooRecipe.from_changes({"width": 3}) is None  # a field a later version dropped
    assert ZooRecipe.from_changes({"hidden": "wide"}) is None


def test_cli_set_changes_the_recipe_and_bad_values_are_one_line(tmp_path, capsys):
    sets = [f"{k}={getattr(TINY, k)}" for k in ("hidden", "layers", "heads", "intermediate", "base_steps", "finetune_steps", "warmup",
                                                  "train_size", "validation_size", "test_size", "base_batch", "finetune_batch")]
    argv = ["zoo", str(tmp_path / "z"), "--workers", "1", "--json"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert not first["reused"]
    config = json.loads((tmp_path / "z" / BASE_ALT / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (16, 1, 32)
    assert load_zoo(tmp_path / "z").fingerprint == TINY.fingerprint()
    assert main(argv) == 0 and json.loads(capsys.readouterr().out)["reused"]
    # the folder remembers its recipe: a later call without --set reuses it, CLI and API
    assert main(["zoo", str(tmp_path / "z")]) == 0
    out = capsys.readouterr().out
    assert "reused; recipe: hidden=16, layers=1, heads=2, intermediate=32" in out
    assert first["changes"] == TINY.changes() and TINY.changes()["hidden"] == 16
    assert build_zoo(tmp_path / "z", progress=False).reused
    assert main(["zoo", str(tmp_path / "z"), "--set", "hidden=16", "--default"]) == 2
    assert "--set and --default exclude each other" in capsys.readouterr().err
    for bad, words in [("hidden=30", "hidden 30 must be heads 4"), ("width=3", "FIELD one of hidden"),
                       ("layers=two", "layers takes an integer"), ("base_lr=0", "base_lr must be positive")]:
        assert main(["zoo", str(tmp_path / "bad"), "--set", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()

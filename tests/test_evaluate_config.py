"""Evaluator files fail before any model is loaded, with one line naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import evomerge.evaluate
from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.evaluate import build_evaluator

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "evaluators" / "zoo_tasks"


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(evomerge.evaluate, "load_model", refuse)


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(20)))
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(capsys, evaluator: Path) -> tuple[int, str]:
    model_dir = evaluator.parent / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text("{}")
    code = main(["evaluate", str(model_dir), "--evaluator", str(evaluator)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return code, err


def test_unknown_lm_eval_task(tmp_path, capsys, no_model):
    ev = write(tmp_path, "tasks.yaml", f"kind: lm_eval\ntasks: [zoo_add, zoo_addd]\ninclude_path: [{TASKS}]\ninclude_defaults: false\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "tasks.yaml" in err and "unknown lm-eval task 'zoo_addd'" in err and "zoo_add" in err


def test_unknown_builtin_task_searches_lm_evals_own_index(tmp_path):
    with pytest.raises(ConfigError, match="unknown lm-eval task 'hellaswagg'"):
        build_evaluator({"kind": "lm_eval", "tasks": ["hellaswagg"]})


def test_missing_data_file(tmp_path, capsys, no_model, data):
    ev = write(tmp_path, "ds.yaml", "kind: dataset\ndata_files: {test: nowhere/qa.jsonl}\nsplit: test\nmode: generate\nprompt: '{question}'\ntarget: '{answer}'\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "ds.yaml" in err and "data file not found" in err and "nowhere/qa.jsonl" in err
    # an lm-eval task folder whose task points at a missing file
    folder = tmp_path / "tasks"
    folder.mkdir()
    write(folder, "t.yaml", "task: my_qa\ndataset_path: json\ndataset_kwargs: {data_files: {test: gone.jsonl}}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n")
    ev = write(tmp_path, "lm.yaml", f"kind: lm_eval\ntasks: [my_qa]\ninclude_path: [{folder}]\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "task my_qa" in err and "data file not found" in err and "gone.jsonl" in err


def test_template_field_absent_from_the_data(tmp_path, capsys, no_model, data):
    ev = write(tmp_path, "ds.yaml", f"kind: dataset\ndata_files: {{test: {data}}}\nsplit: test\nmode: generate\nprompt: 'Q: {{question}} {{context}}'\ntarget: '{{answer}}'\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "prompt: field 'context' is not in the data" in err and "question" in err
    folder = tmp_path / "tasks"
    folder.mkdir()
    write(folder, "t.yaml", f"task: my_qa\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\noutput_type: loglikelihood\ndoc_to_text: '{{{{question}}}}'\ndoc_to_target: '{{{{solution}}}}'\n")
    ev = write(tmp_path, "lm.yaml", f"kind: lm_eval\ntasks: [my_qa]\ninclude_path: [{folder}]\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "task my_qa" in err and "doc_to_target: field 'solution' is not in the data" in err


def test_metric_that_no_evaluator_produces(tmp_path, capsys, no_model, data):
    ev = write(tmp_path, "ds.yaml", f"kind: dataset\ndata_files: {{test: {data}}}\nsplit: test\nmode: generate\nprompt: '{{question}}'\ntarget: '{{answer}}'\nmetrics: [exact_match, bleu]\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "metrics" in err and "'bleu'" in err and "exact_match" in err
    ev = write(tmp_path, "lm.yaml", f"kind: lm_eval\ntasks: [zoo_add]\ninclude_path: [{TASKS}]\nmetrics: [zoo_add/f1]\n")
    code, err = run_cli(capsys, ev)
    assert code == 2 and "'zoo_add/f1'" in err and "zoo_add/acc" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("kind: nope\n", "kind: expected one of dataset, lm_eval, python"),
        ("kind: dataset\nmode: generate\nprompt: '{q}'\n", "target: generate mode needs a target"),
        ("kind: dataset\nmode: generate\ntarget: x\ndata_files: {test: DATA}\nsplit: validation\n", "split: no data file for split 'validation'"),
        ("kind: dataset\nmode: generate\ntarget: x\ndata_files: {test: DATA}\nsplit: test\nlimit: 1.5\n", "limit: limit 1.5: expected a whole count of at least 1 or a fraction in (0, 1]"),
        ("kind: dataset\nmode: generate\ntarget: '{}'\ndata_files: {test: DATA}\nsplit: test\n", "target: template"),
        ("kind: dataset\nmode: multiple_choice\ndata_files: {test: DATA}\nsplit: test\nchoices: options\nlabel: '{answer}'\n", "choices: field 'options' is not in the data"),
        ("kind: dataset\nmode: generate\ntarget: x\ndata_files: {test: DATA}\nsplit: test\nbatchsize: 3\n", "batchsize: unknown field"),
        ("kind: dataset\nmode: generate\ntarget: x\ndata_files: {test: DATA}\nsplit: test\ndecoding: teacher_forced\nmetrics: [exact_match, contains]\n",
         "decoding: teacher_forced scores exact_match only, not contains"),
        ("kind: python\nfunction: evomerge.nowhere:score\nmetrics: {s: maximize}\n", "cannot import module 'evomerge.nowhere'"),
        ("kind: python\nfunction: json:nothing_here\nmetrics: {s: maximize}\n", "'json' has no function 'nothing_here'"),
        ("kind: python\nfunction: json:dumps\n", "metrics: declare the metrics"),
        ("kind: lm_eval\ntasks: [zoo_add]\ninclude_path: [no_such_folder]\n", "include_path: folder not found"),
        ("kind: dataset\n  bad: [\n", "malformed YAML"),
    ],
)
def test_other_mistakes_are_one_line_errors(tmp_path, data, text, message):
    path = write(tmp_path, "bad.yaml", text.replace("DATA", str(data)))
    with pytest.raises(ConfigError) as info:
        build_evaluator(path)
    assert message in str(info.value) and "bad.yaml" in str(info.value) and "\n" not in str(info.value)


def test_presets_resolve_by_name_and_unknown_ones_are_listed():
    ev = build_evaluator("zoo_count", split="test")
    assert ev.name == "zoo_count" and ev.metrics == {"accuracy": "maximize"} and ev.size == 500
    lm = build_evaluator("zoo_lm_eval")
    assert lm.metrics == {f"zoo_{s}/acc": "maximize" for s in ("add", "reverse", "sort", "count")}
    with pytest.raises(ConfigError, match="unknown evaluators preset 'zoo_nope'.*zoo_add"):
        build_evaluator("zoo_nope")

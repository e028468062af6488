"""`evomerge demo` (what `make demo` runs): zoo, a Ray search, the baselines table, the run folder.

The session's `demo_run` fixture runs the demo with its defaults (100 trials, 2 Ray
workers): what `make demo` prints, checked here.
"""

from __future__ import annotations

import json
import shutil

import optuna
import pytest
from transformers import AutoModelForCausalLM

from evomerge.cli import main

pytestmark = pytest.mark.timeout(300)

BASELINES = ["uniform average", "task arithmetic", "TIES (mergekit defaults)", "TIES", "DARE-TIES"]


def trials(run):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(run / "study.journal")))
    return optuna.load_study(study_name="demo", storage=storage).get_trials()


def test_demo_table_beats_the_baselines_on_held_out_data(demo_run):
    runs, out = demo_run
    run = runs / "demo"
    result = json.loads((run / "quality.json").read_text())
    names = [r["name"] for r in result["rows"]]
    assert names[:4] == ["specialist reverse", "specialist count", "base", "uniform average"]
    assert [n for n in names if n in BASELINES] == BASELINES
    assert names[-3:] == ["searched: best mean", "searched: best reverse", "searched: best count"]
    rows = {r["name"]: r for r in result["rows"]}
    # the zoo's specialists as built: each is near-perfect on its own skill and useless on the other
    assert rows["specialist reverse"]["test"]["reverse"] > 0.9 and rows["specialist count"]["test"]["count"] > 0.9
    assert rows["base"]["mean"] == 0.0
    assert rows["task arithmetic"]["detail"].startswith("best lambda ") and len(rows["task arithmetic"]["grid"]) == 10
    best = rows["searched: best mean"]
    for name in BASELINES:  # the margins printed are the test means' differences
        assert result["margins"][name] == pytest.approx(best["mean"] - rows[name]["mean"], abs=1e-4)
        assert f"{name} {result['margins'][name]:+.3f}" in out
    # acceptance: the best searched member beats the uniform average, TIES, DARE-TIES and the grid's best
    assert result["beats_baselines"], result["margins"]
    assert "the best searched mean beats the baselines" in out
    # choices are made on validation: the best-mean member is the best on validation among the front
    front = json.loads((run / "pareto.json").read_text())["members"]
    assert best["validation_mean"] == pytest.approx(max(sum(m["values"].values()) / 2 for m in front), abs=1e-4)
    assert result["n_complete"] == 100


def test_demo_run_folder_models_plots_status_hints(demo_run):
    runs, out = demo_run
    run = runs / "demo"
    front = json.loads((run / "pareto.json").read_text())["members"]
    assert {int(p.name) for p in (run / "pareto").iterdir() if not p.name.startswith(".")} == {m["trial"] for m in front}
    for m in front:
        assert type(AutoModelForCausalLM.from_pretrained(m["path"])).__name__ == "LlamaForCausalLM"
    for name in ("pareto_front.png", "hypervolume.png", "coefficients.png", "status.txt", "quality.txt", "config.yaml"):
        assert (run / name).is_file(), name
    assert "trials: 100 complete, 0 pruned, 0 failed, 0 running (budget 100)" in (run / "status.txt").read_text()
    for verb in ("status", "dashboard", "export", "resume"):
        assert f"evomerge {verb} {run}" in out
    workers = {t.user_attrs["worker_id"] for t in trials(run)}
    assert len(workers) == 2 and all(w.startswith("ray-") for w in workers)


def test_demo_continues_its_run(demo_run, zoo_dir, tmp_path, capsys):
    runs, _ = demo_run
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    run = copy / "demo"
    baselines = (run / "baselines.json").stat().st_mtime_ns
    argv = ["demo", "--zoo", str(zoo_dir), "--runs-dir", str(copy), "--trials", "104", "--executor", "serial"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "continuing" in out
    assert (run / "baselines.json").stat().st_mtime_ns == baselines  # computed once per zoo and skills
    assert json.loads((run / "quality.json").read_text())["n_complete"] == 104
    assert {t.user_attrs["worker_id"] for t in trials(run)[100:]} == {"serial-0"}


def test_demo_bad_input_is_one_line(zoo_dir, tmp_path, capsys):
    # an unknown skill is refused before a missing zoo is built for nothing
    assert main(["demo", "--zoo", str(tmp_path / "zoo"), "--runs-dir", str(tmp_path), "--skills", "reverse,fly", "--executor", "serial"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fly' is not a zoo skill (it has add, reverse, sort, count)" in err[0]
    assert not (tmp_path / "zoo").exists()
    # a zoo built with fewer skills is checked once it is there
    from types import SimpleNamespace

    from evomerge.bench.quality import check_skills
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="'count' is not a skill of the zoo in z .it has add, sort."):
        check_skills(SimpleNamespace(skills=["add", "sort"], root="z"), ["add", "count"])
    assert main(["demo", "--zoo", str(zoo_dir), "--runs-dir", str(tmp_path), "--trials", "0"]) == 2
    assert "--trials must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_stops_when_its_search_did(zoo_dir, tmp_path, monkeypatch, capsys):
    """A search stopped by failing trials ends the demo there, exit 1, with the cause (no table of nothing)."""
    from evomerge.run.api import Search

    def stopped_run(self, **kw):
        return {"n_complete": 0, "n_failed": 10, "pareto": [], "stopped": "10 trials failed in this session, none finished",
                "errors": [{"error": "RuntimeError: the GPU fell off (at w.py:3)", "trials": list(range(10))}]}

    monkeypatch.setattr(Search, "run", stopped_run)
    assert main(["demo", "--zoo", str(zoo_dir), "--runs-dir", str(tmp_path), "--executor", "serial", "--trials", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("evomerge demo: error: the search stopped early, 10 trials failed in this session, none finished "
                   "(10 trials failed (0-9): RuntimeError: the GPU fell off (at w.py:3)); evomerge demo again resumes it")
    assert not (tmp_path / "demo" / "quality.json").exists()

"""Runs survive SIGKILL at any moment, resume to their budget, and can be inspected."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file
from optuna.storages.journal import JournalFileBackend

from evomerge import record
from evomerge._testing import write_family
from evomerge.cli import main
from evomerge.pareto import ParetoArchive
from evomerge.run.api import create
from evomerge.run.handle import Run

HARNESS = Path(__file__).parent / "_crashable.py"
LEASE = 1.0  # seconds of heartbeat timeout in the subprocesses: the tests wait it out after a kill


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=21)


@pytest.fixture(autouse=True)
def distance_evaluator(monkeypatch, family):
    """In this process, evaluators are the weight-distance one (the harness patches its own)."""
    import evomerge.evaluate
    from tests._distance_eval import DistanceEvaluator

    build = lambda preset, split="validation", **o: DistanceEvaluator({"ft0": family[1], "ft1": family[2]})  # noqa: E731
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", build, raising=False)


def write_config(family, path: Path, **changes) -> Path:
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global",
        "evaluators": [{"preset": "distance"}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": 12},
        "seed": 1,
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def harness_env(tmp_path: Path, family) -> dict:
    env = dict(os.environ)
    env.update(
        EVOMERGE_PHASE_FILE=str(tmp_path / "phases.log"),
        EVOMERGE_JOB_LOG=str(tmp_path / "jobs.log"),
        EVOMERGE_TARGETS=os.pathsep.join([str(family[1]), str(family[2])]),
        EVOMERGE_COMPILE="0",
        EVOMERGE_LEASE_TIMEOUT=str(LEASE),  # a killed driver's study is taken over this soon
    )
    for f in ("phases.log", "jobs.log"):
        (tmp_path / f).touch()
    return env


def count_phase(tmp_path: Path, phase: str) -> int:
    return (tmp_path / "phases.log").read_text().split().count(phase)


def test_sigkill_at_random_points_then_resume_to_the_budget(family, tmp_path):
    """Five kills of the journal-backed driver (the default storage); a killed SQLite
    and PostgreSQL driver are resumed in test_one_run.py."""
    rng = random.Random(7)
    cfg = write_config(family, tmp_path / "search.yaml")
    env = harness_env(tmp_path, family)
    run_dir = tmp_path / "runs" / "search"
    cmd = [sys.executable, str(HARNESS), "search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"]
    kills = []
    for phase in ["merge", "evaluate", "pareto_write", "evaluate", "pareto_write"]:
        before = count_phase(tmp_path, phase)
        wait_for = before + rng.randint(1, 2)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while count_phase(tmp_path, phase) < wait_for and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(phase)
            time.sleep(LEASE)  # the killed driver's lease expires
        else:
            assert proc.returncode == 0, proc.stderr.read()
            break
        cmd = [sys.executable, str(HARNESS), "resume", str(run_dir), "--json"]
    assert len(kills) >= 5, kills
    final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    run = Run.open(run_dir)
    study = run.study()
    trials = study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    # no completed trial was ever evaluated twice
    full_jobs = Counter(int(line.split()[0]) for line in (tmp_path / "jobs.log").read_text().splitlines() if line.endswith("full"))
    assert all(full_jobs[t.number] == 1 for t in complete)
    # Pareto folder == the study's front, each member complete; no leftovers
    front = {t.number for t in ParetoArchive(run_dir, run.objectives).front(trials)}
    on_disk = sorted(p.name for p in (run_dir / "pareto").iterdir())
    assert on_disk == sorted(str(n) for n in front)
    for n in front:
        assert (run_dir / "pareto" / str(n) / "model.safetensors").is_file()
    assert {m["trial"] for m in json.loads((run_dir / "pareto.json").read_text())["members"]} == front


def test_resumed_cma_continues_the_same_search(family, tmp_path, monkeypatch):
    common = dict(
        search_space="ties_layerwise",
        optimizer={"name": "cma", "options": {"popsize": 4}},
        scalarization={"kind": "weighted_sum"},
        budget={"trials": 13},
    )
    whole = create(write_config(family, tmp_path / "a.yaml", **common), runs_dir=tmp_path / "runs")
    whole.run(progress=False)
    part = create(write_config(family, tmp_path / "b.yaml", **common), runs_dir=tmp_path / "runs")
    part.run(trials=6, progress=False)  # stops inside generation 1
    assert main(["resume", str(part.run_dir), "--json"]) == 0

    def candidates(run_dir):
        study = Run.open(run_dir).study()
        return {
            (t.user_attrs["cma_generation"], t.user_attrs["cma_index"]): t.params
            for t in study.get_trials()
            if "cma_generation" in t.user_attrs and t.state == optuna.trial.TrialState.COMPLETE
        }

    a, b = candidates(whole.run_dir), candidates(part.run_dir)
    assert set(a) == set(b) and len(a) == 12
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_status_json_matches_the_study_and_export_matches_the_front(family, tmp_path, monkeypatch, capsys):
    run = create(write_config(family, tmp_path / "s.yaml", budget={"trials": 8}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    capsys.readouterr()
    assert main(["status", str(run.run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    study = run.load_study()
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert status["study"] == run.name
    assert status["n_complete"] == states[optuna.trial.TrialState.COMPLETE] == 8
    assert status["n_failed"] == 0 and status["n_pruned"] == 0 and status["n_running"] == 0
    assert status["objectives"] == [{"name": "closeness/ft0", "direction": "maximize"}, {"name": "closeness/ft1", "direction": "maximize"}]
    front = ParetoArchive(run.run_dir, run.objectives).front(trials)
    assert [m["trial"] for m in status["pareto"]] == [t.number for t in front]
    assert [m["values"] for m in status["pareto"]] == [record.objective_values(t, run.objectives) for t in front]
    assert status["hypervolume"] > 0
    for png in ("pareto_front.png", "hypervolume.png"):
        assert (run.run_dir / png).stat().st_size > 1000
    member = status["pareto"][0]
    assert main(["export", str(run.run_dir), "--trial", str(member["trial"]), "--out", str(tmp_path / "exported")]) == 0
    a = load_file(str(tmp_path / "exported" / "model.safetensors"))
    b = load_file(str(Path(member["path"]) / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # --trial best: the front member with the highest mean of the (maximized) objectives
    best = max(status["pareto"], key=lambda m: sum(m["values"]) / len(m["values"]))
    assert main(["export", str(run.run_dir), "--trial", "best", "--out", str(tmp_path / "best")]) == 0
    assert f"wrote trial {best['trial']} " in capsys.readouterr().out
    a = load_file(str(tmp_path / "best" / "model.safetensors"))
    b = load_file(str(Path(best["path"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp, fam: (tmp / "nothing").mkdir() or tmp / "nothing", "is not a run folder"),
        ("edited", "search space no longer matches the study"),
    ],
)
def test_resume_refuses_with_one_line(family, tmp_path, monkeypatch, capsys, make, message):
    if make == "edited":
        run = create(write_config(family, tmp_path / "e.yaml", budget={"trials": 2}), runs_dir=tmp_path / "runs")
        run.run(progress=False)
        cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
        cfg["search_space"] = "ties_layerwise"
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
        target = run.run_dir
    else:
        target = make(tmp_path, family)
    capsys.readouterr()
    assert main(["resume", str(target)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_run_stopped_before_its_first_trial_resumes(family, tmp_path, capsys):
    """Killed after its folder was made, before the study was: search points to resume, so resume must run it."""
    run = create(write_config(family, tmp_path / "n.yaml", budget={"trials": 2}), runs_dir=tmp_path / "runs")
    assert len(run.load_study().trials) == 0  # the study holds the frozen config before any trial
    assert main(["status", str(run.run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_complete"] == 0
    assert main(["search", str(tmp_path / "n.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert f"continue it with: evomerge resume {run.run_dir}" in capsys.readouterr().err
    assert main(["resume", str(run.run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_complete"] == 2


def test_resume_below_the_trials_done_says_that_trials_is_a_total(family, tmp_path, capsys, monkeypatch):
    run = create(write_config(family, tmp_path / "t.yaml", budget={"trials": 3}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    capsys.readouterr()
    assert main(["resume", str(run.run_dir), "--trials", "2"]) == 0
    out, err = capsys.readouterr()
    assert f"{run.run_dir}: 3 trials done, budget 2: nothing to run; --trials is the total, e.g. --trials 53 for 50 more" in err
    assert "\n3 complete" in "\n" + out and f"resume {run.run_dir} --trials 53" in out
    replays = []
    read_logs = JournalFileBackend.read_logs
    monkeypatch.setattr(JournalFileBackend, "read_logs", lambda self, start: replays.append(start) or read_logs(self, start))
    assert main(["resume", str(run.run_dir), "--trials", "4"]) == 0
    out, err = capsys.readouterr()
    assert "nothing to run" not in err and "\n4 complete" in "\n" + out and "--trials 54" in out
    assert replays.count(0) == 1, replays  # the journal is replayed once, then read from where it left off


def test_unreachable_storage_fails_with_one_line(family, tmp_path, monkeypatch, capsys):
    cfg = write_config(family, tmp_path / "u.yaml")
    url = "postgresql://nobody@127.0.0.1:1/none"
    assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_postgresql_storage_runs_and_resumes(family, tmp_path):
    from tests._postgres import postgres_server

    with postgres_server(tmp_path / "pg") as url:
        cfg = write_config(family, tmp_path / "pg.yaml", budget={"trials": 6})
        run = create(cfg, runs_dir=tmp_path / "runs", storage=url)
        run.run(trials=3, progress=False)
        assert main(["resume", str(run.run_dir), "--json"]) == 0  # storage URL remembered in run.json
        study = Run.open(run.run_dir).study()
        assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 6
        assert not (run.run_dir / "study.journal").exists()


def test_dashboard_answers_while_the_search_writes(family, tmp_path):
    import socket
    import urllib.request

    cfg = write_config(family, tmp_path / "d.yaml", budget={"trials": 30})
    env = harness_env(tmp_path, family)
    run_dir = tmp_path / "runs" / "d"
    search = subprocess.Popen([sys.executable, str(HARNESS), "search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run_dir / "study.journal").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dash = subprocess.Popen([sys.executable, str(HARNESS), "dashboard", str(run_dir), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = []
    try:
        while time.monotonic() < deadline + 60 and (len(answers) < 3 or search.poll() is None and len(answers) < 3):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    answers.append((r.status, json.loads(r.read())))
                    if search.poll() is None:
                        answers[-1] += ("during search",)
            except OSError:
                pass
            time.sleep(0.3)
        assert search.wait(timeout=240) == 0, search.stderr.read()
    finally:
        dash.terminate()
        dash.wait(timeout=30)
    assert answers and all(status == 200 for status, *_ in answers)
    assert any(len(a) == 3 for a in answers), "no answer came while the search was writing"
    assert any(st["study_name"] == "d" for st in answers[-1][1]["study_summaries"])
    study = Run.open(run_dir).study()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 30


def test_ctrl_c_cancels_in_flight_trials_and_prints_how_to_resume(family, tmp_path):
    cfg = write_config(family, tmp_path / "c.yaml", budget={"trials": 40})
    env = harness_env(tmp_path, family)
    proc = subprocess.Popen([sys.executable, str(HARNESS), "search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while count_phase(tmp_path, "evaluate") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert f"evomerge resume {tmp_path / 'runs' / 'c'}" in err and "Traceback" not in err
    study = Run.open(tmp_path / "runs" / "c").study()
    assert not [t for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING]


def test_resume_with_an_unreachable_storage_fails_with_one_line(family, tmp_path, capsys):
    run = create(write_config(family, tmp_path / "r.yaml", budget={"trials": 2}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    capsys.readouterr()
    assert main(["resume", str(run.run_dir), "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err and err.count("\n") == 1


def test_a_search_whose_trials_all_fail_stops_says_why_and_resumes_after_the_fix(family, tmp_path, monkeypatch, capsys):
    import evomerge.evaluate

    class Broken:
        name, metrics = "closeness", {"ft0": "maximize", "ft1": "maximize"}

        def evaluate(self, model, tokenizer, *, limit=None):
            raise RuntimeError("the grader's server is down")

    working = evomerge.evaluate.build_evaluator
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", lambda preset, split="validation", **o: Broken())
    cfg = write_config(family, tmp_path / "f.yaml", budget={"trials": 30})
    assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--executor", "serial"]) == 1
    out, err = capsys.readouterr()
    run_dir = tmp_path / "runs" / "f"
    # ten alike failures stop the session (not 2 x 30 of them), each failure told once, the cause on stderr
    assert "0 complete, 10 failed" in out and out.count("failed: RuntimeError: the grader's server is down") == 1
    assert "10 trials failed (0-9): RuntimeError: the grader's server is down" in err
    assert f"error: stopped early, 10 trials failed in this session, none finished; fix the cause above, then: evomerge resume {run_dir}" in err
    assert main(["status", str(run_dir)]) == 0
    assert "10 trials failed (0-9): RuntimeError: the grader's server is down" in capsys.readouterr().out
    assert main(["export", str(run_dir), "--trial", "3", "--out", str(tmp_path / "x")]) == 2
    assert "trial 3 is FAIL (RuntimeError: the grader's server is down (at " in capsys.readouterr().err
    # fixed: the resume is not held back by the failures of the earlier session
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", working)
    assert main(["resume", str(run_dir), "--trials", "4", "--executor", "serial", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n_complete"], summary["n_failed"], summary["stopped"], summary["errors"]) == (4, 10, None, [])


def test_dashboard_on_a_taken_port_or_a_bad_one_is_one_line(family, tmp_path, capsys):
    import socket

    run = create(write_config(family, tmp_path / "d.yaml", budget={"trials": 1}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", str(run.run_dir), "--port", str(port)]) == 2  # was an OSError traceback
        assert capsys.readouterr().err.strip() == f"evomerge dashboard: error: cannot listen on 127.0.0.1:{port}: in use (another dashboard?); pick another --port"
    assert main(["dashboard", str(run.run_dir), "--port", "70000"]) == 2
    assert capsys.readouterr().err.strip() == "evomerge dashboard: error: --port 70000: a port is between 1 and 65535"

"""Held-out scoring never holds a candidate back: front members are re-scored in idle
worker slots and at the end of a session, once each; status names those still missing;
a run killed while re-scoring finishes it on resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import evomerge.evaluate
from evomerge import record
from evomerge._testing import write_family
from evomerge.cli import main
from evomerge.execute.serial import SerialExecutor
from evomerge.run.api import create
from evomerge.run.handle import Run
from tests._distance_eval import DistanceEvaluator

HARNESS = Path(__file__).parent / "_crashable.py"


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=5)


class Shifted(DistanceEvaluator):
    """The held-out "data set": the same closeness, 0.01 lower, so both figures differ."""

    def evaluate(self, model, tokenizer, *, limit=None):
        return {k: v - 0.01 for k, v in super().evaluate(model, tokenizer, limit=limit).items()}


@pytest.fixture
def jobs(monkeypatch, family) -> list[tuple[int, str]]:
    """Distance evaluators (shifted on the held-out split) and the log of submitted jobs."""
    log: list[tuple[int, str]] = []
    targets = {"ft0": family[1], "ft1": family[2]}
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", lambda preset, split="validation", **o: (DistanceEvaluator if split == "validation" else Shifted)(targets), raising=False)
    real = SerialExecutor.submit
    monkeypatch.setattr(SerialExecutor, "submit", lambda self, job: (log.append((job.trial, job.kind)), real(self, job))[1])
    return log


def write_config(family, path: Path, **changes) -> Path:
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global",
        "evaluators": [{"preset": "distance", "holdout_split": "test"}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "nsga2", "options": {"population_size": 4}},
        "budget": {"trials": 14},
        "seed": 2,
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def _members(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "pareto.json").read_text())["members"]


def test_the_final_front_is_rescored_once_after_the_candidates(family, tmp_path, jobs):
    run = create(write_config(family, tmp_path / "s.yaml", budget={"trials": 14, "holdout_share": 1}), runs_dir=tmp_path / "runs")
    summary = run.run(progress=False)
    members = _members(run.run_dir)
    held = [(n, k) for n, k in jobs if k == "holdout"]
    # one job per member of the final front, none for candidates that left it, all after the last candidate
    assert sorted(n for n, _ in held) == sorted(m["trial"] for m in members) and summary["holdout_jobs"] == len(members)
    last_full = max(i for i, (_, k) in enumerate(jobs) if k == "full")
    assert min(i for i, (_, k) in enumerate(jobs) if k == "holdout") > last_full
    for m in members:
        assert m["holdout_values"] == {k: pytest.approx(v - 0.01) for k, v in m["values"].items()}
    assert summary["holdout_pending"] == []


def test_cma_uses_the_slots_its_generation_leaves_idle(family, tmp_path, jobs):
    """popsize 3 on 2 slots: each generation's last candidate runs alone; members are
    re-scored beside it, not in a stage of their own."""
    cfg = write_config(family, tmp_path / "s.yaml", optimizer={"name": "cma", "options": {"popsize": 3}},
                       scalarization={"kind": "weighted_sum", "weights": [0.5, 0.5]}, budget={"trials": 12, "holdout_share": 1},
                       executor={"kind": "serial", "workers": 2})
    run = create(cfg, runs_dir=tmp_path / "runs")
    run.run(progress=False)
    kinds = [k for _, k in jobs]
    last_full = max(i for i, k in enumerate(kinds) if k == "full")
    assert any(k == "holdout" for k in kinds[:last_full]), kinds  # in an idle slot during the search
    held = [n for n, k in jobs if k == "holdout"]
    assert len(held) == len(set(held)) and kinds.count("full") == 12  # each member at most once; the whole budget
    assert all(m["holdout_values"] for m in _members(run.run_dir))


def test_rescoring_at_the_end_keeps_to_its_share_best_members_first_and_resume_does_the_rest(family, tmp_path, jobs, capsys):
    """budget.holdout_share (0.2 by default): once no candidate is in flight, members are
    re-scored, best validation mean first, while held-out work stays within a fifth of the
    session's worker time; the rest is named and left for `resume`."""
    from evomerge.objective import Objective
    from evomerge.pareto import ranked_by_mean

    cfg = write_config(family, tmp_path / "s.yaml", optimizer={"name": "random"}, budget={"trials": 16}, seed=11)
    assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "s"
    members = _members(run_dir)
    held = [n for n, k in jobs if k == "holdout"]
    assert len(members) >= 4 and 1 <= len(held) <= 16 // 4  # a fifth of the time: a quarter of the candidates' at most
    objectives = [Objective("closeness/ft0", "maximize"), Objective("closeness/ft1", "maximize")]
    study = Run.open(run_dir).study()
    front = ranked_by_mean([study.trials[m["trial"]] for m in members], objectives)
    assert held == [t.number for t in front[: len(held)]]  # the best members first
    left = len(members) - len(held)
    assert f"{left} front members not re-scored on the held-out split yet" in out and f"evomerge resume {run_dir}" in out
    jobs.clear()
    assert main(["resume", str(run_dir), "--json"]) == 0  # a session with no candidate re-scores the rest
    resumed = json.loads(capsys.readouterr().out)
    assert sorted(n for n, _ in jobs) == sorted(t.number for t in front[len(held):]) and resumed["holdout_pending"] == []
    assert resumed["holdout_deferred"] == 0 and all(m["holdout_values"] for m in _members(run_dir))


def test_status_names_members_not_rescored_and_resume_after_kill_finishes_them(family, tmp_path, capsys, jobs, monkeypatch):
    monkeypatch.setenv("EVOMERGE_LEASE_TIMEOUT", "1")  # the killed driver's study is taken over this soon
    cfg = write_config(family, tmp_path / "search.yaml", optimizer={"name": "random"}, budget={"trials": 8}, seed=4)
    env = dict(os.environ, EVOMERGE_PHASE_FILE=str(tmp_path / "phases.log"), EVOMERGE_JOB_LOG=str(tmp_path / "jobs.log"),
               EVOMERGE_TARGETS=os.pathsep.join([str(family[1]), str(family[2])]), EVOMERGE_COMPILE="0", EVOMERGE_LEASE_TIMEOUT="1")
    for f in ("phases.log", "jobs.log"):
        (tmp_path / f).touch()
    proc = subprocess.Popen([sys.executable, str(HARNESS), "search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "holdout" not in (tmp_path / "phases.log").read_text().split() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read()
    os.kill(proc.pid, signal.SIGKILL)  # while the first member is re-scored on the held-out split
    proc.wait()
    time.sleep(1.0)  # the killed driver's lease expires
    run_dir = tmp_path / "runs" / "search"
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    front = [m["trial"] for m in status["pareto"]]
    assert status["n_complete"] == 8 and sorted(status["holdout_pending"]) == sorted(front) and front
    assert main(["status", str(run_dir)]) == 0
    text = capsys.readouterr().out
    assert f"{len(front)} not re-scored on the held-out split yet" in text and text.count("held-out: not re-scored yet") == len(front)
    # resume (in process, same evaluators): no candidate more, the missing members re-scored
    assert main(["resume", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # one held-out job per member; a member whose folder the killed driver's worker was
    # still writing in the background is rebuilt by a write job
    assert sorted(n for n, k in jobs if k == "holdout") == sorted(front) and out["holdout_pending"] == []
    assert all(k == "write" and n in front for n, k in jobs if k != "holdout"), jobs
    study = Run.open(run_dir).study()
    held = record.holdouts(study.user_attrs)
    assert sorted(held) == sorted(front)
    assert all(m["holdout_values"] for m in _members(run_dir))

"""The Ray executor for real: a local Ray cluster, real actors, real searches.

One cluster serves the whole module (Ray starts in ~5 s; each pool of actors in ~10 s
on two cores, most of it importing torch and transformers), so the tests are few and
each checks several things.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge._testing import write_family
from evomerge.cli import main
from evomerge.run.api import Search, create
from tests import _ray_evals

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=11)


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """The offline zoo's models (same architecture, tokenizer and skills), trained for a few steps only."""
    from evomerge.zoo import ZooRecipe, zoo

    recipe = ZooRecipe(skills=("add", "reverse"), base_steps=20, finetune_steps=10, train_size=200, validation_size=20, test_size=20)
    return zoo(tmp_path_factory.mktemp("zoo") / "zoo", recipe=recipe, progress=False, workers=1)


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(family, tmp_path, name="search.yaml", evaluator=None, **changes) -> Path:
    """A run config; its evaluator is the ``python`` closeness function, loaded by file path in every actor."""
    preset = _ray_evals.write_preset(tmp_path, family, **(evaluator or {}))
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global",
        "evaluators": [{"preset": str(preset)}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": 8},
        "seed": 5,
        "keep_pareto_models": False,
    }
    data.update(changes)
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_search_on_two_ray_workers_matches_serial(cluster, tiny_zoo, tmp_path, capsys):
    """Acceptance 1 and 5: ray x2 from the CLI, on the zoo, fills its budget on two workers with serial's values."""
    import torch

    skills = ("add", "reverse")
    # The zoo's task presets, scored by perplexity: a few training steps give no exact answers yet.
    ppl = {"mode": "perplexity", "metrics": ["perplexity"]}
    cfg = tmp_path / "zoo_search.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "sources": {"base_model": str(tiny_zoo.base), "models": [str(tiny_zoo.models[s]) for s in skills]},
                "search_space": "ties_layerwise",
                "evaluators": [{"preset": f"zoo_{s}", "name": s, "limit": 24, "options": ppl} for s in skills],
                "objectives": [{"metric": f"{s}/perplexity", "direction": "minimize"} for s in skills],
                "optimizer": {"name": "random"},
                "budget": {"trials": 8},
                "seed": 5,
            }
        )
    )
    runs = tmp_path / "runs"
    assert main(["search", str(cfg), "--runs-dir", str(runs), "--name", "ray", "--executor", "ray", "--workers", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_complete"] == 8 and summary["n_failed"] == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each Ray worker (1 CPU each): the same float reductions
    try:
        assert main(["search", str(cfg), "--runs-dir", str(runs), "--name", "serial", "--executor", "serial", "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    def trials(name):
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(runs / name / "study.journal")))
        return optuna.load_study(study_name=name, storage=storage).get_trials()

    on_ray, on_serial = trials("ray"), trials("serial")
    ids = {t.user_attrs["worker_id"] for t in on_ray}
    assert len(ids) == 2 and all(i.startswith("ray-") and "@" in i for i in ids)
    assert {t.user_attrs["worker_id"] for t in on_serial} == {"serial-0"}
    assert len(on_ray) == len(on_serial) == 8
    assert [(t.number, t.params, t.values) for t in on_ray] == [(t.number, t.params, t.values) for t in on_serial]
    assert len({tuple(t.values) for t in on_ray}) > 1  # the candidates really differ
    assert (runs / "ray" / "pareto").is_dir() and any((runs / "ray" / "pareto").iterdir())


@pytest.fixture(scope="module")
def control(tmp_path_factory) -> Path:
    """Files here steer the evaluator while actors run it (see tests/_ray_evals.py)."""
    return tmp_path_factory.mktemp("control")


@pytest.fixture(scope="module")
def pool(cluster, family, control, tmp_path_factory):
    """Three Ray workers shared by the tests below: a pool takes ~10 s to start on two cores."""
    from evomerge.execute.ray import RayExecutor
    from evomerge.worker import EvaluatorSpec, WorkerSpec

    preset = _ray_evals.write_preset(tmp_path_factory.mktemp("pool"), family, control_dir=str(control))
    spec = WorkerSpec(
        models=tuple(str(p) for p in family),
        base_model=str(family[0]),
        evaluators=(EvaluatorSpec(str(preset), "closeness", "validation", None, None, {}),),
    )
    ex = RayExecutor(spec, workers=3, max_retries=1, straggler_min_seconds=0.5)
    yield ex
    ex.shutdown()


def idle(pool) -> list[dict]:
    """Wait until no copy of an earlier test's job runs (a backup may outlive its search); worker infos."""
    deadline = time.monotonic() + 60
    while pool.running_jobs() and time.monotonic() < deadline:
        time.sleep(0.1)
    return pool.worker_info()


def sleep_for(control: Path, seconds: float) -> None:
    (control / "sleep").write_text(str(seconds))


def test_killed_worker_is_replaced_and_its_trial_retried(pool, family, control, tmp_path):
    """Acceptance 2: SIGKILL a busy actor mid-search; its trial runs again elsewhere, the budget completes."""
    pids = {i["pid"]: i["worker_id"] for i in idle(pool)}
    deaths, retries = len(pool.deaths), dict(pool.retries)
    sleep_for(control, 0.6)  # slow enough to be caught busy
    run = create(config(family, tmp_path, evaluator={"control_dir": str(control)}, budget={"trials": 10}), runs_dir=tmp_path / "runs")
    killed: dict = {}

    def kill_one():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for job in pool.running_jobs():
                if job["seconds"] > 0.3 and job["pid"] in pids and job["trial"] >= 2:
                    killed.update(job)
                    os.kill(job["pid"], signal.SIGKILL)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_one, daemon=True)
    watcher.start()
    try:
        summary = run.run(executor=pool, progress=False)
    finally:
        sleep_for(control, 0)
    watcher.join(timeout=5)
    assert killed, "no busy worker was found to kill"
    assert summary["n_complete"] == 10 and summary["n_failed"] == 0
    assert {k: v for k, v in pool.retries.items() if k not in retries} == {(killed["trial"], "full"): 1}
    assert len(pool.deaths) == deaths + 1 and "ActorDiedError" in pool.deaths[-1]
    trials = run.load_study().get_trials()
    assert len(trials) == 10 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert trials[killed["trial"]].user_attrs["worker_id"] != killed["worker_id"]  # finished on another actor
    assert len(idle(pool)) == 3  # the pool is whole again: a replacement took the dead worker's place


def test_cma_generation_does_not_wait_on_a_straggler(pool, family, control, tmp_path):
    """Workers outnumber the population: a slow worker's candidate is redone by an idle one."""
    slow = idle(pool)[2]  # the baseline goes to the first worker, generation 0 to the other two
    backups = pool.backups
    changes = dict(
        evaluator={"control_dir": str(control)},
        optimizer={"name": "cma", "options": {"popsize": 2}},
        scalarization={"kind": "weighted_sum", "weights": [0.5, 0.5]},
        budget={"trials": 7},
    )
    run = create(config(family, tmp_path, **changes), runs_dir=tmp_path / "runs", name="ray")
    sleep_for(control, 0.2)
    (control / f"slow-{slow['pid']}").write_text("8")
    t0 = time.monotonic()
    try:
        summary = run.run(executor=pool, progress=False)
        elapsed = time.monotonic() - t0
    finally:
        (control / f"slow-{slow['pid']}").unlink()
    assert summary["n_complete"] == 7 and summary["n_failed"] == 0
    assert pool.backups > backups
    trials = run.load_study().get_trials()
    assert [t.user_attrs.get("cma_generation") for t in trials[1:]] == [0, 0, 1, 1, 2, 2]
    assert trials[2].user_attrs["worker_id"] != slow["worker_id"]  # the backup copy won
    assert elapsed < 8.0  # without the backup, generation 0 alone waits 8 s on the straggler
    # the same values as a serial run: a backup computes exactly what the straggler would have
    serial = create(config(family, tmp_path, name="serial.yaml", **changes), runs_dir=tmp_path / "runs", name="serial")
    try:
        serial.run(progress=False)
    finally:
        sleep_for(control, 0)
    assert [t.values for t in serial.load_study().get_trials()] == [t.values for t in trials]


def test_faults_inside_and_around_jobs(pool, family):
    """An exception or an infinite score fails the job; a job whose worker keeps dying fails after max_retries."""
    from evomerge.worker import Job

    idle(pool)
    deaths = len(pool.deaths)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(family[0]),
        "models": [{"model": str(family[1]), "parameters": {"weight": 0.5}}, {"model": str(family[2]), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    for trial, limit in enumerate([None, -2, -3, None], start=100):
        pool.submit(Job(trial, recipe, limit=limit))
    results = {}
    while pool.in_flight():
        results.update({r.trial: r for r in pool.poll(timeout=60)})
    assert results[100].error is None and results[103].error is None and results[100].scores == results[103].scores
    assert results[101].scores is None and results[101].error.startswith("RuntimeError: boom in evaluate")
    assert results[102].scores is None and results[102].error.startswith("non-finite score closeness/ft0=inf")
    assert len(pool.deaths) == deaths and (101, "full") not in pool.retries

    pool.submit(Job(109, recipe, limit=-1))  # kills every worker that runs it
    [died] = pool.poll(timeout=120)
    assert died.trial == 109 and died.scores is None
    assert died.error.startswith("worker died 2 times: ") and "ActorDiedError" in died.error
    assert pool.retries[(109, "full")] == 1 and len(pool.deaths) == deaths + 2


def test_ray_options_reach_the_executor_config(family, tmp_path, monkeypatch, capsys):
    """--cpus-per-worker, --gpus-per-worker, --ray-address, --ray-dashboard land in executor.*; they imply Ray."""
    seen = {}

    def fake_run(self, **kwargs):
        seen["executor"] = self.config.executor
        raise KeyboardInterrupt  # stop before any worker starts

    monkeypatch.setattr(Search, "run", fake_run)
    argv = ["search", str(config(family, tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--workers", "4"]
    argv += ["--cpus-per-worker", "0.5", "--gpus-per-worker", "0.25", "--ray-address", "10.0.0.1:6379", "--ray-dashboard"]
    assert main(argv) == 130
    ex = seen["executor"]
    assert (ex.kind, ex.workers, ex.cpus_per_worker, ex.gpus_per_worker, ex.ray_address, ex.ray_dashboard) == ("ray", 4, 0.5, 0.25, "10.0.0.1:6379", True)
    assert ex.options() == {"cpus_per_worker": 0.5, "gpus_per_worker": 0.25, "address": "10.0.0.1:6379", "dashboard": True, "max_retries": 2}


def test_more_workers_than_the_cluster_holds_is_a_config_error(cluster, family):
    from evomerge.errors import ConfigError
    from evomerge.execute.ray import RayExecutor
    from evomerge.worker import WorkerSpec

    spec = WorkerSpec(models=tuple(str(p) for p in family), base_model=str(family[0]), evaluators=())
    with pytest.raises(ConfigError, match=r"3 workers x 1 CPUs need 3 CPUs; the Ray cluster has 2"):
        RayExecutor(spec, workers=3, cpus_per_worker=1)
    assert ray.is_initialized()  # a cluster it did not start is left alone


def test_bench_search_table_and_json_shape():
    """`bench search` prints one row per executor, the speed-up, the memory probe and a contention warning."""
    from evomerge.bench.search import format_table

    def row(name, k, cpm, other):
        mem = [{"anon": 300 * 2**20, "pss": 350 * 2**20, "rss": 400 * 2**20}] * k
        return {"executor": name, "workers": k, "start_seconds": 5.0, "candidates_per_minute": cpm, "outside_fraction": 0.02,
                "idle_fraction": None if name == "serial" else 0.01, "busy_seconds": 20.0, "memory": mem, "other_cpu_fraction": other}  # fmt: skip

    result = {
        "trials": 24, "optimizer": "random", "cpu_count": 2, "cpus_per_worker": 1.0, "merged_model_bytes": 900_000,
        "rows": [row("serial", 1, 60.0, 0.01), row("ray x1", 1, 70.0, 0.02), row("ray x2", 2, 130.0, 0.3),
                 dict(row("ray x2 +held-out", 2, 110.5, 0.01), holdout_jobs=5, holdout_seconds=12.5, holdout_deferred=7, front=12)],
        "speedup_2_over_1": 130 / 70, "holdout_ratio": 110.5 / 130, "load_average": [1.0, 1.0, 1.0], "load_average_start": [0.5, 0.5, 0.5],
        "memory": {"params": 1e8, "merged_model_bytes": 375 * 2**20, "source_bytes": 1125 * 2**20, "workers": [1, 2],
                   "anon_total_bytes": {"1": 750 * 2**20, "2": 1500 * 2**20}, "extra_worker_bytes": 750 * 2**20,
                   "extra_worker_over_merged_model": 2.0, "extra_worker_model_bytes": 393 * 2**20,
                   "extra_worker_model_over_merged_model": 1.05, "extra_worker_pss_bytes": 836 * 2**20},
    }  # fmt: skip
    table = format_table(result)
    assert [line.split()[0] for line in table.splitlines()[2:5]] == ["serial", "ray", "ray"]
    assert "ray x2 / ray x1: 1.86x" in table and "1.05x the merged model" in table
    assert "warning: other processes used more than 10%" in table
    assert "held-out scoring on: 0.85x the candidates per minute without it (target >= 0.8); 5 of a front of 12 re-scored (12.5 worker s), 7 left for resume" in table
    assert json.loads(json.dumps(result)) == result


def test_bench_search_rows_name_a_run_folder_only_when_it_is_kept(tmp_path, monkeypatch):
    """Rows carry ``run_dir`` for a ``--workdir`` the user keeps, not for the temporary
    folder the benchmark deletes when it returns."""
    import contextlib

    from evomerge import zoo as zoo_module
    from evomerge.bench import search as bench

    def measure(cfg, workdir, kind, k, *args, **kwargs):
        assert Path(workdir).is_dir()
        return {"executor": f"{kind} x{k}", "workers": k, "candidates_per_minute": 10.0 * k, "merged_model_bytes": 1, "run_dir": str(Path(workdir) / f"{kind}{k}")}

    monkeypatch.setattr(zoo_module, "load_zoo", lambda *a, **k: type("Z", (), {"root": tmp_path})())
    monkeypatch.setattr(bench, "_zoo_config", lambda *a, **k: tmp_path / "cfg.yaml")
    monkeypatch.setattr(bench, "_measure", measure)
    monkeypatch.setattr(bench, "local_ray", contextlib.nullcontext)
    kw = dict(ray_workers=[1, 2], memory_params=0, holdout=False, progress=False)
    gone = bench.bench_search(zoo_dir=tmp_path / "zoo", **kw)
    assert len(gone["rows"]) == 3 and not any("run_dir" in r for r in gone["rows"])
    kept = bench.bench_search(zoo_dir=tmp_path / "zoo", workdir=tmp_path / "work", **kw)
    assert [r["run_dir"] for r in kept["rows"]] == [str(tmp_path / "work" / n) for n in ("serial1", "ray1", "ray2")]


def test_resume_can_move_a_run_to_another_executor_for_one_session(family, tmp_path, monkeypatch, capsys):
    """resume takes the same executor options as search; the frozen config keeps the run's own."""
    seen = []

    def fake_run(self, **kwargs):
        self.load_study()  # the study exists, as after a real first session
        seen.append(self.config.executor)
        raise KeyboardInterrupt  # stop before any worker starts

    monkeypatch.setattr(Search, "run", fake_run)
    assert main(["search", str(config(family, tmp_path)), "--runs-dir", str(tmp_path / "runs"), "--name", "r"]) == 130
    run_dir = tmp_path / "runs" / "r"
    frozen = (run_dir / "config.yaml").read_text()
    assert main(["resume", str(run_dir), "--cpus-per-worker", "0.5", "--ray-address", "10.0.0.1:6379"]) == 130
    assert main(["resume", str(run_dir), "--executor", "serial"]) == 130
    first, second = seen[1], seen[2]
    assert (first.kind, first.cpus_per_worker, first.ray_address) == ("ray", 0.5, "10.0.0.1:6379")
    assert second.kind == "serial" and "cpus_per_worker" not in second.model_dump()  # Ray's fields stay with Ray
    assert (run_dir / "config.yaml").read_text() == frozen
    capsys.readouterr()
    assert main(["resume", str(run_dir), "--cpus-per-worker", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge resume: error: executor.cpus_per_worker: ") and len(err.splitlines()) == 1, err


def test_a_search_on_its_own_local_cluster_prints_no_ray_chatter(family, tmp_path):
    """A fresh local cluster per search: the terminal shows the search, not Ray's start-up notes."""
    cfg = config(family, tmp_path, budget={"trials": 2})
    argv = [sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--executor", "ray", "--workers", "1", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["n_complete"] == 2
    assert proc.stderr.strip() == ""  # e.g. no "Token authentication is enabled for this Ray cluster"

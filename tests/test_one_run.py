"""The study is the run: resume from any machine, a light run handle, one driver at a time,
a house without circles, and kinds registered from outside the package (issue 18)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import record
from evomerge._testing import write_family
from evomerge.cli import main
from evomerge.run.api import create
from evomerge.run.handle import Run

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(__file__).parent / "_crashable.py"
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
LEASE = 1.0  # heartbeat timeout of the drivers these tests start


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=31)


def _use_distance(monkeypatch, family) -> None:
    """In this process, evaluators are the weight-distance one (the harness patches its own)."""
    import evomerge.evaluate
    from tests._distance_eval import DistanceEvaluator

    build = lambda preset, split="validation", **o: DistanceEvaluator({"ft0": family[1], "ft1": family[2]})  # noqa: E731
    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", build, raising=False)


@pytest.fixture
def distance(monkeypatch, family):
    _use_distance(monkeypatch, family)


@pytest.fixture(scope="module")
def reference(family, tmp_path_factory):
    """The CMA search of acceptance 1, uninterrupted: once for both storages."""
    tmp = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        _use_distance(mp, family)
        ref = create(write_config(family, tmp / "whole.yaml"), runs_dir=tmp / "runs")
        ref.run(progress=False)
    return ref


def write_config(family, path: Path, **changes) -> Path:
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "ties_layerwise",
        "evaluators": [{"preset": "distance"}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "cma", "options": {"popsize": 4}},
        "scalarization": {"kind": "weighted_sum"},
        "executor": {"kind": "serial", "workers": 2},
        "budget": {"trials": 13},
        "seed": 5,
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def harness_env(tmp_path: Path, family) -> dict:
    env = dict(os.environ, EVOMERGE_LEASE_TIMEOUT=str(LEASE), EVOMERGE_COMPILE="0")
    env.update(
        EVOMERGE_PHASE_FILE=str(tmp_path / "phases.log"),
        EVOMERGE_JOB_LOG=str(tmp_path / "jobs.log"),
        EVOMERGE_TARGETS=os.pathsep.join([str(family[1]), str(family[2])]),
    )
    for f in ("phases.log", "jobs.log"):
        (tmp_path / f).touch()
    return env


def evaluations(tmp_path: Path) -> int:
    return (tmp_path / "phases.log").read_text().split().count("evaluate")


def wait_for(predicate, proc, seconds=120.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def cma_trials(study) -> dict:
    """COMPLETE trials by what they are (the baseline, or CMA candidate (generation, index)): params and values."""
    out = {}
    for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        key = ("baseline",) if "baseline" in t.user_attrs else (t.user_attrs["cma_generation"], t.user_attrs["cma_index"])
        assert key not in out, key
        out[key] = (t.params, t.values)
    return out


def front_folder(run_dir: Path) -> dict:
    """The Pareto folder by member content: recipe -> (values, tensors)."""
    members = json.loads((run_dir / "pareto.json").read_text())["members"]
    out = {}
    for m in members:
        tensors = load_file(str(run_dir / "pareto" / str(m["trial"]) / "model.safetensors"))
        out[json.dumps(m["recipe"], sort_keys=True)] = (m["values"], tensors)
    assert sorted(p.name for p in (run_dir / "pareto").iterdir()) == sorted(str(m["trial"]) for m in members)
    return out


# ---------------------------------------------------------------------------- acceptance 1
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_cma_killed_mid_generation_resumes_from_an_empty_runs_dir_with_url_and_name(family, tmp_path, reference, backend):
    if backend == "postgresql":
        from tests._postgres import postgres_server

        server = postgres_server(tmp_path / "pg")
    else:
        import contextlib

        server = contextlib.nullcontext(f"sqlite:///{tmp_path / 'studies.db'}")
    with server as url:
        ref = reference  # the same config and seed, uninterrupted
        # The same search in a subprocess, killed with SIGKILL in the middle of generation 1.
        env = harness_env(tmp_path, family)
        cmd = [sys.executable, str(HARNESS), "search", str(write_config(family, tmp_path / "cut.yaml")), "--runs-dir", str(tmp_path / "here"), "--storage", url, "--json"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: evaluations(tmp_path) >= 7, proc)  # baseline + generation 0 (4) + 2 of generation 1
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        study = optuna.load_study(study_name="cut", storage=url)
        g1 = [t for t in study.get_trials() if t.user_attrs.get("cma_generation") == 1]
        assert g1 and sum(t.state == optuna.trial.TrialState.COMPLETE for t in g1) < 4  # killed inside generation 1
        shutil.rmtree(tmp_path / "here")  # the first machine is gone
        time.sleep(LEASE)  # its lease expires
        # Another machine: an empty runs folder, the storage URL and the study name only.
        other = tmp_path / "elsewhere"
        other.mkdir()
        done = subprocess.run([sys.executable, str(HARNESS), "resume", "--storage", url, "--study", "cut", "--runs-dir", str(other), "--json"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        resumed = Run.open(other / "cut")
        assert resumed.config.model_dump(exclude={"name"}) == ref.config.model_dump(exclude={"name"})
        a, b = cma_trials(ref.load_study()), cma_trials(resumed.study())
        assert set(a) == set(b) and len(a) == 13
        for key in a:
            assert a[key][0] == pytest.approx(b[key][0], abs=1e-12), key
            assert a[key][1] == pytest.approx(b[key][1], abs=1e-12), key
        out = subprocess.run(EVOMERGE + ["status", "--storage", url, "--study", "cut", "--json"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["n_complete"] == 13, out.stderr  # no folder needed at all
        fa, fb = front_folder(ref.run_dir), front_folder(other / "cut")
        assert set(fa) == set(fb) and fa
        for key in fa:
            assert fa[key][0] == fb[key][0]
            assert all(torch.equal(fa[key][1][n], fb[key][1][n]) for n in fa[key][1])


# ---------------------------------------------------------------------------- acceptance 2
def test_status_export_dashboard_need_no_sources_and_no_gpu(family, tmp_path, distance):
    fam = tmp_path / "fam"
    shutil.copytree(family[0].parent, fam)
    mine = [fam / p.name for p in family]
    cfg = write_config(mine, tmp_path / "g.yaml", optimizer={"name": "random"}, scalarization=None, search_space="task_arithmetic_global", budget={"trials": 5})
    s = create(cfg, runs_dir=tmp_path / "runs")
    s.run(progress=False)
    run = Run.open(s.run_dir)
    # A run made with `device: cuda` (faked: the folder's copy and the study's frozen one), its sources gone.
    frozen = dict(run.frozen_config(), device="cuda")
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump(frozen))
    study = run.study()
    study._storage.set_study_system_attr(study._study_id, "evomerge:config", frozen)
    # 95 more trials in its study, recorded as the driver records them: a 100-trial run.
    template = study.trials[1]
    for i in range(95):
        t = study.ask({k: v for k, v in template.distributions.items()})
        record.write(t, recipe=template.user_attrs["recipe"], scores={"closeness/ft0": 0.1 + i / 1000, "closeness/ft1": 0.5 - i / 1000},
                     merge_seconds=0.1, eval_seconds=0.2, fidelity="full")
        study.tell(t, [0.1 + i / 1000, 0.5 - i / 1000])
    shutil.rmtree(fam)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    out = subprocess.run(EVOMERGE + ["status", str(run.run_dir)], env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert "trials: 100 complete" in out.stdout
    assert seconds < 3.0, f"status on a 100-trial run took {seconds:.2f} s"
    out = subprocess.run(EVOMERGE + ["status", str(run.run_dir), "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["n_complete"] == 100 and summary["pareto"]
    member = next(m for m in summary["pareto"] if Path(m["path"]).is_dir())
    out = subprocess.run(EVOMERGE + ["export", str(run.run_dir), "--trial", str(member["trial"]), "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    a, b = load_file(str(tmp_path / "x" / "model.safetensors")), load_file(str(Path(member["path"]) / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a trial with no folder needs its sources: one line says which is missing
    lone = next(t.number for t in run.study().trials if not (run.run_dir / "pareto" / str(t.number)).exists())
    out = subprocess.run(EVOMERGE + ["export", str(run.run_dir), "--trial", str(lone), "--out", str(tmp_path / "y")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and str(fam) in out.stderr, out.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dash = subprocess.Popen(EVOMERGE + ["dashboard", str(run.run_dir), "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, answer = time.monotonic() + 60, None
        while answer is None and time.monotonic() < deadline and dash.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert answer is not None, dash.stderr.read() if dash.poll() is not None else "no answer"
        assert any(st["study_name"] == run.name for st in answer["study_summaries"])
    finally:
        dash.terminate()
        dash.wait(timeout=30)


def test_help_answers_in_under_a_second():
    subprocess.run(EVOMERGE + ["--help"], capture_output=True, timeout=60)  # warm the file cache
    t0 = time.perf_counter()
    out = subprocess.run(EVOMERGE + ["--help"], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert out.returncode == 0 and "resume" in out.stdout
    assert seconds < 1.0, f"evomerge --help took {seconds:.2f} s"
    heavy = subprocess.run([sys.executable, "-c", "import sys, evomerge.cli; evomerge.cli.build_parser(); print(sorted(m for m in ('torch', 'optuna', 'transformers', 'ray') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60)
    assert heavy.stdout.strip() == "[]", heavy.stdout + heavy.stderr


# ---------------------------------------------------------------------------- acceptance 3
def test_one_driver_at_a_time_and_a_dead_one_is_taken_over(family, tmp_path, distance):
    env = harness_env(tmp_path, family)
    cfg = write_config(family, tmp_path / "l.yaml", optimizer={"name": "random"}, scalarization=None, search_space="task_arithmetic_global", budget={"trials": 1})
    run_dir = create(cfg, runs_dir=tmp_path / "runs").run_dir
    resume = [sys.executable, str(HARNESS), "resume", str(run_dir), "--json"]
    a = subprocess.Popen(resume + ["--trials", "200"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: evaluations(tmp_path) >= 3, a)
        assert a.poll() is None, a.stderr.read()
        b = subprocess.run(resume + ["--trials", "400"], env=env, capture_output=True, text=True, timeout=120)
        assert b.returncode == 2, b.stderr
        line = b.stderr.strip()
        assert len(line.splitlines()) == 1 and "another driver runs this study: " in line, line
        assert f"{socket.gethostname()} pid {a.pid} since " in line
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
    finally:
        if a.poll() is None:
            a.kill()
    time.sleep(LEASE + 0.2)  # its heartbeat expires
    before = Run.open(run_dir).trials_done()
    c = subprocess.run(resume + ["--trials", str(before + 2)], env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr
    assert json.loads(c.stdout)["n_complete"] == before + 2


def test_two_drivers_starting_together_agree_on_one(tmp_path):
    """Both write their claim before either reads back: both see both, and the same one wins."""
    import threading

    from evomerge.run.lease import Lease, LeaseHeld

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'l.db'}", study_name="s")
    leases = [Lease(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'l.db'}"), timeout=5, settle=0.5) for _ in range(2)]
    results: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            leases[i].acquire()
            results[i] = "won"
        except LeaseHeld as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r == "won" for r in results.values()) == [False, True], results
    for lease in leases:
        lease.release()
    assert not any(v for k, v in study._storage.get_study_system_attrs(study._study_id).items() if k.startswith("evomerge:lease:"))


# ---------------------------------------------------------------------------- acceptance 4
def test_the_layers_hold_and_nothing_imports_in_a_circle():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


# ---------------------------------------------------------------------------- acceptance 5
def test_kinds_registered_from_outside_run_through_a_search_and_status(family, tmp_path, capsys):
    from typing import Literal

    from optuna.samplers import QMCSampler

    from evomerge.config import EVALUATORS, EvaluatorConfigBase, register_evaluator
    from evomerge.evaluate.base import Evaluator
    from evomerge.merge.methods import METHODS, MergeMethod
    from evomerge.merge.methods import register as register_method
    from evomerge.merge.params import ParamSpec
    from evomerge.optimize import OPTIMIZERS, register
    from evomerge.optimize.samplers import SamplerOptimizer

    class NormConfig(EvaluatorConfigBase):
        kind: Literal["weight_norm"]
        scale: float = 1.0

    class NormEvaluator(Evaluator):
        """Scores a live model by its weights' norm: no data needed."""

        kind = "weight_norm"

        def __init__(self, config, base, where):
            self.name, self.metrics, self.scale = config.name, {"norm": "minimize", "neg_norm": "maximize"}, config.scale

        def evaluate(self, model, tokenizer, *, limit=None):
            norm = float(sum(float(p.detach().float().norm()) for p in model.parameters())) * self.scale
            return {"norm": norm, "neg_norm": -norm}

    class QMCOptimizer(SamplerOptimizer):
        name = "outside_qmc"
        sampler_cls = QMCSampler
        supports_multi_objective = True

    register_evaluator("weight_norm", NormConfig, NormEvaluator)  # one registration each
    register(QMCOptimizer)
    try:
        (tmp_path / "norm.yaml").write_text("kind: weight_norm\nscale: 2.0\n")
        cfg = write_config(
            family, tmp_path / "outside.yaml", evaluators=[{"preset": str(tmp_path / "norm.yaml")}],
            objectives=[{"metric": "norm/norm", "direction": "minimize"}, {"metric": "norm/neg_norm"}],
            optimizer={"name": "outside_qmc"}, scalarization=None, search_space="task_arithmetic_global", budget={"trials": 4},
        )
        assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["n_complete"] == 4 and summary["n_failed"] == 0
        study = Run.open(tmp_path / "runs" / "outside").study()
        assert all(t.user_attrs["scores"]["norm/neg_norm"] == -t.user_attrs["scores"]["norm/norm"] for t in study.trials)
        assert main(["status", str(tmp_path / "runs" / "outside"), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["n_complete"] == 4 and status["objectives"][0] == {"name": "norm/norm", "direction": "minimize"}

        # a merge method: one object, one registration; through `evomerge merge`, a search and status
        class MeanDelta(MergeMethod):
            """base + strength * the mean task vector."""

            name = "outside_mean"
            params = (ParamSpec("strength", float, 1.0, shared=True, low=0.0, high=2.0),)
            base = "required"

            def merge(self, job):
                k = len(job.inputs)
                job.delta_sum(job.inputs, [job.shared["strength"] / k] * k, base_weight=1.0)

        register_method(MeanDelta())
        recipe = tmp_path / "mean.yaml"
        recipe.write_text(f"merge_method: outside_mean\nbase_model: {family[0]}\nmodels:\n  - model: {family[1]}\n  - model: {family[2]}\nparameters: {{strength: 0.5}}\n")
        assert main(["merge", str(recipe), "--out", str(tmp_path / "mean")]) == 0
        capsys.readouterr()
        from safetensors.torch import load_file

        merged, base, a, b = (load_file(str(Path(f) / "model.safetensors")) for f in (tmp_path / "mean", family[0], family[1], family[2]))
        for name, value in merged.items():
            assert torch.allclose(value, base[name] + 0.25 * ((a[name] - base[name]) + (b[name] - base[name])), atol=1e-6), name
        cfg = write_config(
            family, tmp_path / "outside_method.yaml", evaluators=[{"preset": str(tmp_path / "norm.yaml")}],
            objectives=[{"metric": "norm/norm", "direction": "minimize"}], optimizer={"name": "outside_qmc"}, scalarization=None,
            search_space={"merge_method": "outside_mean", "granularity": "layer", "parameters": {"strength": {"low": 0.0, "high": 2.0}}},
            budget={"trials": 3},
        )
        assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_complete"] == 3
        assert main(["status", str(tmp_path / "runs" / "outside_method"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["n_complete"] == 3
    finally:
        EVALUATORS.pop("weight_norm", None)
        OPTIMIZERS.pop("outside_qmc", None)
        METHODS.pop("outside_mean", None)


# ---------------------------------------------------------------------------- a script's own parts
def test_a_script_passes_its_own_space_evaluator_and_optimizer(family, tmp_path):
    """search() and resume() take objects, as an Optuna study takes a sampler: no YAML file of the script's own."""
    from evomerge.optimize import Objective, build_optimizer
    from evomerge.run import resume, search
    from evomerge.space import SearchSpace
    from tests._distance_eval import DistanceEvaluator

    config = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global",
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "budget": {"trials": 4},
    }
    objectives = [Objective("closeness/ft0", "maximize"), Objective("closeness/ft1", "maximize")]

    def parts():
        space = SearchSpace.from_yaml("task_arithmetic_global", base_model=str(family[0]), models=[str(family[1]), str(family[2])], num_layers=2)
        return dict(space=space, evaluators=[DistanceEvaluator({"ft0": family[1], "ft1": family[2]})],
                    optimizer=build_optimizer("tpe", space.distributions(), objectives, seed=3))

    summary = search(config, runs_dir=tmp_path / "runs", name="scripted", progress=False, **parts())
    assert summary["n_complete"] == 4 and summary["pareto"]
    summary = resume(tmp_path / "runs" / "scripted", trials=6, progress=False, **parts())
    assert summary["n_complete"] == 6
    with pytest.raises(Exception, match="evaluators: at least one entry is needed"):
        resume(tmp_path / "runs" / "scripted", trials=7, progress=False)  # the objects are the script's to pass again

"""Front members are written by the worker whose live model holds them: the driver opens no
source weight, a worker on another machine sends its files, a missing folder is rebuilt by
a worker from the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge._testing import write_family
from evomerge.merge import merge
from evomerge.worker import Job, MemberRequest, Worker, WorkerSpec, node_token
from tests import _ray_evals


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=17)


def _recipe(family, w: float) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(family[0]),
        "models": [{"model": str(family[1]), "parameters": {"weight": w}}, {"model": str(family[2]), "parameters": {"weight": 1 - w}}],
        "dtype": "float32",
    }


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def worker(family, tmp_path_factory) -> Worker:
    preset = _ray_evals.write_preset(tmp_path_factory.mktemp("preset"), family)
    from evomerge.worker import EvaluatorSpec

    spec = WorkerSpec(models=tuple(str(f) for f in family), base_model=str(family[0]),
                      evaluators=(EvaluatorSpec(str(preset), "closeness", "validation", None, None),))
    return Worker(spec)


def test_a_worker_writes_a_candidate_that_may_join_the_front_from_its_live_model(worker, family, tmp_path):
    run_dir = tmp_path / "run"
    token = node_token(run_dir)
    objectives = (("closeness/ft0", "maximize"), ("closeness/ft1", "maximize"))
    beaten = MemberRequest(str(run_dir / "pareto" / "1"), front=((2.0, 2.0),), objectives=objectives, token=token)
    r = worker.run(Job(1, _recipe(family, 0.3), member=beaten))  # the front beats it: no folder
    assert r.error is None and r.written is None and not (run_dir / "pareto" / "1").exists()
    open_front = MemberRequest(str(run_dir / "pareto" / "2"), front=((0.0, 0.0),), objectives=objectives, token=token)
    r = worker.run(Job(2, _recipe(family, 0.3), member=open_front))
    assert r.written == str(run_dir / "pareto" / "2") and r.files is None and r.write_seconds > 0 and r.write_pending
    # The folder is written from a snapshot while the live model takes the next candidate.
    nxt = worker.run(Job(3, _recipe(family, 0.9)))
    done = nxt.writes_done + worker.flush_writes()
    assert [(d.trial, d.folder, d.error) for d in done] == [(2, r.written, None)] and done[0].seconds > 0
    merge(_recipe(family, 0.3), tmp_path / "merged")  # what `evomerge merge` makes of the recipe
    assert _same_weights(run_dir / "pareto" / "2", tmp_path / "merged")
    assert (run_dir / "pareto" / "2" / "merge_recipe.yaml").is_file() and (run_dir / "pareto" / "2" / "config.json").is_file()


def test_a_worker_on_another_machine_sends_the_files_and_the_driver_writes_them(worker, family, tmp_path):
    """No shared file system (the token it reads is not the driver's): the files travel back."""
    from evomerge.run.driver import Driver, RunState

    run_dir = tmp_path / "run"
    node_token(run_dir)
    req = MemberRequest(str(run_dir / "pareto" / "5"), objectives=(("closeness/ft0", "maximize"),), token="another-machine")
    r = worker.run(Job(5, _recipe(family, 0.6), member=req))
    assert r.written == str(run_dir / "pareto" / "5") and set(r.files) >= {"model.safetensors", "config.json", "merge_recipe.yaml"}
    assert not (run_dir / "pareto" / "5").exists()  # the worker wrote nothing in the run folder
    state = RunState()
    Driver._member_written(object.__new__(Driver), r, state)
    merge(_recipe(family, 0.6), tmp_path / "merged")
    assert state.members_written == 1 and _same_weights(run_dir / "pareto" / "5", tmp_path / "merged")
    assert not [p for p in (run_dir / "pareto").iterdir() if p.name.startswith(".")]  # written atomically


def test_a_write_job_rebuilds_a_missing_member_without_scoring(worker, family, tmp_path):
    run_dir = tmp_path / "run"
    req = MemberRequest(str(run_dir / "pareto" / "9"), token=node_token(run_dir), always=True)
    r = worker.run(Job(9, _recipe(family, 0.8), kind="write", member=req))
    assert r.error is None and r.scores is None and r.written
    merge(_recipe(family, 0.8), tmp_path / "merged")
    assert _same_weights(run_dir / "pareto" / "9", tmp_path / "merged")


def _search_config(tmp_path: Path, family, trials: int, **extra) -> Path:
    preset = _ray_evals.write_preset(tmp_path, family)
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global", "evaluators": [{"preset": str(preset)}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "random"}, "budget": {"trials": trials}, "seed": 3, **extra,
    }))
    return cfg


def _check_front(run_dir: Path, tmp_path: Path) -> list[dict]:
    """Every member of pareto.json has its folder, which is its recipe's merge; no other folder."""
    members = json.loads((run_dir / "pareto.json").read_text())["members"]
    assert members and sorted(p.name for p in (run_dir / "pareto").iterdir()) == sorted(str(m["trial"]) for m in members)
    for m in members:
        assert m["path"] == str(run_dir / "pareto" / str(m["trial"]))
        merge(m["recipe"], tmp_path / f"check{m['trial']}")
        assert _same_weights(Path(m["path"]), tmp_path / f"check{m['trial']}"), m["trial"]
    return members


def test_a_member_whose_background_write_failed_is_written_again_before_the_session_ends(family, tmp_path, monkeypatch):
    """The first background write fails (a full disk, say): the error is reported and a worker
    rebuilds the folder from the recipe, so the session still ends with its whole front on disk."""
    from evomerge.merge.engine import MergeEngine
    from evomerge.run.api import create

    real, failed = MergeEngine.write_live, []

    def flaky(self, state, recipe, out, **kw):
        if not failed and not isinstance(state, torch.nn.Module):
            failed.append(str(out))
            raise OSError(28, "No space left on device")
        return real(self, state, recipe, out, **kw)

    monkeypatch.setattr(MergeEngine, "write_live", flaky)
    summary = create(_search_config(tmp_path, family, 6), runs_dir=tmp_path / "runs").run(progress=False)
    assert failed and summary["n_complete"] == 6
    assert any("writing its folder: OSError" in g["error"] and "No space left" in g["error"] for g in summary["errors"]), summary["errors"]
    assert summary["members_written"] >= len(summary["pareto"]) and summary["background_write_seconds"] > 0
    _check_front(tmp_path / "runs" / "search", tmp_path)


ray = pytest.importorskip("ray")


@pytest.mark.timeout(300)
def test_a_ray_search_writes_its_front_while_the_driver_reads_no_weight(family, tmp_path, monkeypatch):
    """The driver's process may not read a single source tensor: the Ray workers merge,
    score and write every front member; each folder is its recipe's merge."""
    from evomerge.run.api import create
    from evomerge.sources import SourceModel

    def refuse(self, name):
        raise AssertionError(f"the driver read tensor {name} of {self.ref}")

    monkeypatch.setattr(SourceModel, "tensor", refuse)
    cfg = _search_config(tmp_path, family, 8, executor={"kind": "ray", "workers": 2, "cpus_per_worker": 1})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = create(cfg, runs_dir=tmp_path / "runs").run(progress=False)
    finally:
        ray.shutdown()
    monkeypatch.undo()
    assert summary["n_complete"] == 8 and summary["n_failed"] == 0 and summary["members_written"] >= len(summary["pareto"])
    assert summary["background_write_seconds"] > 0  # written while the workers went on
    _check_front(tmp_path / "runs" / "search", tmp_path)

"""The search loop: budget, whole CMA generations, Pareto folder in sync, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

import evomerge.evaluate
from evomerge import record
from evomerge._testing import write_family
from evomerge.cli import main
from evomerge.run.api import Search, create
from tests._distance_eval import DistanceEvaluator


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> list[Path]:
    return write_family(tmp_path_factory.mktemp("fam"), 2, seed=11)


@pytest.fixture
def distance_evaluators(monkeypatch, family):
    built = []

    def build(preset, split="validation", **options):
        ev = DistanceEvaluator({"ft0": family[1], "ft1": family[2]})
        built.append(ev)
        return ev

    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", build, raising=False)
    return built


def config(family, tmp_path, **changes) -> Path:
    data = {
        "sources": {"base_model": str(family[0]), "models": [str(family[1]), str(family[2])]},
        "search_space": "task_arithmetic_global",
        "evaluators": [{"preset": "distance"}],
        "objectives": [{"metric": "closeness/ft0"}, {"metric": "closeness/ft1"}],
        "optimizer": {"name": "nsga2", "options": {"population_size": 4}},
        "budget": {"trials": 10},
        "seed": 3,
    }
    data.update(changes)
    p = tmp_path / "search.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def pareto_numbers(run_dir: Path) -> set[int]:
    return {int(p.name) for p in (run_dir / "pareto").iterdir() if not p.name.startswith(".")}


def study_front(run: Search) -> set[int]:
    from evomerge.pareto import ParetoArchive

    study = run.load_study()
    return {t.number for t in ParetoArchive(run.run_dir, run.objectives).front(study.get_trials())}


def test_pareto_folder_equals_the_front_after_every_trial(family, tmp_path, distance_evaluators, monkeypatch):
    run = create(config(family, tmp_path), runs_dir=tmp_path / "runs")
    import evomerge.pareto as P

    checks = []
    real_sync = P.ParetoArchive.sync

    def checked_sync(self, trials, **kw):
        front = real_sync(self, trials, **kw)
        # a member being written lies in a hidden temporary folder until its rename
        on_disk = {int(p.name) for p in self.dir.iterdir() if not p.name.startswith(".")}
        assert on_disk == {t.number for t in front}  # never a partial or stale folder
        for n in on_disk:
            assert (self.dir / str(n) / "model.safetensors").is_file() and (self.dir / str(n) / "config.json").is_file()
        members = json.loads(self.json_path.read_text())["members"]
        assert {m["trial"] for m in members} == on_disk
        checks.append(len(front))
        return front

    monkeypatch.setattr(P.ParetoArchive, "sync", checked_sync)
    summary = run.run(progress=False)
    assert summary["n_complete"] == 10
    assert len(checks) >= 10
    assert pareto_numbers(run.run_dir) == study_front(run)
    # the front is a real trade-off: more than one member, none dominated
    assert len(summary["pareto"]) >= 2
    study = run.load_study()
    first = study.trials[0]
    assert first.user_attrs["baseline"] == "uniform"
    for key in ("recipe", "scores", "merge_seconds", "eval_seconds", "worker_id", "fidelity", "hypervolume"):
        assert key in first.user_attrs
    # scores are stored once: the objective values are read out of them, never stored beside them
    assert not {"objective_values", "objective_scores"} & set(first.user_attrs)
    assert record.objective_values(first, run.objectives) == [first.user_attrs["scores"][m] for m in ("closeness/ft0", "closeness/ft1")]


def test_stored_recipes_rebuild_the_recorded_scores(family, tmp_path, distance_evaluators):
    from transformers import AutoModelForCausalLM

    run = create(config(family, tmp_path, budget={"trials": 6}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    members = json.loads((run.run_dir / "pareto.json").read_text())["members"]
    ev = DistanceEvaluator({"ft0": family[1], "ft1": family[2]})
    for m in members:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(m["recipe"]))
        out = tmp_path / f"merged{m['trial']}"
        assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(out)]) == 0
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        scores = ev.evaluate(model, None)
        assert [scores["ft0"], scores["ft1"]] == [m["values"]["closeness/ft0"], m["values"]["closeness/ft1"]]
        # and the Pareto folder holds the same tensors
        a, b = load_file(str(out / "model.safetensors")), load_file(str(Path(m["path"]) / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("popsize, slots", [(4, 3), (3, 5)])
def test_cma_evaluates_exactly_the_trials_it_asks(family, tmp_path, distance_evaluators, popsize, slots):
    cfg = config(
        family,
        tmp_path,
        search_space="ties_layerwise",
        optimizer={"name": "cma", "options": {"popsize": popsize}},
        scalarization={"kind": "weighted_sum", "weights": [0.5, 0.5]},
        budget={"trials": 1 + 3 * popsize},
        executor={"kind": "serial", "workers": slots},
        baselines=["uniform"],
    )
    run = create(cfg, runs_dir=tmp_path / "runs")
    run.run(progress=False)
    trials = run.load_study().get_trials()
    evaluated = sum(ev.calls for ev in distance_evaluators[1:])  # [0] was built by validation
    assert len(trials) == 1 + 3 * popsize
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert evaluated == len(trials)  # every asked trial evaluated once, none discarded
    gens = [t.user_attrs.get("cma_generation") for t in trials[1:]]
    assert gens == sorted(gens) and set(gens) == {0, 1, 2}


def test_same_config_and_seed_give_the_same_values_twice(family, tmp_path, distance_evaluators):
    values = []
    for name in ("a", "b"):
        run = create(config(family, tmp_path, optimizer={"name": "tpe"}, budget={"trials": 6}), runs_dir=tmp_path / "runs", name=name)
        run.run(progress=False)
        values.append([t.values for t in run.load_study().get_trials()])
    assert values[0] == values[1]


def test_fidelity_prunes_candidates_that_cannot_reach_the_front(family, tmp_path, distance_evaluators):
    cfg = config(family, tmp_path, fidelity={"screen": 0.5, "slack": 0.0}, optimizer={"name": "random"}, budget={"trials": 12})
    run = create(cfg, runs_dir=tmp_path / "runs")
    summary = run.run(progress=False)
    assert summary["n_complete"] + summary["n_pruned"] == 12
    pruned = [t for t in run.load_study().get_trials() if t.state == optuna.trial.TrialState.PRUNED]
    for t in pruned:
        assert "screen_scores" in t.user_attrs


def test_search_on_existing_run_points_to_resume(family, tmp_path, distance_evaluators, capsys):
    cfg = config(family, tmp_path, budget={"trials": 2})
    assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--json"]) == 0
    assert main(["search", str(cfg), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "evomerge resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"search_space": "tie_layerwise"}, "unknown search_spaces preset 'tie_layerwise'"),
        ({"search_space": {"merge_method": "ties", "parameters": {"weight": {"low": 0, "high": 1}, "density": {"low": 0, "high": 2}}}}, "parameters.density: bound: 2.0 is outside [0, 1]"),
        ({"objectives": [{"metric": "closeness/ft9"}]}, "objectives: metric 'closeness/ft9' is produced by no evaluator"),
        ({"optimizer": {"name": "cma"}}, "optimizes one objective"),
        ({"budget": {}}, "budget: set trials, timeout or both"),
        ({"device": "cuda"}, "device: cuda, but this machine has no CUDA device (a serial run merges and scores here)"),
        ({"constraints": [{"metric": "closeness/ft0", "min": 2, "max": 1}]}, "constraints.0: closeness/ft0: min 2 is above max 1; no trial could meet it"),
        ({"constraints": [{"metric": "closeness/ft0"}]}, "constraints.0: closeness/ft0: set min, max or both"),
        ({"fidelity": {"screen": 0}}, "fidelity.screen: limit 0: a count must be at least 1"),  # every trial failed
        ({"evaluators": [{"preset": "distance", "limit": 1.5}]}, "evaluators.0.limit: limit 1.5: expected a whole count"),
        ({"name": "../elsewhere"}, "name: '../elsewhere' is not a plain folder name"),  # the run folder went outside runs/
        ({"evaluators": [{"preset": "distance"}, {"preset": "distance"}]}, "two evaluators are named 'closeness'; give one of them another `name:`"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(family, tmp_path, distance_evaluators, monkeypatch, capsys, changes, message):
    import transformers

    if changes.get("device") == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the check, on any machine

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    code = main(["search", str(config(family, tmp_path, **changes)), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_base_model_without_a_tokenizer_is_named_before_anything_runs(family, tmp_path, distance_evaluators, capsys):
    """The workers load the tokenizer from the base model; evaluate from the folder it scores."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((family[0] / f).read_bytes())
    sources = {"base_model": str(bare), "models": [str(family[1]), str(family[2])]}
    code = main(["search", str(config(family, tmp_path, sources=sources)), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"{bare}: no tokenizer files" in err and "the search loads the tokenizer" in err
    assert not (tmp_path / "runs").exists()
    assert main(["evaluate", str(bare), "--evaluator", "zoo_add"]) == 2
    assert f"{bare}: no tokenizer files" in capsys.readouterr().err


def test_front_members_are_rescored_on_the_holdout_split(family, tmp_path, monkeypatch):
    splits = []

    def build(preset, split="validation", **options):
        splits.append(split)
        ev = DistanceEvaluator({"ft0": family[1], "ft1": family[2]})
        if split == "test":  # a different "data set": scores shifted, so both figures differ
            base = ev.evaluate
            ev.evaluate = lambda m, t, limit=None: {k: v - 0.01 for k, v in base(m, t, limit=limit).items()}
        return ev

    monkeypatch.setattr(evomerge.evaluate, "build_evaluator", build, raising=False)
    cfg = config(family, tmp_path, evaluators=[{"preset": "distance", "holdout_split": "test"}], budget={"trials": 8, "holdout_share": 1})
    run = create(cfg, runs_dir=tmp_path / "runs")
    run.run(progress=False)
    assert "test" in splits
    members = json.loads((run.run_dir / "pareto.json").read_text())["members"]
    for m in members:
        for metric, value in m["values"].items():
            assert m["holdout_values"][metric] == pytest.approx(value - 0.01)


def test_bfloat16_run_scores_and_writes_bfloat16_models(family, tmp_path, distance_evaluators):
    """`dtype: bfloat16`: the live model, the stored recipes and the Pareto folders are bfloat16."""
    run = create(config(family, tmp_path, dtype="bfloat16", budget={"trials": 4}), runs_dir=tmp_path / "runs")
    run.run(progress=False)
    members = json.loads((run.run_dir / "pareto.json").read_text())["members"]
    assert members and all(m["recipe"]["dtype"] == "bfloat16" for m in members)
    for m in members:
        tensors = load_file(str(Path(m["path"]) / "model.safetensors"))
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # scores were computed on a bfloat16 live model: the bfloat16 folder gives them back exactly
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(members[0]["path"], dtype=torch.bfloat16)
    scores = DistanceEvaluator({"ft0": family[1], "ft1": family[2]}).evaluate(model, None)
    assert [scores["ft0"], scores["ft1"]] == [members[0]["values"]["closeness/ft0"], members[0]["values"]["closeness/ft1"]]

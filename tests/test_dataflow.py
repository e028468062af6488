"""Data-flow search (issue 21): routed models equal their exported folders, the space's
encoding, and a data-flow run that survives kill -9, shows in status and exports."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.dataflow import DataFlowSpace, build_space
from evomerge.errors import ConfigError, MergeError
from evomerge.merge import merge
from evomerge.merge.chain import RecipeChain, load_recipe
from evomerge.merge.routed import Router, shared_weights
from evomerge.merge.slices import SliceRecipe

SKILLS = ("add", "sort", "count")


@pytest.fixture(scope="module")
def zoo_models(zoo):
    from transformers import AutoModelForCausalLM

    refs = [str(zoo.base)] + [str(zoo.models[s]) for s in SKILLS]
    return {r: AutoModelForCausalLM.from_pretrained(r, dtype=torch.float32).eval() for r in refs}


def _random_stack(rng: random.Random, refs: list[str], depth: int) -> SliceRecipe:
    slices = []
    for _ in range(rng.randint(2, 5)):  # repeats, skips and mixed models come by chance
        a = rng.randrange(depth)
        src = {"model": rng.choice(refs), "layer_range": [a, rng.randint(a + 1, depth)]}
        if rng.random() < 0.5:
            s = round(rng.uniform(0.4, 1.6), 4)
            src["parameters"] = {"scale": [{"filter": "o_proj", "value": s}, {"filter": "down_proj", "value": s}]}
        slices.append({"sources": [src]})
    return SliceRecipe.from_dict({"merge_method": "passthrough", "slices": slices, "dtype": "float32"})


def test_routed_zoo_paths_give_their_exported_folders_logits(zoo_models, tmp_path):
    """Acceptance 1: random paths; the routed model (weights shared, nothing copied) and the
    folder `evomerge merge` writes from the recipe agree within 1e-5, with a KV cache too."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.size import written_params

    router = Router(zoo_models)
    refs = list(zoo_models)
    rng = random.Random(21)
    ids = torch.randint(4, 60, (3, 20), generator=torch.Generator().manual_seed(0))
    depths = set()
    for k in range(4):
        recipe = _random_stack(rng, refs, 4)
        live = router.route(recipe)
        assert shared_weights(live, zoo_models)
        with torch.no_grad():
            routed = live(ids).logits
        merge(recipe.to_dict(), tmp_path / str(k))
        folder = AutoModelForCausalLM.from_pretrained(tmp_path / str(k), dtype=torch.float32).eval()
        assert folder.config.num_hidden_layers == recipe.depth
        with torch.no_grad():
            expected = folder(ids).logits
        # relative to the largest logit, as the mergekit parity measures (a scaled weight
        # and a scaled branch output differ in the last float32 bits)
        assert (routed - expected).abs().max().item() / expected.abs().max().item() < 1e-5
        g = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(live.generate(ids[:1], **g), folder.generate(ids[:1], **g))  # one cache entry per slot
        assert written_params(live) == sum(p.numel() for p in folder.parameters())
        depths.add(recipe.depth)
    assert max(depths) > 4  # some path was deeper than the sources (a layer ran twice)


def test_a_chain_routes_through_the_live_parameter_merge(zoo, zoo_models, tmp_path):
    """The joint candidate: its parameter merge in the live model, then routed through."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import MergeEngine

    space = build_space("dataflow_joint", base_model=str(zoo.base), models=[str(zoo.models[s]) for s in SKILLS], num_layers=4)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    params = study.ask(space.distributions()).params
    params.update({"source/P0/B0": 0, "source/P0/B1": 2})  # merged first, a source last
    chain = space.to_recipe(params)
    assert isinstance(chain, RecipeChain) and chain.final.first_model == "merged" and chain.final.depth == 4
    assert load_recipe(chain.to_yaml()).to_dict() == chain.to_dict()  # mergekit-multi YAML, read back
    live = AutoModelForCausalLM.from_pretrained(zoo.base, dtype=torch.float32).eval()
    MergeEngine.from_recipe(chain.stages[0]).merge_into(live, chain.stages[0])
    router = Router(zoo_models)
    router.add("merged", live)
    ids = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routed = router.route(chain.final)(ids).logits
    merge(chain.to_dict(), tmp_path / "out")
    folder = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = folder(ids).logits
    assert (routed - expected).abs().max().item() / expected.abs().max().item() < 1e-5
    assert "---" in (tmp_path / "out" / "merge_recipe.yaml").read_text()


def test_the_space_is_fixed_size_numeric_and_decodes_its_own_recipes():
    from evomerge.optimize._unit_cube import UnitCube

    space = build_space("dataflow_upscale", base_model="z/base", models=["z/add", "z/sort"], num_layers=4)
    assert isinstance(space, DataFlowSpace)
    dists = space.distributions()
    assert len(dists) == 2 * 4 + 2 * 2 * 2  # keep per slot; source and scale per block of 2, per pass
    cube = UnitCube(dists)  # CMA-ES takes it: integers and floats only
    rng = __import__("numpy").random.default_rng(0)
    for _ in range(20):
        params = cube.to_params(rng.uniform(size=cube.dim))
        recipe = space.to_recipe(params)
        assert 1 <= recipe.depth <= 8
        layers = [s.layer for s in recipe.slots()]
        assert sum(b <= a for a, b in zip(layers, layers[1:])) <= 1  # ascending within each of 2 passes
        assert space.to_recipe(space.params_from_recipe(recipe)).to_dict() == recipe.to_dict()
    empty = {k: (0 if k.startswith("keep/") else v) for k, v in space.uniform_params().items()}
    assert space.to_recipe(empty).depth == 1  # min_layers: the first pass's first slot
    full = space.to_recipe(space.uniform_params())
    assert [(s.model, s.layer) for s in full.slots()] == [("z/base", j) for j in range(4)]
    with pytest.raises(ConfigError, match="sources: 'nope' is not a source"):
        build_space({"kind": "dataflow", "sources": ["nope"]}, base_model="z/base", models=["z/add"], num_layers=4)


def test_skip_false_keeps_the_first_pass_whole_and_the_joint_space_starts_at_the_parameter_merge():
    from evomerge.space import SearchSpace

    models = ["z/add", "z/sort"]
    space = build_space("dataflow_joint", base_model="z/base", models=models, num_layers=4)
    inner = SearchSpace.from_yaml("task_arithmetic_global", base_model="z/base", models=models, num_layers=4)
    dists = space.distributions()
    assert not [k for k in dists if k.startswith("keep/")]  # no pass-0 keep dimensions
    assert [k for k in dists if k.startswith("source/")] == ["source/P0/B0", "source/P0/B1"]
    start = space.to_recipe(space.uniform_params())  # the parameter search's uniform merge, at full depth
    assert start.stages[0].to_dict() == inner.to_recipe(inner.uniform_params()).model_copy(update={"name": "merged"}).to_dict()
    assert [(s.model, s.layer) for s in start.final.slots()] == [("merged", j) for j in range(4)]
    for point in ({**space.uniform_params(), "source/P0/B1": 2},):
        assert space.params_from_recipe(space.to_recipe(point)) == point
    two = build_space({"kind": "dataflow", "passes": 2, "skip": False}, base_model="z/base", models=models, num_layers=4)
    assert sorted(k for k in two.distributions() if k.startswith("keep/")) == [f"keep/P1/L{j:02d}" for j in range(4)]
    short = SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": "z/add", "layer_range": [0, 3]}]}]})
    with pytest.raises(ConfigError, match="first pass must run all 4 layers"):
        two.params_from_recipe(short)


def test_bad_stacks_fail_with_one_line(zoo_models):
    with pytest.raises(ConfigError, match="exactly one source per slice"):
        SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [
            {"model": "a", "layer_range": [0, 1]}, {"model": "b", "layer_range": [0, 1]}]}]})
    with pytest.raises(ConfigError, match="layer_range"):
        SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 2]}]}]})
    ref = next(iter(zoo_models))
    with pytest.raises(ConfigError, match="has 4 layers"):
        Router(zoo_models).route(SliceRecipe.from_dict({"merge_method": "passthrough", "slices": [{"sources": [{"model": ref, "layer_range": [3, 6]}]}]}))
    with pytest.raises(MergeError, match="scales layer branches only"):
        Router(zoo_models).route(SliceRecipe.from_dict({"merge_method": "passthrough", "parameters": {"scale": 0.5},
                                                        "slices": [{"sources": [{"model": ref, "layer_range": [0, 2]}]}]}))


SCORE_FN = '''
import torch

def score(model, tokenizer, limit=None):
    """How close the model's next-token distribution is to the count specialist's (fixed inputs)."""
    ids = torch.arange(4, 36).reshape(2, 16)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits, -1)
    return {"agree": float(logp.max(-1).values.mean())}
'''


def _config(zoo, tmp_path: Path, trials: int) -> Path:
    (tmp_path / "score.py").write_text(SCORE_FN)
    data = {
        "sources": {"base_model": str(zoo.base), "models": [str(zoo.models[s]) for s in ("add", "count")]},
        "search_space": "dataflow_upscale",
        "evaluators": [{"preset": "python", "name": "probe", "options": {"function": "score.py:score", "metrics": {"agree": "maximize"}}},
                       {"preset": "size"}],
        "objectives": [{"metric": "probe/agree"}, {"metric": "size/layers", "direction": "minimize"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": trials},
        "seed": 5,
    }
    path = tmp_path / "dataflow.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _complete(run_dir: Path) -> int:
    from evomerge.run.handle import Run

    try:
        study = Run.open(run_dir).study()
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())


def _dashboard_get(app, path: str) -> dict:
    """One GET answered by the dashboard's WSGI app (the one `evomerge dashboard` serves)."""
    from wsgiref.util import setup_testing_defaults

    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    answer: dict = {}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: answer.update(status=status)))
    assert answer["status"].startswith("200"), (path, answer["status"], body[:300])
    return json.loads(body)


def test_a_dataflow_run_resumes_after_kill_9_shows_in_status_and_dashboard_and_exports(zoo, tmp_path):
    """Acceptance 4: the driver, status, dashboard and export are the ones of every run. The
    search is a CLI process killed with SIGKILL; resume, status and export run in process
    (the same library functions the CLI verbs are a few lines over)."""
    from optuna_dashboard import wsgi
    from transformers import AutoModelForCausalLM

    from evomerge.export import export
    from evomerge.run.api import resume
    from evomerge.run.handle import Run
    from evomerge.status import status as run_status

    trials = 8
    cfg = _config(zoo, tmp_path, trials=trials)
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "dataflow"
    env = dict(os.environ, EVOMERGE_LEASE_TIMEOUT="1.0")
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--runs-dir", str(runs), "--json"], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _complete(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _complete(run_dir)
    assert 3 <= killed_at < trials
    time.sleep(1.0)  # the killed driver's lease expires
    resume(run_dir, progress=False, lease_timeout=1.0)
    summary = run_status(run_dir)
    assert summary["n_complete"] == trials and summary["n_running"] == 0
    members = summary["pareto"]
    assert members and all(len(m["values"]) == 2 for m in members)
    # the dashboard serves it: the study, its trials with their data-flow parameters
    app = wsgi(Run.open(run_dir).storage())
    listed = _dashboard_get(app, "/api/studies")["study_summaries"]
    (study_id,) = [st["study_id"] for st in listed if st["study_name"] == "dataflow"]
    detail = _dashboard_get(app, f"/api/studies/{study_id}")
    done = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(done) == trials and any(p["name"].startswith("keep/P1/") for p in done[0]["params"])
    member = max(members, key=lambda m: m["values"][0])
    out = tmp_path / "exported"
    export(run_dir, member["trial"], out)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(Path(member["path"]) / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    recipe = load_recipe(out / "merge_recipe.yaml")
    assert isinstance(recipe, SliceRecipe)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.num_hidden_layers == recipe.depth == member["values"][1]
    # the member's folder is what `evomerge merge` makes of its recipe
    merge(out / "merge_recipe.yaml", tmp_path / "rebuilt")
    c = load_file(str(tmp_path / "rebuilt" / "model.safetensors"))
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)


def test_bench_dataflow_seeds_every_one_layer_drop_and_refuses_a_single_objective_pruning_search(zoo_dir, tmp_path, capsys):
    from evomerge.bench.dataflow import _pruning_seeds
    from evomerge.cli import main

    space = build_space("dataflow_prune", base_model="z/base", models=["z/add"], num_layers=4)
    seeds = _pruning_seeds([Path("z/add")], 4, tmp_path / "seeds") + _pruning_seeds([Path("z/base")], 4, tmp_path / "seeds", full=False)
    points = [space.params_from_recipe(load_recipe(p)) for p in seeds]
    kept = sorted((p["source/P0/all"], tuple(p[f"keep/P0/L{j:02d}"] for j in range(4))) for p in points)
    drops = [tuple(int(j != d) for j in range(4)) for d in range(4)]
    assert kept == sorted([(1, (1, 1, 1, 1))] + [(s, d) for s in (0, 1) for d in drops])  # each 3-layer path of one model
    assert main(["bench", "dataflow", "--zoo", str(zoo_dir), "--optimizer", "cma", "--parts", "prune", "--trials", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two objectives" in err[0]

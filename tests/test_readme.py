"""The README runs as written.

- Every ```bash block preceded by ``<!-- runnable -->`` (or ``<!-- runnable: after the
  demo -->``) runs with bash in a work folder holding ``zoo/`` (the session's zoo),
  a copy of ``examples/`` and, after the demo, a copy of the demo's ``runs/demo``.
- A block preceded by ``<!-- file: PATH -->`` is that file of the repository, verbatim.
- Every YAML run config in it validates (hub ids replaced by the zoo's local models);
  search spaces, recipes and evaluator snippets are checked the same way.
- Every ``--help`` describes every option.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```", re.S | re.M)

pytestmark = pytest.mark.timeout(600)


def blocks(lang: str) -> list[tuple[str, str]]:
    return [(m["mark"] or "", m["body"]) for m in BLOCK.finditer(README) if m["lang"] == lang]


@pytest.fixture
def workspace(tmp_path, zoo_dir) -> Path:
    (tmp_path / "zoo").symlink_to(zoo_dir)
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # ../zoo in them is this folder's zoo
    return tmp_path


def run_block(body: str, cwd: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"README block failed:\n{body}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"


def test_runnable_blocks_run(workspace):
    runnable = [body for mark, body in blocks("bash") if mark == "runnable"]
    assert len(runnable) >= 2  # the zoo search and the merge recipe
    for body in runnable:
        run_block(body, workspace)
    assert (workspace / "merged" / "model.safetensors").is_file()
    assert (workspace / "runs" / "zoo-two-skills" / "pareto.json").is_file()


def test_tour_after_the_demo_runs(workspace, demo_run):
    runs, _ = demo_run
    shutil.copytree(runs, workspace / "runs")
    [tour] = [body for mark, body in blocks("bash") if mark == "runnable: after the demo"]
    run_block(tour, workspace)
    assert (workspace / "my-merge" / "model.safetensors").is_file()
    import json

    status = (workspace / "runs" / "demo" / "status.txt").read_text()
    assert "complete" in status
    assert json.loads((workspace / "runs" / "demo" / "pareto.json").read_text())["members"]


def test_file_blocks_equal_the_files():
    files = [(mark.split(":", 1)[1].strip(), body) for mark, body in blocks("yaml") if mark.startswith("file:")]
    assert files, "the README shows examples/hf_llama.yaml"
    for path, body in files:
        assert (ROOT / path).read_text() == body, f"README's copy of {path} differs from the file"


def local_sources(data: dict, zoo: Path) -> dict:
    """The config with hub ids replaced by zoo models (same architecture for all): offline."""
    models = [zoo / "reverse", zoo / "count", zoo / "add", zoo / "sort"]
    sources = dict(data["sources"])
    if sources.get("base_model"):
        sources["base_model"] = str(zoo / "base")
    sources["models"] = [str(m) for m in models[: len(sources["models"])]]
    return dict(data, sources=sources)


def test_run_configs_validate(workspace, zoo_dir):
    from evomerge.run.api import create

    configs = [(mark, yaml.safe_load(body)) for mark, body in blocks("yaml")]
    configs = [(mark, d) for mark, d in configs if isinstance(d, dict) and "sources" in d and "objectives" in d]
    assert len(configs) >= 2  # the reference and the Hugging Face example
    for i, (mark, data) in enumerate(configs):
        folder = workspace / "examples" if mark.startswith("file:") else workspace  # paths are relative to the file
        if any("/" in m and not Path(workspace, m).exists() for m in data["sources"]["models"]):
            data = local_sources(data, zoo_dir)  # hub ids: offline here
        path = folder / f"readme_config_{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        run = create(path, runs_dir=workspace / "runs", name=f"readme{i}")  # validates, loads no model
        assert [o.metric for o in run.objectives] == [o["metric"] for o in data["objectives"]]


def test_search_space_recipe_and_evaluator_snippets(workspace, zoo_dir):
    from evomerge.merge.recipe import Recipe
    from evomerge.space import SearchSpace

    snippets = [yaml.safe_load(body) for _, body in blocks("yaml")]
    spaces = [d for d in snippets if isinstance(d, dict) and "merge_method" in d and "models" not in d]
    recipes = [d for d in snippets if isinstance(d, dict) and "merge_method" in d and "models" in d]
    assert len(spaces) >= 2 and recipes
    for data in spaces:
        models = [str(zoo_dir / "reverse")] if data["merge_method"] == "slerp" else [str(zoo_dir / "reverse"), str(zoo_dir / "count")]
        space = SearchSpace.from_dict(data, base_model=str(zoo_dir / "base"), models=models, num_layers=4, where="README")
        assert space.to_recipe(space.center()).merge_method == data["merge_method"]
    for data in recipes:
        Recipe.from_dict(data, where="README")  # hub ids are not fetched to parse a recipe


def test_python_evaluator_example_searches(workspace, zoo_dir):
    """The README's `my_scores.py` and its run-config snippet, in a real two-trial search."""
    from evomerge.run.api import create

    [code] = [body for _, body in blocks("python") if body.startswith("# my_scores.py")]
    (workspace / "my_scores.py").write_text(code)
    snippet = next(yaml.safe_load(b) for _, b in blocks("yaml") if "my_scores.py" in b)
    data = {
        "sources": {"base_model": "zoo/base", "models": ["zoo/reverse", "zoo/count"]},
        "search_space": "task_arithmetic_global",
        "budget": {"trials": 2},
        **snippet,
    }
    (workspace / "mine.yaml").write_text(yaml.safe_dump(data))
    summary = create(workspace / "mine.yaml", runs_dir=workspace / "runs").run(progress=False)
    assert summary["n_complete"] == 2 and summary["n_failed"] == 0
    assert all(v[0] < 0 for v in (m["values"] for m in summary["pareto"]))  # a negative loss


def test_every_help_describes_every_option():
    parser = build_parser()
    seen = []

    def walk(p, name):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
                continue
            if action.dest == "help":
                continue
            assert action.help and len(action.help.strip()) >= 8, f"`{name}`: option {action.option_strings or action.dest} has no help"
            seen.append(name)
        assert p.description or name == "evomerge", f"`{name} --help` has no description"

    walk(parser, "evomerge")
    verbs = {n.split()[1] for n in seen if " " in n}
    assert {"merge", "search", "resume", "status", "export", "dashboard", "demo", "zoo", "evaluate", "bench", "align", "interpolate"} <= verbs

"""`evomerge merge`: a good recipe gives a loadable folder; bad input gives one line, exit 2, no folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge._testing import llama_config, write_family
from evomerge.cli import main

REPO = Path(__file__).resolve().parents[1]

TIES = """merge_method: ties
base_model: {root}/base
models:
  - {{model: {root}/ft0, parameters: {{weight: [0.3, 0.7], density: 0.5}}}}
  - {{model: {root}/ft1, parameters: {{weight: 0.5, density: {density}}}}}
dtype: float32
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fam")
    write_family(root, 2, seed=3)
    return root


def write_recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_merge_writes_a_folder_transformers_loads(family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, _ = run_cli(["merge", str(write_recipe(tmp_path, TIES.format(root=family, density=0.5))), "--out", str(out)], capsys)
    assert code == 0 and "merged" in stdout
    assert {"model.safetensors", "config.json", "merge_recipe.yaml", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tok("1+2=", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    # the copied recipe rebuilds the same model
    code, _, _ = run_cli(["merge", str(out / "merge_recipe.yaml"), "--out", str(tmp_path / "again")], capsys)
    assert code == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "ties" in (out / "README.md").read_text()


def test_sharded_sources_and_outputs(family, tmp_path):
    """A model written in shards (with an index) reads back as a source, same tensors."""
    from evomerge.merge import MergeEngine, Recipe

    recipe = Recipe.from_yaml(TIES.format(root=family, density=0.5))
    engine = MergeEngine.from_recipe(recipe)
    summary = engine.write(recipe, tmp_path / "sharded", shard_bytes=20_000)
    assert summary["n_shards"] > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == summary["n_shards"]
    engine.write(recipe, tmp_path / "single")
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    # merge the sharded output with itself through a passthrough: reads the index
    p = Recipe.from_dict({"merge_method": "passthrough", "models": [{"model": str(tmp_path / "sharded")}]})
    MergeEngine.from_recipe(p).write(p, tmp_path / "copy")
    copy = load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert set(copy) == set(single) and all(torch.equal(copy[k], single[k]) for k in single)


def _shape_mismatch(family: Path, tmp: Path) -> str:
    bad = tmp / "wide"
    write_family(bad, 1, seed=9, cfg=llama_config(hidden=48, heads=4), tokenizer=False)
    return TIES.format(root=family, density=0.5).replace(f"{family}/ft1", f"{bad}/ft0")


def _truncated(family: Path, tmp: Path) -> str:
    broken = tmp / "broken"
    shutil.copytree(family / "ft1", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return TIES.format(root=family, density=0.5).replace(f"{family}/ft1", str(broken))


def _pickle(family: Path, tmp: Path) -> str:
    pk = tmp / "pickled"
    shutil.copytree(family / "ft1", pk)
    torch.save(load_file(str(pk / "model.safetensors")), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    return TIES.format(root=family, density=0.5).replace(f"{family}/ft1", str(pk))


BAD = {
    "missing path": (lambda f, t: TIES.format(root=f, density=0.5).replace(f"{f}/ft1", f"{f}/nope"), "model not found: "),
    "mismatched shapes": (_shape_mismatch, "shape mismatch at tensor lm_head.weight"),
    "unknown method": (lambda f, t: TIES.format(root=f, density=0.5).replace("ties", "tiez"), "unknown merge method 'tiez'"),
    "density outside [0,1]": (lambda f, t: TIES.format(root=f, density=1.5), "density: 1.5 is outside [0, 1]"),
    "empty model list": (lambda f, t: "merge_method: linear\nmodels: []\n", "the model list is empty"),
    "malformed YAML": (lambda f, t: "merge_method: ties\nmodels: [ {model: a\n", "malformed YAML at line"),
    "truncated safetensors": (_truncated, "not a readable safetensors file"),
    "pickle without flag": (_pickle, "pickle checkpoint refused"),
    "linear weights summing to 0": (
        lambda f, t: f"merge_method: linear\nmodels:\n  - {{model: {f}/ft0, parameters: {{weight: 0.5}}}}\n  - {{model: {f}/ft1, parameters: {{weight: -0.5}}}}\n",
        "the weights of tensor lm_head.weight sum to 0, and normalize divides by their sum",  # the output would be all nan
    ),
    "linear without weights": (
        lambda f, t: f"merge_method: linear\nmodels:\n  - {{model: {f}/ft0}}\n  - {{model: {f}/ft1}}\n",
        "missing required parameter 'weight' for model",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_no_output(case, family, tmp_path, capsys):
    make, expected = BAD[case]
    recipe = write_recipe(tmp_path, make(family, tmp_path))
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["merge", str(recipe), "--out", str(out)], capsys)
    assert code == 2
    assert expected in stderr
    if case == "mismatched shapes":
        assert "has [48, 32]" in stderr and "has [48, 48]" in stderr  # both shapes
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder either


def test_pickle_with_flag_merges_like_safetensors(family, tmp_path, capsys):
    recipe = write_recipe(tmp_path, _pickle(family, tmp_path))
    code, _, err = run_cli(["merge", str(recipe), "--out", str(tmp_path / "p"), "--allow-pickle"], capsys)
    assert code == 0, err
    code, _, _ = run_cli(["merge", str(write_recipe(tmp_path, TIES.format(root=family, density=0.5))), "--out", str(tmp_path / "s")], capsys)
    a, b = load_file(str(tmp_path / "p" / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_is_refused_then_replaced_with_overwrite(family, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = write_recipe(tmp_path, TIES.format(root=family, density=0.5))
    code, _, err = run_cli(["merge", str(recipe), "--out", str(out)], capsys)
    assert code == 2 and "is not empty" in err and (out / "keep.txt").exists()
    code, _, _ = run_cli(["merge", str(recipe), "--out", str(out), "--overwrite"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_interrupted_write_leaves_nothing(family, tmp_path, monkeypatch):
    from evomerge.merge import MergeEngine, Recipe

    recipe = Recipe.from_yaml(TIES.format(root=family, density=0.5))
    engine = MergeEngine.from_recipe(recipe)
    calls = {"n": 0}
    real = engine._merge_tensor

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(engine, "_merge_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        engine.write(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_console_script_exit_code(family, tmp_path):
    recipe = write_recipe(tmp_path, TIES.format(root=family, density=-0.2))
    exe = Path(sys.executable).parent / "evomerge"
    proc = subprocess.run([str(exe), "merge", str(recipe), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"evomerge merge: error: {recipe}: models[1].parameters.density: -0.2 is outside [0, 1]"
    ]


def test_output_and_run_folders_under_a_file_fail_before_any_work(family, tmp_path, capsys):
    """A file where a folder must go is one line and exit 2, for every verb that writes folders."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    recipe = write_recipe(tmp_path, TIES.format(root=family, density=0.5))
    cases = [
        (["merge", str(recipe), "--out", str(blocker)], "output"),
        (["merge", str(recipe), "--out", str(blocker / "merged")], "output"),
        (["search", str(REPO / "examples" / "zoo_two_skills.yaml"), "--runs-dir", str(blocker)], "--runs-dir"),
        (["demo", "--runs-dir", str(blocker / "runs")], "--runs-dir"),
        (["bench", "merge", "--workdir", str(blocker)], "--workdir"),
        (["bench", "align", "--search", "--workdir", str(blocker / "w")], "--workdir"),
    ]
    for argv, what in cases:
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and err.startswith(f"evomerge {argv[0]}: error: {what} ") and "is a file, not a folder" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "recipe.yaml"] and blocker.read_text() == "mine"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["zoo", "{tmp}/zoo", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["zoo", "{tmp}/zoo", "--set", "validation_size=100000"], "skill 'add' has too few distinct inputs for train 5000 + validation 100000 + test 500 examples"),
        (["search", str(REPO / "examples" / "zoo_two_skills.yaml"), "--trials", "0", "--runs-dir", "{tmp}/runs"], "--trials must be at least 1, got 0"),
        (["bench", "merge", "--params", "0", "--workdir", "{tmp}/w"], "--params must be at least 1, got 0"),
        (["bench", "merge", "--threads", "0", "--workdir", "{tmp}/w"], "--threads must be at least 1, got 0"),
        (["bench", "align", "--steps", "2", "--zoo", "{tmp}/zoo"], "--steps must be at least 3, got 2"),
        (["interpolate", "{tmp}/a", "{tmp}/b", "--evaluator", "zoo_add", "--steps", "1"], "--steps must be at least 3, got 1"),
        (["bench", "evaluate", "--skill", "fly", "--zoo", "{tmp}/zoo"], "--skill: 'fly' is not a zoo skill"),
        (["bench", "align", "--limit", "0", "--zoo", "{tmp}/zoo"], "--limit must be at least 1, got 0"),
        (["bench", "search", "--limit", "-1", "--zoo", "{tmp}/zoo"], "--limit must be at least 1, got -1"),
        (["search", str(REPO / "examples" / "zoo_two_skills.yaml"), "--timeout", "-5", "--runs-dir", "{tmp}/runs"], "--timeout must be more than 0 seconds, got -5"),
        (["resume", "{tmp}/runs/x", "--timeout", "0"], "--timeout must be more than 0 seconds, got 0"),
        (["search", str(REPO / "examples" / "zoo_two_skills.yaml"), "--name", "a/b", "--runs-dir", "{tmp}/runs"], "--name 'a/b' is not a plain folder name"),
        (["bench", "align", "--alphas", "0,2", "--zoo", "{tmp}/zoo"], "--alphas: alpha must be between 0 and 1, got 2.0"),
        (["bench", "merge", "--methods", "linear,tie", "--workdir", "{tmp}/w"], "--methods: unknown merge method 'tie'"),
        (["bench", "quality", "--optimizers", "nsga2,bayes", "--zoo", "{tmp}/zoo"], "--optimizers: unknown optimizer 'bayes' (known: cma,"),
        (["bench", "quality", "--optimizers", "cma,cma", "--zoo", "{tmp}/zoo"], "--optimizers: cma is named twice"),
        (["bench", "search", "--optimizer", "bayes", "--zoo", "{tmp}/zoo"], "--optimizer: unknown optimizer 'bayes'"),
        (["bench", "merge", "--methods", "linear,linear", "--workdir", "{tmp}/w"], "--methods: linear is named twice"),
        (["bench", "search", "--workers", "1,1", "--zoo", "{tmp}/zoo"], "--workers: expected different worker counts of at least 1, got 1,1"),
        (["bench", "search", "--workers", "1.5", "--zoo", "{tmp}/zoo"], "--workers: expected comma-separated whole numbers, got '1.5'"),
        (["bench", "search", "--cpus-per-worker", "0", "--zoo", "{tmp}/zoo"], "--cpus-per-worker must be more than 0, got 0"),
        (["bench", "search", "--memory-params", "-5", "--zoo", "{tmp}/zoo"], "--memory-params must be 0 (skip the memory probe) or a model size"),
        (["align", "--reference", "{tmp}/a", "--model", "{tmp}/b", "--alphas", "", "--out", "{tmp}/o"], "--alphas: the alpha grid is empty"),
        (["align", "--reference", "{tmp}/a", "--model", "{tmp}/b", "--alphas", "0,1.5", "--out", "{tmp}/o"], "--alphas: alpha must be between 0 and 1, got 1.5"),
        (["align", "--reference", "{tmp}/a", "--model", "{tmp}/b", "--method", "weight", "--alphas", "0,1", "--out", "{tmp}/o"], "--alphas applies to --method mudsc only"),
        (["align", "--reference", "{tmp}/a", "--model", "{tmp}/b", "--alpha", "0.5", "--alphas", "0,1", "--out", "{tmp}/o"], "--alphas applies when --alpha is not given"),
    ],
)
def test_counts_below_their_minimum_fail_before_any_work(argv, words, tmp_path, capsys):
    code, _, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # no zoo built, no run folder, no work folder


def _hub_error(cls, message: str):
    exc = cls.__new__(cls)  # their constructors want an HTTP response
    Exception.__init__(exc, message)
    return exc


@pytest.mark.parametrize(
    "name, words",
    [
        ("GatedRepoError", "the hub repository is gated: accept its terms on huggingface.co, then log in"),
        ("RepositoryNotFoundError", "the hub has no such repository, or it is private"),
        ("LocalEntryNotFoundError", "the hub cannot be reached and the model is not in the local cache (offline?); pass a local folder"),
    ],
)
def test_a_hub_id_that_cannot_be_downloaded_says_why(name, words, family, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    def fail(repo_id, **_):
        raise _hub_error(getattr(errors, name), f"{name} for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: org/model-x\n  - model: {family / 'ft0'}\n")
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evomerge merge: error: model not found: org/model-x is not a local folder; ") and words in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_bench_merge_has_a_valid_recipe_for_every_method():
    """`bench merge --methods M` works for every registered method (passthrough took 3 models)."""
    from evomerge.bench.merge import example_recipe
    from evomerge.merge.methods import METHODS

    for name in METHODS:
        recipe = example_recipe(name, "base", ["ft0", "ft1", "ft2"])
        again = example_recipe(name, "base", ["ft0", "ft1", "ft2"], variant=1)
        assert recipe.merge_method == name and METHODS[name].traffic(3) >= 2
        assert recipe.to_dict() != again.to_dict() or name in ("model_stock", "passthrough")  # a new candidate


def test_bench_merge_makes_its_workdir_and_leaves_it_empty(tmp_path, capsys):
    workdir = tmp_path / "new" / "deeper"  # did not exist: a FileNotFoundError traceback
    argv = ["bench", "merge", "--params", "200000", "--methods", "linear", "--repeats", "1", "--workdir", str(workdir), "--json"]
    assert main(argv + ["--dtypes", "bfloat16", "--no-first-merge"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(m["method"], m["dtype"]) for m in result["methods"]] == [("linear", "bfloat16")] and result["methods"][0]["ratio"] > 0
    assert workdir.is_dir() and list(workdir.iterdir()) == []  # the synthetic family was a temp folder inside it

"""`bench search --real`: evomerge's search against the loop a user writes around mergekit-yaml.

The real family and mergekit's own environment are the benchmark's, not the suite's: here
the loop runs on a zoo search with `evomerge merge` standing in for mergekit-yaml (the same
recipe files, the same command-line shape), and the CLI's checks run without either.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main


def _stand_in(tmp_path: Path) -> Path:
    """An executable taking mergekit-yaml's arguments (recipe, out, flags) and merging with evomerge."""
    path = tmp_path / "mergekit-yaml"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} -m evomerge.cli merge "$1" --out "$2" >/dev/null\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_the_loop_merges_the_searchs_recipes_and_scores_them_alike(zoo, tmp_path):
    """Each recipe the search scored is written as YAML, merged to disk by the command,
    loaded and scored by the same evaluators: the same scores, the folder gone after."""
    from evomerge.bench.search_real import _mergekit_loop
    from evomerge.run.api import create

    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump({
        "sources": {"base_model": str(zoo.base), "models": [str(zoo.models[s]) for s in ("add", "reverse")]},
        "search_space": "ties_layerwise",
        "evaluators": [{"preset": zoo.preset(s), "name": s, "split": "validation", "limit": 40} for s in ("add", "reverse")],
        "objectives": [{"metric": "add/accuracy"}, {"metric": "reverse/accuracy"}],
        "optimizer": {"name": "random"}, "budget": {"trials": 3}, "seed": 0, "executor": {"kind": "serial"},
    }))  # fmt: skip
    run = create(cfg, runs_dir=tmp_path / "runs", name="r")
    run.run(progress=False)
    loop = _mergekit_loop(run.run_dir, tmp_path / "loop", _stand_in(tmp_path), 2, progress=False)
    assert loop["candidates"] == 2 and [r["trial"] for r in loop["rows"]] == [0, 1]
    assert loop["max_score_difference"] == 0.0  # same recipe, same merge math, same evaluators
    assert set(loop["rows"][0]["scores"]) == {"add/accuracy", "reverse/accuracy"}
    for r in loop["rows"]:
        assert r["mergekit_seconds"] > 0 and r["load_seconds"] > 0 and r["eval_seconds"] > 0
        assert r["seconds"] >= r["mergekit_seconds"] + r["load_seconds"] + r["eval_seconds"]
    assert loop["candidates_per_hour"] == pytest.approx(3600 * 2 / loop["seconds"])
    assert 0 < loop["outside_fraction"] < 1
    recipe = yaml.safe_load((tmp_path / "loop" / "candidate_0.yaml").read_text())
    assert recipe["merge_method"] == "ties" and "random_seed" not in recipe
    assert not [p for p in (tmp_path / "loop").iterdir() if p.is_dir()]  # merged folders deleted

    with pytest.raises(RuntimeError, match="the search scored 3 candidates; the loop needs 5"):
        _mergekit_loop(run.run_dir, tmp_path / "loop", _stand_in(tmp_path), 5, progress=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mergekit", "nowhere/mergekit-yaml"], "--mergekit: nowhere/mergekit-yaml is not an executable mergekit-yaml (`make parity` installs"),
        (["--loop-candidates", "5", "--trials", "4"], "--loop-candidates (5) must not exceed --trials (4)"),
        (["--workers", "1,2"], "--workers: one worker count with --real, got 1,2"),
        (["--limit", "0"], "--limit must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    mergekit = ["--mergekit", str(_stand_in(tmp_path))] if "--mergekit" not in extra else []
    assert main(["bench", "search", "--real", str(tmp_path / "family"), *mergekit, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_the_demo_zoo_is_not_a_real_family(zoo_dir, tmp_path, capsys):
    assert main(["bench", "search", "--real", str(zoo_dir), "--mergekit", str(_stand_in(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--real: {zoo_dir} holds no complete real family (build it with `evomerge zoo --real" in err


def test_table_states_the_ratio_and_both_targets():
    from evomerge.bench.search_real import format_table

    result = {
        "family": "real_zoo", "skills": ["french", "roman", "german"], "search_space": "ties_blockwise", "optimizer": "cma",
        "limit": 50, "cpu_count": 2, "ratio": 6.4,
        "evomerge": {"workers": 2, "threads_per_worker": 1, "candidates": 24, "candidates_per_hour": 640.0, "merge_seconds": 19.2,
                     "busy_seconds": 300.0, "outside_fraction": 0.06, "members_written": 20, "other_cpu_fraction": 0.02},
        "mergekit_loop": {"candidates": 4, "threads": 2, "candidates_per_hour": 100.0, "mergekit_seconds": 30.0, "load_seconds": 0.5,
                          "eval_seconds": 5.5, "outside_fraction": 0.85, "max_score_difference": 0.0},
    }  # fmt: skip
    table = format_table(result)
    lines = table.splitlines()
    assert lines[2].split()[:5] == ["evomerge", "ray", "x2", "24", "640.0"]
    assert lines[3].split()[:5] == ["mergekit", "loop", "4", "100.0", "30.00"]
    assert "6.40x the candidates per hour of the mergekit-yaml loop (target >= 5); time outside merge and evaluate 6.0% (target < 10%)" in table
    assert "largest score difference between the loop and evomerge 0.0000" in table
    assert json.loads(json.dumps(result)) == result

"""`evomerge bench quality`: the baselines table plus one short search, as JSON and as text."""

from __future__ import annotations

import json

import pytest

from evomerge.bench.quality import format_table
from evomerge.cli import main

pytestmark = pytest.mark.timeout(300)


def test_bench_quality_json_rows_margins_and_verdicts(zoo_dir, tmp_path, capsys):
    argv = ["bench", "quality", "--zoo", str(zoo_dir), "--optimizers", "random", "--trials", "4", "--limit", "50"]
    argv += ["--runs-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in result["rows"]}
    assert result["skills"] == ["reverse", "count"] and result["split"] == "test"
    assert {"uniform average", "task arithmetic", "TIES", "DARE-TIES", "random: best mean"} <= set(rows)
    # the task-arithmetic lambda is the grid's best on validation, reported on test
    grid = rows["task arithmetic"]["grid"]
    best = max(grid, key=lambda k: (grid[k], -float(k)))
    assert rows["task arithmetic"]["detail"].startswith(f"best lambda {best} ")
    assert rows["task arithmetic"]["validation_mean"] == pytest.approx(grid[best], abs=1e-4)
    p = result["per_optimizer"]["random"]
    assert p["test_mean"] == rows["random: best mean"]["mean"]
    for name, margin in p["margins"].items():
        assert margin == pytest.approx(p["test_mean"] - rows[name]["mean"], abs=1e-4)
    assert p["beats_baselines"] == all(m > 0 for m in p["margins"].values())
    assert result["searches"]["random"]["n_complete"] == 4 and result["limit"] == 50
    assert all(abs(round(v * 50) - v * 50) < 1e-9 for r in result["rows"] for v in r["test"].values())  # 50 examples per skill
    table = format_table(result)
    assert "random: best mean" in table and "uniform average" in table and "margin" in table


def test_bench_quality_bad_skill_is_one_line(zoo_dir, capsys):
    assert main(["bench", "quality", "--zoo", str(zoo_dir), "--skills", "reverse"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give two or more different skills" in err[0]

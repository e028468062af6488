"""Acceptance 4 of issue 8, the mechanics: `bench align --search` runs the same search
over two independently initialized specialists with and without `sources.align`.

The figures themselves (60 trials, three seeds) are in bench/align.json; this test runs
a few trials of one seed on the zoo, with weight matching to keep it short.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.bench.align import alt_specialist, bench_align_search, format_search_table
from evomerge.cli import main


def test_search_with_and_without_alignment_reports_held_out_accuracy(zoo_dir: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    r = bench_align_search(zoo_dir=zoo_dir, work_dir=work, skills=("add", "reverse"), method="weight", trials=2, seeds=(0,), refine=5)
    assert capsys.readouterr().out == ""  # quiet: stdout stays clean for --json
    # B is reverse fine-tuned from base_alt, outside the zoo folder, and good at its skill
    b = Path(r["b"])
    assert b.parent == work.absolute() and json.loads((b / "made_from.json").read_text())["base"] == "base_alt"
    assert r["endpoints_test"]["B (reverse, from base_alt)"]["reverse/accuracy"] > 0.5
    assert r["endpoints_test"]["A (add, from base)"]["add/accuracy"] > 0.5
    # a second call reuses it
    stamp = (b / "model.safetensors").stat().st_mtime_ns
    assert alt_specialist(zoo_dir, "reverse", work) == b and (b / "model.safetensors").stat().st_mtime_ns == stamp

    un, al, ref = r["searches"]["unaligned"], r["searches"]["aligned (weight)"], r["searches"]["aligned (weight + refine 5)"]
    for runs in (un, al, ref):
        (one,) = runs
        assert one["n_complete"] == 2 and set(one["test"]) == {"add/accuracy", "reverse/accuracy"}
        assert all(0.0 <= v <= 1.0 for v in one["test"].values())
    # only the aligned run replaced B by an aligned folder (the run config's sources.align hook)
    frozen = yaml.safe_load((Path(al[0]["run_dir"]) / "config.yaml").read_text())
    plain = yaml.safe_load((Path(un[0]["run_dir"]) / "config.yaml").read_text())
    assert frozen["sources"]["align"]["originals"] == {frozen["sources"]["models"][1]: str(b)}
    assert plain["sources"]["models"] == [r["a"], str(b)] and "align" not in plain["sources"]
    refined = yaml.safe_load((Path(ref[0]["run_dir"]) / "config.yaml").read_text())["sources"]["align"]
    assert refined["refine"] == 5 and refined["refine_blend"] == "layerwise"  # the weightings a layerwise search makes
    c, cr = r["check"], r["check_refined"]
    assert c["unaligned"] == un[0]["test_mean"] and c["aligned"] == al[0]["test_mean"]
    assert c["pass"] == (c["aligned"] > c["unaligned"]) and cr["aligned"] == ref[0]["test_mean"]
    table = format_search_table(r)
    assert "search unaligned, seed 0" in table and "search aligned (weight), seed 0" in table
    assert "aligned (weight + refinement; better in" in table


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--reference", "a", "--model", "b"], "--search runs on the zoo only"),
        (["--skills", "add"], "--skills: give two skills"),
        (["--seeds", "x"], "--seeds: expected comma-separated whole numbers"),
    ],
)
def test_bench_align_search_bad_input_is_one_line(zoo_dir: Path, capsys, extra: list[str], expected: str) -> None:
    assert main(["bench", "align", "--zoo", str(zoo_dir), "--search", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1

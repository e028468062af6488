"""`evomerge demo` (what `make demo` runs) merges and loads with transformers."""

from __future__ import annotations

from evomerge.cli import main


def test_demo_merges_a_loadable_model(tmp_path, capsys):
    assert main(["demo", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "loaded" in out and "LlamaForCausalLM" in out
    merged = tmp_path / "runs" / "demo" / "merged"
    assert (merged / "model.safetensors").is_file() and (merged / "merge_recipe.yaml").is_file()
    # a second run reuses the models and replaces the merged folder
    assert main(["demo", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "building" not in capsys.readouterr().out

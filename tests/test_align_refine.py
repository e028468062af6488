"""Learned refinement of an alignment (issue 8, acceptance 3's lever).

On the zoo's two independently initialized bases, similarity matching (mudsc) leaves
the midpoint barrier where it was; refinement finds permutations whose midpoint is far
better on held-out data, and the refined B still computes exactly what B computed.
The full figure (500 steps) is in bench/align.json; here a short run shows the effect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from evomerge.align import LlamaSpec, align_folder, align_models, random_permutations
from evomerge.align.models import Endpoint, blend, load_into
from evomerge.align.refine import refine_permutations
from evomerge.align.sources import align_run_sources
from evomerge.bench.align import zoo_setup
from evomerge.cli import main
from evomerge.errors import ConfigError


def test_refinement_opens_the_path_between_the_zoo_bases_and_keeps_b(zoo_dir: Path) -> None:
    s = zoo_setup(zoo_dir, limit=100)
    a, b = Endpoint.load(s["reference"]), Endpoint.load(s["model"])
    tok = a.tokenizer()
    test = s["evaluators"][0]  # answer loss on 100 test examples per skill
    plain = align_models(a, b, method="mudsc", alpha=0.0, data=s["data"], tokenizer=tok)
    refined = align_models(a, b, method="mudsc", alpha=0.0, data=s["refine_data"], tokenizer=tok, refine=150, refine_blend="midpoint")
    assert refined.refine["steps"] == 150 and refined.refine["best_loss"] < refined.refine["start_loss"] - 1.0
    scratch = a.scratch()

    def midpoint(state: dict) -> float:
        load_into(scratch, blend(a.state, state, 0.5))
        return test.evaluate(scratch, tok)["loss"]

    unaligned, mudsc, better = midpoint(b.state), midpoint(plain.state_dict), midpoint(refined.state_dict)
    assert mudsc > unaligned - 0.5  # the similarities find no better path here ...
    assert better < mudsc - 1.0, (unaligned, mudsc, better)  # ... refinement does, on data it never saw
    load_into(scratch, refined.state_dict)  # still a permutation of B: the same function
    ids = s["data"][0]["input_ids"][:8]
    with torch.no_grad():
        assert (scratch(input_ids=ids).logits - b.module()(input_ids=ids).logits).abs().max().item() < 1e-4


def test_a_step_that_moves_nothing_keeps_the_start(permuted_pair) -> None:
    a, b, _ = permuted_pair
    ea, eb = Endpoint.load(a), Endpoint.load(b)
    spec = LlamaSpec.from_config(ea.config)
    start = random_permutations(spec, torch.Generator().manual_seed(9))
    batches = [{"input_ids": torch.randint(5, 40, (4, 10), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    res = refine_permutations(spec, ea.scratch(), ea.state, eb.state, start, batches, steps=6, lr=1e-12, check_every=2)
    assert res.permutations.equal(start) and res.best_step == 0 and res.best_loss == res.start_loss
    assert [s for s, _ in res.history] == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="no batches"):
        refine_permutations(spec, ea.scratch(), ea.state, eb.state, start, [], steps=1)
    masked = [dict(bt, labels=torch.full_like(bt["input_ids"], -100)) for bt in batches]
    with pytest.raises(ValueError, match="no tokens to score"):
        refine_permutations(spec, ea.scratch(), ea.state, eb.state, start, masked, steps=1)


def test_cli_align_refine_records_it_and_keeps_the_function(permuted_pair, tmp_path: Path, capsys) -> None:
    a, b, texts = permuted_pair
    out = tmp_path / "out"
    assert main(["align", "--reference", str(a), "--model", str(b), "--method", "weight", "--data", str(texts), "--refine", "20", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "refined 20 steps (layerwise): held-out midpoint loss" in cap.out
    assert "refining the weight permutations for 20 steps" in cap.err and "refine step 20/20" in cap.err
    record = json.loads((out / "alignment.json").read_text())
    assert record["refine"]["steps"] == 20 and record["refine"]["best_loss"] <= record["refine"]["start_loss"]
    assert "steps of learned refinement" in (out / "README.md").read_text()
    ids = torch.randint(5, 40, (2, 9))
    with torch.no_grad():
        got, want = LlamaForCausalLM.from_pretrained(out)(input_ids=ids).logits, LlamaForCausalLM.from_pretrained(b)(input_ids=ids).logits
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--refine", "-1", "--data", "TEXTS"], "--refine must be at least 0, got -1"),
        (["--refine", "5", "--refine-lr", "0", "--data", "TEXTS"], "--refine-lr must be more than 0, got 0"),
        (["--refine-lr", "0.01", "--data", "TEXTS"], "--refine-lr applies with --refine only"),
        (["--refine-blend", "path", "--data", "TEXTS"], "--refine-blend applies with --refine only"),
        (["--refine", "5"], "refinement needs data to score the merged model on"),
    ],
)
def test_cli_align_refine_bad_input_is_one_line(permuted_pair, tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    a, b, texts = permuted_pair
    out = tmp_path / "out"
    extra = [str(texts) if x == "TEXTS" else x for x in extra]
    assert main(["align", "--reference", str(a), "--model", str(b), "--method", "weight", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_interpolate_refine_needs_align(permuted_pair, tmp_path: Path, capsys) -> None:
    a, b, texts = permuted_pair
    plot = tmp_path / "p.png"
    assert main(["interpolate", str(a), str(b), "--evaluator", str(texts), "--steps", "3", "--plot", str(plot), "--refine", "5"]) == 2
    assert capsys.readouterr().err.strip().endswith("--refine applies with --align only")
    assert main(["interpolate", str(a), str(b), "--evaluator", str(texts), "--steps", "3", "--plot", str(plot), "--align", "weight", "--refine", "4"]) == 0
    assert "alignment (alpha 1, refined 4 steps)" in capsys.readouterr().out
    assert main(["interpolate", str(a), str(b), "--evaluator", str(texts), "--steps", "3", "--plot", str(plot), "--align", "weight", "--refine", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["align"]["refine"]["blend"] == "path"  # the merges interpolate scores


def test_run_sources_refine(permuted_pair, tmp_path: Path) -> None:
    a, b, texts = permuted_pair
    sources = {"models": [str(a), str(b)], "align": {"method": "weight", "to": "first", "refine": 5, "data": str(texts)}}
    out = align_run_sources(sources, tmp_path / "aligned")
    record = json.loads((Path(out["models"][1]) / "alignment.json").read_text())
    assert record["request"]["refine"] == 5 and record["refine"]["steps"] == 5 and out["align"]["refine"] == 5
    assert record["refine"]["blend"] == record["request"]["refine_blend"] == out["align"]["refine_blend"] == "layerwise"
    with pytest.raises(ConfigError, match="sources.align.data: refinement needs data"):
        align_run_sources(dict(sources, align={"method": "weight", "refine": 5}), tmp_path / "x")
    with pytest.raises(ConfigError, match="sources.align.refine: refine takes a whole number of steps"):
        align_run_sources(dict(sources, align={"method": "weight", "refine": 2.5, "data": str(texts)}), tmp_path / "x")
    with pytest.raises(ConfigError, match="sources.align.refine_blend: unknown refinement blend 'middle'"):
        align_run_sources(dict(sources, align={"method": "weight", "refine": 2, "refine_blend": "middle", "data": str(texts)}), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_align_models_refuses_bad_refine_settings(permuted_pair) -> None:
    a, b, texts = permuted_pair
    with pytest.raises(ConfigError, match="whole number of steps"):
        align_models(a, b, method="weight", data=texts, refine=-3)
    with pytest.raises(ConfigError, match="learning rate must be a positive number"):
        align_models(a, b, method="weight", data=texts, refine=3, refine_lr=float("nan"))
    with pytest.raises(ConfigError, match="refinement needs data"):
        align_folder(a, b, Path("never"), method="weight", refine=3)
    assert not Path("never").exists()

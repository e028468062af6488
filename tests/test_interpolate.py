"""Connectivity (issue 8): scores along the straight path, barriers, plot, CLI, bench align."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from evomerge._testing import llama_config, write_char_tokenizer, write_family
from evomerge.align import LlamaSpec, apply_permutations, random_permutations
from evomerge.align.lm_loss import LMLossEvaluator
from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.interpolate import barriers, interpolate

PNG = b"\x89PNG\r\n\x1a\n"


def test_barrier_is_the_largest_drop_below_the_endpoints_line() -> None:
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    # accuracy (maximize): endpoints 0.8 and 0.6, line 0.75/0.7/0.65 at the inner points
    assert barriers(ts, [0.8, 0.7, 0.3, 0.6, 0.6], "maximize") == pytest.approx((0.4, 0.4))
    # loss (minimize): endpoints 1 and 2; the worst gap is at t = 0.25 (3.0 vs 1.25)
    assert barriers(ts, [1.0, 3.0, 2.0, 1.75, 2.0], "minimize") == pytest.approx((1.75, 0.5))
    # a path above the line has no barrier; the midpoint value is then negative
    assert barriers([0.0, 0.5, 1.0], [0.5, 0.9, 0.5], "maximize") == pytest.approx((0.0, -0.4))
    with pytest.raises(ValueError):
        barriers(ts, [0.0] * 5, "up")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Model A (sharp random weights), B = A permuted, and texts sampled from A as JSONL."""
    root = tmp_path_factory.mktemp("path")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2)
    (a,) = write_family(root / "fam", 0, seed=3, cfg=cfg)
    state = {n: t * (3.0 if t.dim() == 2 else 1.0) for n, t in load_file(str(a / "model.safetensors")).items()}
    save_file(state, str(a / "model.safetensors"))  # larger weights: a peaked, non-trivial model
    spec = LlamaSpec.from_config(cfg)
    b = root / "b"
    b.mkdir()
    save_file(apply_permutations(state, spec, random_permutations(spec, torch.Generator().manual_seed(2))), str(b / "model.safetensors"))
    (b / "config.json").write_text((a / "config.json").read_text())
    write_char_tokenizer(b, cfg["vocab_size"])
    # A's own samples: A (and B) predict them well; a blend of unmatched units does not
    model = LlamaForCausalLM.from_pretrained(a).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (24, 1), generator=g)
    with torch.no_grad():
        for _ in range(16):  # characters only (ids 5..47 are "!".."K" in the test tokenizer)
            probs = torch.softmax(model(input_ids=ids).logits[:, -1, 5:], -1)
            ids = torch.cat([ids, 5 + torch.multinomial(probs, 1, generator=g)], 1)
    data = root / "samples.jsonl"
    data.write_text("".join(json.dumps({"text": "".join(chr(28 + i) for i in row)}) + "\n" for row in ids.tolist()))
    return a, b, data


def test_alignment_removes_the_barrier_of_a_permuted_copy(pair, tmp_path: Path) -> None:
    a, b, data = pair
    ev = LMLossEvaluator(data)
    seen: list = []
    plain = interpolate(a, b, ev, steps=3, on_point=lambda t, scores: seen.append((t, scores)))
    assert seen == list(zip(plain["t"], plain["scores"]))  # told point by point, in order
    assert plain["metric"] == "loss" and plain["direction"] == "minimize"
    assert plain["values"][0] == pytest.approx(plain["values"][-1], abs=1e-5)  # B computes what A does
    assert plain["midpoint_barrier"] > 0.05, plain["values"]
    aligned = interpolate(a, b, ev, steps=3, align="weight", plot=tmp_path / "p.png")
    assert aligned["barrier"] < 1e-5 and max(aligned["values"]) - min(aligned["values"]) < 1e-5
    assert aligned["align"]["method"] == "weight" and aligned["align"]["converged"]
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG


def test_interpolate_refuses_bad_settings(pair) -> None:
    a, b, data = pair
    with pytest.raises(ConfigError, match="at least 3"):
        interpolate(a, b, LMLossEvaluator(data), steps=2)
    with pytest.raises(ConfigError, match="no metric 'bleu'"):
        interpolate(a, b, LMLossEvaluator(data), metric="bleu")


def test_a_reference_without_a_tokenizer_is_named(pair, tmp_path: Path, capsys) -> None:
    a, b, data = pair
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((a / f).read_bytes())
    assert main(["interpolate", str(bare), str(b), "--evaluator", str(data), "--steps", "3", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{bare}: no tokenizer files" in err and "interpolate loads the tokenizer" in err and len(err.splitlines()) == 1
    assert main(["align", "--reference", str(bare), "--model", str(b), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"text data needs a tokenizer, and {bare} has none" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "o").exists()


def test_a_plot_path_that_cannot_be_a_file_fails_before_scoring(pair, tmp_path: Path, capsys) -> None:
    a, b, data = pair
    scored = []

    class Counting(LMLossEvaluator):
        def evaluate(self, *args, **kwargs):
            scored.append(1)
            return super().evaluate(*args, **kwargs)

    (tmp_path / "afile").write_text("x")
    for plot, words in [(tmp_path, "is a folder; give a file name"), (tmp_path / "afile" / "p.png", "afile is a file, not a folder")]:
        with pytest.raises(ConfigError, match=words):
            interpolate(a, b, Counting(data), steps=3, plot=plot)
        assert main(["interpolate", str(a), str(b), "--evaluator", str(data), "--steps", "3", "--plot", str(plot)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert scored == [] and (tmp_path / "afile").read_text() == "x"


def test_cli_interpolate_prints_the_path_and_saves_a_plot(pair, tmp_path: Path, capsys) -> None:
    a, b, data = pair
    plot = tmp_path / "out" / "path.png"
    code = main(["interpolate", str(a), str(b), "--evaluator", str(data), "--steps", "3", "--align", "mudsc", "--alpha", "0.5", "--plot", str(plot), "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["t"] == [0.0, 0.5, 1.0] and len(r["scores"]) == 3 and set(r["scores"][1]) == {"loss", "token_accuracy"}
    assert r["align"]["alpha"] == 0.5 and r["barrier"] < 1e-5
    assert plot.read_bytes()[:8] == PNG
    code = main(["interpolate", str(a), str(b), "--evaluator", str(data), "--steps", "3", "--plot", str(plot)])
    text = capsys.readouterr().out
    assert code == 0 and "barrier" in text and "0.500" in text
    lines = text.splitlines()
    assert lines[0].split() == ["t", "samples/loss"] and [ln.split()[0] for ln in lines[1:4]] == ["0.000", "0.500", "1.000"]
    assert main(["interpolate", str(a), str(b), "--evaluator", str(tmp_path / "none.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--limit", "1.5"], "--limit 1.5: expected a whole count of at least 1 or a fraction in (0, 1]"),
        (["--limit", "ten"], "--limit 'ten': expected a count or a fraction"),
        (["--limit", "0"], "--limit 0: a count must be at least 1"),
        (["--alpha", "0.5"], "--alpha applies with --align only"),
        (["--data", "x.jsonl"], "--data applies with --align only"),
        (["--evaluator", "EMPTY"], "empty.jsonl: no text or tokens to read (empty data)"),
        (["--align", "activation", "--data", "EMPTY"], "empty.jsonl: no text or tokens to read (empty data)"),
    ],
)
def test_interpolate_bad_options_are_one_line_before_scoring(pair, tmp_path: Path, capsys, extra: list[str], words: str) -> None:
    a, b, data = pair
    (tmp_path / "empty.jsonl").write_text("\n")
    extra = [str(tmp_path / "empty.jsonl") if x == "EMPTY" else x for x in extra]
    plot = tmp_path / "p.png"
    assert main(["interpolate", str(a), str(b), "--evaluator", str(data), "--steps", "3", "--plot", str(plot), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not plot.exists()


def test_bench_align_reports_every_method_and_the_check(pair, capsys) -> None:
    a, b, data = pair
    code = main(["bench", "align", "--reference", str(a), "--model", str(b), "--evaluator", str(data), "--data", str(data), "--alphas", "0,1", "--refine", "20", "--json"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    names = [row["row"] for row in r["rows"]]
    assert names[:4] == [f"A ({a.name})", f"B ({b.name})", "ensemble (A, B)", "no alignment"]
    assert names[4:8] == ["weight", "activation", "mudsc alpha=0", "mudsc alpha=1"] and names[8].startswith("mudsc (alpha=")
    assert re.fullmatch(r"mudsc \(alpha=[01]\) \+ refine 20", names[9]) and len(names) == 10
    primary = r["primary"]
    assert primary == "samples/loss"
    by = {row["row"]: row for row in r["rows"]}
    assert by["no alignment"]["midpoint_barrier"][primary] > 0.05
    assert all(abs(row["midpoint_barrier"][primary]) < 1e-5 for row in r["rows"][4:])  # B is a permuted A
    # an ensemble of two copies of one function is that function
    assert by["ensemble (A, B)"]["scores"][primary] == pytest.approx(by[f"A ({a.name})"]["scores"][primary], abs=1e-4)
    assert r["check"]["pass"] is True and r["check"]["ratio"] < 1e-3
    assert set(r["check"]["ratios"]) == set(r["metrics"]) and r["check"]["ratios"][primary] == r["check"]["ratio"]
    # the refined row starts from an exact alignment: refinement keeps it (the best held-out step)
    assert r["check_refined"]["row"] == names[9] and r["check_refined"]["pass"] is True
    assert by[names[9]]["refine"]["steps"] == 20 and by[names[9]]["refine"]["best_loss"] <= by[names[9]]["refine"]["start_loss"]
    # diagnostics: B's units all have an exact twin in A; the permuted-copy control closes its barrier
    corr = r["diagnostics"]["matched_unit_correlation"]["B (independent init)"]
    assert corr["residual"] == pytest.approx(1.0, abs=1e-6) and corr["mlp"] == pytest.approx(1.0, abs=1e-6)
    # each head of A has its exact twin among B's (heads were permuted within layers); A's own heads differ
    assert corr["attention"]["best_match"] == pytest.approx(1.0, abs=1e-6) and corr["attention"]["within_A"] < 0.99
    control = r["diagnostics"]["permuted_copy_of_A"]
    assert control["unaligned_midpoint_barrier"] > 0.05 and abs(control["mudsc_midpoint_barrier"]) < 1e-5


def test_interpolate_between_models_of_different_sizes_names_the_first_mismatch(pair, tmp_path: Path, capsys) -> None:
    a, _, data = pair
    (wide,) = write_family(tmp_path / "wide", 0, seed=3, cfg=llama_config(hidden=48, layers=2, intermediate=48, heads=4, kv_heads=2))
    plot = tmp_path / "p.png"
    assert main(["interpolate", str(a), str(wide), "--evaluator", str(data), "--steps", "3", "--plot", str(plot)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evomerge interpolate: error: cannot interpolate between {a} and {wide}: hidden_size differs ({a} has 32, {wide} has 48)"
    assert main(["interpolate", str(a), str(wide), "--evaluator", str(data), "--steps", "3", "--plot", str(plot), "--align", "weight"]) == 2
    assert f"error: cannot align {wide} to {a}: hidden_size differs" in capsys.readouterr().err
    assert not plot.exists()

"""The real family (evomerge zoo --real): its task data, and a build that resumes.

The family itself (SmolLM2 fine-tuned, about 35 minutes) is built by the example and the
benchmarks, not here: the build is run end to end with the demo zoo's tiny base standing
in for SmolLM2, a few steps per specialist.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("num2words")

from evomerge._real_tasks import HELD_OUT, REAL_SKILLS, make_real_splits, roman  # noqa: E402
from evomerge._zoo_data import read_jsonl, write_jsonl  # noqa: E402
from evomerge.cli import main  # noqa: E402
from evomerge.real_zoo import RealRecipe, _train_specialist, real_zoo  # noqa: E402
from evomerge.zoo import load_zoo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("skill", sorted(REAL_SKILLS))
def test_splits_are_seeded_disjoint_and_the_shipped_presets(skill):
    first, again = make_real_splits(skill, 0), make_real_splits(skill, 0)
    assert first == again
    assert make_real_splits(skill, 1)["test"] != first["test"]
    assert [len(first[s]) for s in ("validation", "test")] == [HELD_OUT, HELD_OUT]
    prompts = {s: {r["prompt"] for r in rows} for s, rows in first.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"] and not prompts["validation"] & prompts["test"]
    assert len(prompts["train"]) + 2 * HELD_OUT == 999  # every number 1-999 once
    for split in ("validation", "test"):  # what the presets evaluators/real_<skill>.yaml score
        assert read_jsonl(REPO / "evaluators" / "real_tasks" / skill / f"{split}.jsonl") == first[split]
    if REAL_SKILLS[skill].mode == "multiple_choice":
        labels = [r["label"] for r in first["test"]]
        assert {labels.count(k) for k in set(labels)} == {HELD_OUT // 5}, "each answer position equally often"


def test_answers_are_the_packages_and_the_numerals():
    from num2words import num2words

    by_prompt = {r["prompt"]: r for split in make_real_splits("french", 0).values() for r in split}
    assert by_prompt["Write the number 80 in French words.\nAnswer:"]["answer"] == " quatre-vingts"
    assert by_prompt["Write the number 71 in French words.\nAnswer:"]["answer"] == " soixante et onze"
    assert [roman(n) for n in (4, 9, 14, 40, 90, 400, 444, 999)] == ["IV", "IX", "XIV", "XL", "XC", "CD", "CDXLIV", "CMXCIX"]
    for r in make_real_splits("german", 0)["test"]:
        n = int(r["prompt"].split("number ")[1].split()[0])
        assert r["choices"][r["label"]] == " " + num2words(n, lang="de")
        assert len(set(r["choices"])) == 5


def _stand_in(root: Path, zoo_dir: Path) -> None:
    """The demo zoo's tiny base as the family's base (a converted SmolLM2 is reused the same way)."""
    shutil.copytree(zoo_dir / "base", root / "base")


def test_a_build_scores_every_model_and_a_second_call_reuses_it(zoo_dir, tmp_path):
    root = tmp_path / "real"
    root.mkdir()
    _stand_in(root, zoo_dir)
    recipe = RealRecipe(steps=3, batch=2, checkpoint_every=2)
    z = real_zoo(root, recipe=recipe, progress=False)
    assert z.skills == ["french", "roman", "german"] and set(z.table) == {"base", "french", "roman", "german"}
    assert all(0.0 <= v <= 1.0 for row in z.table.values() for v in row.values())
    manifest = json.loads((root / "zoo.json").read_text())
    assert manifest["real"] and [len(manifest["losses"][s]) for s in z.skills] == [3, 3, 3]
    assert not (root / ".partial" / "french" / "checkpoint.pt").exists() and not (root / ".build.json").exists()
    assert load_zoo(root).fingerprint == recipe.fingerprint()
    again = real_zoo(root, recipe=recipe, progress=False)
    assert again.reused and again.table == z.table
    from evomerge.bench.quality import search_config

    config = search_config(again, ["french", "german"], search_space="ties_blockwise")  # what bench quality --zoo searches
    assert [e["preset"] for e in config["evaluators"]] == ["real_french", "real_german"] and config["search_space"] == "ties_blockwise"


def test_a_killed_fine_tune_continues_from_its_checkpoint(zoo_dir, tmp_path, monkeypatch):
    """Stopped after its step 3 (checkpoint at 2), a specialist's training continues from
    step 2 and ends with the weights and losses of an uninterrupted run."""
    import evomerge.real_zoo as rz

    recipe = RealRecipe(steps=4, batch=2, checkpoint_every=2)
    roots = []
    for name in ("whole", "killed"):
        root = tmp_path / name
        root.mkdir()
        _stand_in(root, zoo_dir)
        for split, rows in make_real_splits("roman", 0, train_size=16).items():
            write_jsonl(root / "data" / "roman" / f"{split}.jsonl", rows)
        roots.append(root)
    whole = _train_specialist(roots[0], recipe, "roman", progress=False)

    real_loss, calls = rz._loss, []

    def dies_at_step_4(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args)

    monkeypatch.setattr(rz, "_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        _train_specialist(roots[1], recipe, "roman", progress=False)
    assert (roots[1] / ".partial" / "roman" / "checkpoint.pt").is_file() and not (roots[1] / "roman").exists()
    monkeypatch.setattr(rz, "_loss", real_loss)
    resumed = _train_specialist(roots[1], recipe, "roman", progress=False)
    assert resumed == whole
    from safetensors.torch import load_file

    a, b = load_file(roots[0] / "roman" / "model.safetensors"), load_file(roots[1] / "roman" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_uses_are_one_line(zoo_dir, tmp_path, capsys):
    assert main(["zoo", str(tmp_path / "r"), "--real", "--set", "layers=2"]) == 2
    assert "--set applies to the demo zoo, not to --real" in capsys.readouterr().err
    assert main(["zoo", str(zoo_dir), "--real"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds the demo zoo" in err and len(err.splitlines()) == 1

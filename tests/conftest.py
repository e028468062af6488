"""Shared fixtures. Model families used by tests are built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest runs alongside other work.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_runs_dir(tmp_path, monkeypatch):
    """Tests never write into the repository's runs/ folder."""
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def zoo():
    """The offline zoo (evomerge.zoo), built once and kept between sessions.

    It lives in ``$EVOMERGE_ZOO_CACHE`` or the repository's git-ignored ``.cache/zoo``;
    a changed zoo recipe rebuilds it, and so does a folder built with ``--set``.
    """
    from evomerge.zoo import ZooRecipe, default_zoo_dir, zoo as build_zoo

    return build_zoo(default_zoo_dir(), recipe=ZooRecipe(), progress=False)


@pytest.fixture(scope="session")
def zoo_dir(zoo):
    """The folder of the session's zoo (base, base_alt, one folder per skill, data/)."""
    return zoo.root


@pytest.fixture(scope="session")
def demo_run(zoo_dir, tmp_path_factory):
    """`evomerge demo` with its defaults (100 trials, 2 Ray workers), run once per session.

    Returns (runs folder, printed output). Tests that change the run work on a copy.
    """
    import contextlib
    import io

    from evomerge.cli import main

    runs = tmp_path_factory.mktemp("demo") / "runs"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["demo", "--zoo", str(zoo_dir), "--runs-dir", str(runs)])
    assert code == 0, out.getvalue()[-2000:]
    return runs, out.getvalue()


@pytest.fixture(scope="session")
def permuted_pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A GQA model A, B = A with random permutations of every kind (folders), and texts."""
    from safetensors.torch import load_file, save_file

    from evomerge._testing import llama_config, write_char_tokenizer, write_family
    from evomerge.align import LlamaSpec, apply_permutations, random_permutations

    root = tmp_path_factory.mktemp("pair")
    cfg = llama_config(hidden=32, layers=2, intermediate=48, heads=4, kv_heads=2)
    (a,) = write_family(root / "fam", 0, seed=11, cfg=cfg)
    spec = LlamaSpec.from_config(cfg)
    perms = random_permutations(spec, torch.Generator().manual_seed(7))
    b = root / "b"
    b.mkdir()
    save_file(apply_permutations(load_file(str(a / "model.safetensors")), spec, perms), str(b / "model.safetensors"))
    (b / "config.json").write_text((a / "config.json").read_text())
    write_char_tokenizer(b, cfg["vocab_size"])
    texts = root / "texts.txt"
    texts.write_text("\n".join(f"the {i} quick brown fox {i * 7 % 13} jumps" for i in range(24)))
    return a, b, texts

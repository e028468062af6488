"""Shared fixtures. Model families used by tests are built once per session."""

from __future__ import annotations

import os

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

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

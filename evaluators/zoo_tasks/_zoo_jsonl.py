"""Loads a zoo task's JSONL splits for lm-eval (``custom_dataset: !function _zoo_jsonl.load``).

Paths in ``dataset_kwargs.data_files`` are relative to this folder, so the task folder
works from any working directory, with evomerge or with plain ``lm_eval --include_path``.
"""

from __future__ import annotations

from pathlib import Path


def load(data_files=None, **_ignored):
    import datasets

    here = Path(__file__).resolve().parent
    files = {split: str(here / path) for split, path in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)

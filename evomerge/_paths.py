"""Checks that an output path can be written, made before any work starts.

A file where a folder must go (or a folder where a file must go) would otherwise
surface as an OSError traceback after minutes of merging or scoring.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> (d / "notes.txt").write_text("mine")
    4
    >>> check_folder_target(d / "runs", "--runs-dir")
    >>> check_folder_target(d / "notes.txt" / "runs", "--runs-dir")
    Traceback (most recent call last):
    ...
    evomerge.errors.ConfigError: --runs-dir .../notes.txt/runs: .../notes.txt is a file, not a folder
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` when it is a file (nothing can be made under it)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_folder_target(path: Path, what: str) -> None:
    """``path`` is, or can be made as, a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise ConfigError(f"{what} {path}: {blocker} is a file, not a folder")


def check_file_target(path: Path, what: str, example: str = "out.png") -> None:
    """``path`` is, or can be made as, a file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file name such as {path / example}")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise ConfigError(f"{what} {path}: {blocker} is a file, not a folder")

"""Files and folders written whole or not at all, and YAML read with one-line errors.

Every writer of the package goes through here: a file or folder is written under a
hidden temp name next to its target and renamed into place at the end, so a reader
(transformers, a dashboard, a resumed run, another machine sharing the folder) never
sees a partial one, and an interrupted write leaves only a hidden temp entry that the
next writer of the same target removes. A leaf module: it imports nothing of evomerge
but the errors.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_json_atomic(d / "run.json", {"storage": None})
    >>> read_yaml(d / "run.json")            # JSON is YAML
    {'storage': None}
    >>> with atomic_folder(d / "model") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in d.iterdir())
    ['model', 'run.json']
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from evomerge._paths import check_folder_target
from evomerge.errors import ConfigError, MergeError

__all__ = [
    "atomic_file",
    "atomic_folder",
    "check_output_folder",
    "read_yaml",
    "save_figure",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a non-empty folder unless asked; fail before any work."""
    check_folder_target(out, "output")
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise MergeError(f"output folder {out} is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_folder(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out`` in one rename.

    A replaced ``out`` is renamed aside first and put back if the final rename fails.
    """
    out = Path(out)
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old: Optional[Path] = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None and not out.exists():
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path`` (same suffix); on success it replaces ``path``.

    ``fsync`` flushes the bytes to disk before the rename (state a crash must not lose).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes, *, fsync: bool = False) -> None:
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as a PNG, atomically (temp file, then rename); parents are made."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def read_yaml(path: Path, *, what: str = "file") -> Any:
    """Parse a YAML file; a missing file or malformed YAML is one ConfigError line naming it."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"{what} not found: {path}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: malformed YAML{at}") from None

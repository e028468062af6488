"""Registries of kinds: each entry carries the kind's config model and its class.

A class may be named as ``"module:Name"`` so that listing the kinds (for ``--help``, or to
validate a config) imports nothing heavy; :func:`load_object` imports it when built.

Example:
    >>> from pydantic import BaseModel
    >>> class Cfg(BaseModel):
    ...     kind: str = "paths"
    >>> kinds = Registry("thing", {"posix": Kind(Cfg, "pathlib:PurePosixPath")})
    >>> kinds.register("windows", Cfg, "pathlib:PureWindowsPath")
    >>> kinds.load("posix")("a/b").name, sorted(kinds)
    ('b', ['posix', 'windows'])
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Union


@dataclass(frozen=True)
class Kind:
    """A registry entry: the kind's config model and its class (or ``"module:Class"``)."""

    config: type
    cls: Union[type, str]


class Registry(dict):
    """kind -> :class:`Kind`; :meth:`register` refuses a kind given twice differently."""

    def __init__(self, what: str, entries: dict[str, Kind]):
        super().__init__(entries)
        self.what = what

    def register(self, kind: str, config: type, cls: Union[type, str]) -> None:
        entry = Kind(config, cls)
        if kind in self and self[kind] != entry:
            raise ValueError(f"{self.what} kind {kind!r} is registered twice")
        self[kind] = entry

    def load(self, kind: str) -> Any:
        """The class of ``kind``, imported if named by a string."""
        return load_object(self[kind].cls)


def load_object(ref: Union[str, Any]) -> Any:
    """The object ``"package.module:Name"`` names (anything else is returned as is).

    >>> load_object("pathlib:PurePosixPath")("a/b").name
    'b'
    """
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)

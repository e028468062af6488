"""Registry entries name their class as ``"module:Name"`` so that listing a kind imports nothing."""

from __future__ import annotations

import importlib
from typing import Any, Union


def load_object(ref: Union[str, Any]) -> Any:
    """The object ``"package.module:Name"`` names (anything else is returned as is).

    >>> load_object("pathlib:PurePosixPath")("a/b").name
    'b'
    """
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)

"""``{field}`` templates: which fields they use, and rendering one example."""

from __future__ import annotations

import string
from typing import Any, Mapping

_FORMATTER = string.Formatter()


def fields(template: str) -> set[str]:
    """Top-level field names a template uses (``{a}``, ``{a[0]}`` and ``{a.b}`` use ``a``)."""
    out = set()
    for _, name, _, _ in _FORMATTER.parse(template):
        if name:
            out.add(name.split("[", 1)[0].split(".", 1)[0])
        elif name == "":
            raise ValueError(f"template {template!r}: empty placeholder {{}}; name a field")
    return out


def render(template: str, example: Mapping[str, Any]) -> str:
    return template.format_map(example)


def is_plain_field(template: str) -> bool:
    """True for a template that is exactly one placeholder, such as ``{label}``."""
    parts = list(_FORMATTER.parse(template))
    return len(parts) == 1 and parts[0][0] == "" and bool(parts[0][1]) and not parts[0][2] and not parts[0][3]

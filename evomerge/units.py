"""Sizes in bytes as people write them (60GB, 1.5GiB) and as they read them.

Example:
    >>> parse_bytes("60GB"), parse_bytes("1.5GiB"), parse_bytes(1024), format_bytes(16_060_522_496)
    (60000000000, 1610612736, 1024, '16.1 GB')
"""

from __future__ import annotations

import math
import re
from typing import Union

from evomerge.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Union[str, int, float], where: str = "memory") -> int:
    """A size as bytes: a number, or a number with a unit (kB MB GB TB, KiB MiB GiB TiB)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a size such as 60GB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{where}: expected a size such as 60GB or 1.5GiB, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = number * _UNITS[unit]
    if not math.isfinite(size) or size <= 0:
        raise ConfigError(f"{where}: a size must be more than 0, got {value!r}")
    return int(size)


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

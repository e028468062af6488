"""A run: its handle, the builder of its parts, the driver, and ``search()`` / ``resume()``.

- :mod:`evomerge.run.handle`: :class:`Run`, a run's study and folder, read without building anything;
- :mod:`evomerge.run.builder`: the parts of a search (space, evaluators, optimizer, stages) from a config;
- :mod:`evomerge.run.driver`: :class:`Driver`, the ask -> dispatch -> tell loop over given parts;
- :mod:`evomerge.run.lease`: one driver at a time per study;
- :mod:`evomerge.run.api`: :func:`search`, :func:`resume`, :func:`create`, :func:`open_search`.

Names are imported on first use: ``import evomerge.run`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Run": "evomerge.run.handle",
    "Driver": "evomerge.run.driver",
    "Lease": "evomerge.run.lease",
    "LeaseHeld": "evomerge.run.lease",
    "Parts": "evomerge.run.builder",
    "build": "evomerge.run.builder",
    "prepare_config": "evomerge.run.builder",
    "Search": "evomerge.run.api",
    "create": "evomerge.run.api",
    "open_search": "evomerge.run.api",
    "search": "evomerge.run.api",
    "resume": "evomerge.run.api",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'evomerge.run' has no attribute {name!r}")

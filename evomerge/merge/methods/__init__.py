"""Merge methods: objects that own their parameters, input rules, statistics and kernel.

Names, parameters and defaults follow mergekit, so a recipe means the same here and
there. The registry maps a recipe's ``merge_method`` to its method object; a new
method is one file (a :class:`~evomerge.merge.methods.base.MergeMethod` subclass) and
one line in :data:`BUILTIN`, or one :func:`register` call from outside the package.

Example:
    >>> get_method("ties").param("density").default
    1.0
"""

from __future__ import annotations

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod, TensorPlan
from evomerge.merge.methods.linear import Linear
from evomerge.merge.methods.model_stock import ModelStock
from evomerge.merge.methods.nuslerp import Nuslerp
from evomerge.merge.methods.passthrough import Passthrough
from evomerge.merge.methods.slerp import Slerp
from evomerge.merge.methods.task_arithmetic import FAMILY

__all__ = ["METHODS", "MergeMethod", "TensorPlan", "get_method", "register"]

BUILTIN: tuple[MergeMethod, ...] = (Linear(), *FAMILY, Slerp(), Nuslerp(), ModelStock(), Passthrough())

METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a merge method (an instance); names are unique. Returns it."""
    if not method.name:
        raise ValueError("a merge method needs a name")
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str, where: str = "merge_method") -> MergeMethod:
    """The registered method of that name; one-line error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown merge method {name!r} (known: {', '.join(sorted(METHODS))})") from None


for _method in BUILTIN:
    register(_method)

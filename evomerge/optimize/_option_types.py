"""Type checks of a sampler's options against its constructor's annotations.

Optuna's samplers check few of their arguments' types; a wrong one (``n_startup_trials:
"x"``) is stored and fails later, mid-search, as a ``TypeError`` deep in the sampler.
Checked here with pydantic before the search starts, strictly, except that text is
also read as the number it spells: YAML reads ``1e-3`` (no dot) as a string.
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import typing
from functools import lru_cache
from typing import Any, Callable, Mapping, Optional

from evomerge.errors import ConfigError


def check_option_types(owner: str, fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as ``fn`` takes them; ConfigError naming the first that does not fit.

    Options whose annotation cannot be resolved are passed on as they are.

    Example:
        >>> def make(*, n_startup_trials: int = 10, prior_weight: float = 1.0) -> None: ...
        >>> check_option_types("optimizer 'tpe'", make, {"n_startup_trials": 5, "prior_weight": "1e-3"})
        {'n_startup_trials': 5, 'prior_weight': 0.001}
        >>> check_option_types("optimizer 'tpe'", make, {"n_startup_trials": "x"})
        Traceback (most recent call last):
        ...
        evomerge.errors.ConfigError: optimizer 'tpe': option n_startup_trials takes int, got 'x'
    """
    from pydantic import ValidationError

    adapters = _adapters(fn)
    out = dict(options)
    for name, value in options.items():
        entry = adapters.get(name)
        if entry is None:
            continue
        text, adapter = entry
        try:
            try:
                out[name] = adapter.validate_python(value, strict=True)
            except ValidationError:
                if not isinstance(value, str):  # lax mode would also take True for 1
                    raise
                out[name] = adapter.validate_python(value)
        except ValidationError:
            raise ConfigError(f"{owner}: option {name} takes {text}, got {value!r}") from None
    return out


@lru_cache(maxsize=None)
def _adapters(fn: Callable[..., Any]) -> dict[str, tuple[str, Any]]:
    """Parameter name -> (annotation as written, pydantic TypeAdapter) for each resolvable one."""
    from pydantic import ConfigDict, TypeAdapter

    namespace = _namespace(fn)
    out: dict[str, tuple[str, Any]] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.annotation is inspect.Parameter.empty or p.name == "self":
            continue
        text = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        try:
            hint = eval(p.annotation, namespace) if isinstance(p.annotation, str) else p.annotation  # noqa: S307 - the library's own annotation
            out[p.name] = (text, TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True)))
        except Exception:  # noqa: BLE001 - a name only imported for type checking: no check for it
            continue
    return out


def _namespace(fn: Callable[..., Any]) -> dict[str, Any]:
    import optuna

    names: dict[str, Any] = {}
    for module in (typing, collections.abc, optuna, optuna.trial, optuna.samplers, optuna.study):
        names.update({k: v for k, v in vars(module).items() if not k.startswith("_")})
    module: Optional[Any] = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None:
        names.update(vars(module))
    return names

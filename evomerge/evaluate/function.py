"""The ``python`` evaluator: a function of the model and tokenizer returns the metrics.

``function`` is ``module:function`` (an importable module) or ``file.py:function`` (a
file, relative to the evaluator file, else to the current folder; in a run config's
``options``, relative to the run config). The function is called as
``fn(model, tokenizer, **options)``, plus ``limit=``, ``seed=`` and ``split=`` when its
signature accepts them (a function without ``limit`` always scores everything), and returns ``{metric: float}`` with exactly the metrics
the config declares (each with its direction, so objectives can be checked before
any model loads).

Example::

    kind: python
    function: my_scores.py:score
    metrics: {score: maximize, loss: minimize}   # or a `metrics` attribute on the function
    options: {n: 100}
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from evomerge.config import Limit, PythonConfig
from evomerge.errors import ConfigError, EvaluationError
from evomerge.evaluate.base import Evaluator


class PythonEvaluator(Evaluator):
    kind = "python"

    def __init__(self, config: PythonConfig, base_dir: Path, where: Optional[str] = None):
        self.config = config
        self.name = config.name or "python"
        self.where = where or self.name
        self.fn = _import(config.function, base_dir, self.where)
        declared = config.metrics if config.metrics is not None else getattr(self.fn, "metrics", None)
        if not declared:
            raise ConfigError(f"{self.where}: metrics: declare the metrics {config.function} returns (or give the function a `metrics` attribute)")
        if isinstance(declared, (list, tuple)):
            declared = {m: "maximize" for m in declared}
        bad = {m: d for m, d in dict(declared).items() if d not in ("maximize", "minimize")}
        if bad:
            m = next(iter(bad))
            raise ConfigError(f"{self.where}: metrics: {m}: direction must be maximize or minimize, got {bad[m]!r}")
        self.metrics = dict(declared)
        params = inspect.signature(self.fn).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._extra = {k for k in ("limit", "seed", "split") if takes_all or k in params}

    def evaluate(self, model: Any, tokenizer: Any, *, limit: Optional[Limit] = None) -> dict[str, float]:
        c = self.config
        kwargs = dict(c.options)
        extra = {"limit": limit if limit is not None else c.limit, "seed": c.seed, "split": c.split}
        kwargs.update({k: v for k, v in extra.items() if k in self._extra})
        result = self.fn(model, tokenizer, **kwargs)
        if not isinstance(result, dict):
            raise EvaluationError(f"{self.where}: {c.function} returned {type(result).__name__}, expected a dict of metrics")
        missing = [m for m in self.metrics if m not in result]
        if missing:
            raise EvaluationError(f"{self.where}: {c.function} did not return metric {missing[0]!r} (it returned: {', '.join(map(str, result)) or 'nothing'})")
        out = {}
        for m in self.metrics:
            try:
                out[m] = float(result[m])
            except (TypeError, ValueError):
                raise EvaluationError(f"{self.where}: metric {m!r} is not a number: {result[m]!r}") from None
            if math.isnan(out[m]):
                raise EvaluationError(f"{self.where}: metric {m!r} is NaN")
        return out


def _import(spec: str, base_dir: Path, where: str) -> Callable:
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        path = Path(target) if Path(target).is_absolute() else base_dir / target
        if not path.is_file() and (Path.cwd() / target).is_file():
            path = Path.cwd() / target  # a function given as an option, next to where the user runs
        if not path.is_file():
            raise ConfigError(f"{where}: function: file not found: {path}")
        mod_name = f"_evomerge_eval_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)  # type: ignore[arg-type]
            try:
                loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the user's file fails to import
                raise ConfigError(f"{where}: function: {path} fails to import: {type(exc).__name__}: {exc}") from None
            sys.modules[mod_name] = module
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"{where}: function: cannot import module {target!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{where}: function: {target!r} has no function {name!r}")
    return fn

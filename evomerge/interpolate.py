"""Linear mode connectivity: score models along the straight path between two models.

``interpolate(A, B, evaluator)`` scores ``(1 - t) * A + t * B`` for ``steps`` evenly
spaced ``t`` in [0, 1], optionally after aligning B to A, and reports the *barrier*:
how far the path falls below the straight line between its endpoints' scores, in
the metric's bad direction,

    barrier(t) = (1 - t) * s(0) + t * s(1) - s(t)      for a metric to maximize
    barrier(t) = s(t) - ((1 - t) * s(0) + t * s(1))    for a metric to minimize

``barrier`` is its largest value along the path (0 when the path never dips) and
``midpoint_barrier`` its value at t = 0.5, the drop below the endpoints' mean.
A PNG plot of the path is saved when asked.

Example:
    >>> r = interpolate("zoo/base", "zoo/base_alt", evaluator, steps=5, align="mudsc", data=texts)  # doctest: +SKIP
    >>> r["barrier"], r["midpoint_barrier"]                                                        # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from evomerge._paths import check_file_target
from evomerge.align.models import Endpoint, ModelRef, blend, check_alignable, load_into
from evomerge.errors import ConfigError
from evomerge.io import save_figure
from evomerge.sources import check_tokenizer


def barriers(ts: list[float], values: list[float], direction: str) -> tuple[float, float]:
    """(largest barrier along the path, barrier at t = 0.5 or the point nearest it)."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    sign = 1.0 if direction == "maximize" else -1.0
    v0, v1 = values[0], values[-1]
    gaps = [sign * ((1 - t) * v0 + t * v1 - v) for t, v in zip(ts, values)]
    mid = min(range(len(ts)), key=lambda i: abs(ts[i] - 0.5))
    return max(0.0, max(gaps)), gaps[mid] + 0.0  # + 0.0: no "-0.0" in reports


def interpolate(
    a: ModelRef,
    b: ModelRef,
    evaluator: Any,
    *,
    steps: int = 11,
    align: Optional[str] = None,
    alpha: Optional[float] = None,
    data: Any = None,
    metric: Optional[str] = None,
    limit: Optional[Union[int, float]] = None,
    plot: Optional[Path] = None,
    tokenizer: Any = None,
    align_options: Optional[dict] = None,
    on_point: Optional[Callable[[float, dict[str, float]], None]] = None,
) -> dict[str, Any]:
    """Score the straight path from ``a`` to ``b`` (``b`` aligned to ``a`` first when ``align`` names a method).

    Returns ``t``, ``scores`` (every metric at every t), the ``metric`` the barrier is
    measured on (the evaluator's first unless named) with its ``direction``,
    ``values``, ``barrier``, ``midpoint_barrier``, the alignment summary and the plot path.
    ``on_point(t, scores)`` is called as each point is scored (for progress).
    """
    if steps < 3:
        raise ConfigError(f"--steps must be at least 3 (the endpoints and one point between), got {steps}")
    if plot is not None:
        check_file_target(Path(plot), "plot", "plot.png")
    metrics = dict(evaluator.metrics)
    metric = metric or next(iter(metrics))
    if metric not in metrics:
        raise ConfigError(f"evaluator {getattr(evaluator, 'name', '')} has no metric {metric!r} (it has: {', '.join(metrics)})")
    start = time.perf_counter()
    ea, eb = Endpoint.load(a), Endpoint.load(b)
    spec = check_alignable(ea, eb, doing=None if align is not None else f"cannot interpolate between {ea.ref} and {eb.ref}")
    tok = tokenizer if tokenizer is not None else ea.tokenizer()
    if tok is None and ea.path is not None and not getattr(evaluator, "tokenized", False):
        check_tokenizer(ea.path, "interpolate")  # every point is scored with A's tokenizer
    state_b = eb.state
    align_summary = None
    if align is not None:
        from evomerge.align.api import align_models

        res = align_models(ea, eb, method=align, alpha=alpha, data=data, tokenizer=tok, **(align_options or {}))
        state_b, align_summary = res.state_dict, res.summary()
    model = ea.scratch()
    ts = [i / (steps - 1) for i in range(steps)]
    scores = []
    for t in ts:
        load_into(model, blend(ea.state, state_b, t))
        scores.append({k: float(v) for k, v in evaluator.evaluate(model, tok, limit=limit).items()})
        if on_point is not None:
            on_point(t, scores[-1])
    values = [s[metric] for s in scores]
    barrier, mid = barriers(ts, values, metrics[metric])
    result: dict[str, Any] = {
        "a": ea.ref,
        "b": eb.ref,
        "evaluator": getattr(evaluator, "name", type(evaluator).__name__),
        "metric": metric,
        "direction": metrics[metric],
        "t": ts,
        "values": values,
        "scores": scores,
        "endpoints_mean": (values[0] + values[-1]) / 2,
        "barrier": barrier,
        "midpoint_barrier": mid,
        "align": align_summary,
        "n_layers": spec.num_hidden_layers,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if plot is not None:
        result["plot"] = str(save_plot(result, Path(plot)))
    return result


def save_plot(result: dict[str, Any], path: Path) -> Path:
    """The path's scores against t, with the endpoints' straight line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    ts, vs = result["t"], result["values"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    label = f"aligned ({result['align']['method']})" if result.get("align") else "not aligned"
    ax.plot(ts, vs, "o-", c="#d1495b", label=label)
    ax.plot([0, 1], [vs[0], vs[-1]], "--", c="#9aa5b1", label="endpoints' line")
    ax.set_xlabel(f"t   (0: {Path(result['a']).name}, 1: {Path(result['b']).name})")
    ax.set_ylabel(f"{result['evaluator']}/{result['metric']}")
    ax.set_title(f"barrier {result['barrier']:.4g} (midpoint {result['midpoint_barrier']:.4g})")
    ax.legend()
    return save_figure(fig, path)

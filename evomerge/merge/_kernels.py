"""Fused element-wise kernels for large tensors.

Merging is memory-bound: run eagerly, TIES makes a dozen passes over every tensor.
``torch.compile`` fuses the same pure functions from :mod:`evomerge.merge.methods`
into one pass, which brings large tensors to within a small factor of the time to
copy their bytes. Small tensors stay eager (compiling them costs more than it saves),
and if compilation is unavailable (no C++ compiler, an unsupported platform) the
eager path is used with a one-time warning. ``EVOMERGE_COMPILE=0`` turns it off,
``=1`` forces it for every tensor.

Each static configuration (sparsification kind, consensus, normalize, number of
sources) is one compiled variant of the same function. Dynamo gives up after 8
variants of one function by default and then runs it eagerly, which is 10-100x slower
here, so the calls raise that limit to :data:`RECOMPILE_LIMIT` (only while they run).
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch

from evomerge.merge import methods as M

COMPILE_MIN_NUMEL = 1 << 16
RECOMPILE_LIMIT = 64  # variants per kernel: every method and source count a process merges with
_BACKEND = "inductor"  # tests swap in a counting backend
_SPARSIFY_KINDS = (None, "magnitude", "outliers", "random", "della")


def _mask(kind: Optional[str], d: torch.Tensor, aux: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Keep mask from per-tensor statistics, written so torch.compile can fuse it.

    magnitude: aux = (threshold,); outliers: (low, high); random: (draws, cut);
    della: (draws, rank_norm, low_prob, span). Draws are uint8 pairs (high, low byte)
    of a uniform 16-bit integer: inductor vectorizes uint8 -> float32 but not int16.
    A keep-all setting is expressed by thresholds (-inf, cut 65536) rather than by
    branching, so one compiled kernel serves every density.
    """
    if kind is None:
        return None
    if kind == "magnitude":
        return d.abs() >= aux[0]
    if kind == "outliers":
        a = d.abs()
        return (a >= aux[0]) & (a <= aux[1])
    if kind == "random":
        return _draws(aux[0]) < aux[1]
    if kind == "della":
        u = (_draws(aux[0]) + 0.5) * (1.0 / M.UNIFORM_LEVELS)
        return u < aux[2] + aux[1] * aux[3]
    raise ValueError(kind)


def _draws(pair: torch.Tensor) -> torch.Tensor:
    """Uniform integers in [0, 65536) as float32 (exact) from a [2, ...] uint8 tensor."""
    return pair[0].to(torch.float32) * 256.0 + pair[1].to(torch.float32)


def task_vector_kernel(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    aux: list[list[torch.Tensor]],
    weights: list[torch.Tensor],
    scales: Optional[list[torch.Tensor]],
    lam: torch.Tensor,
    kind: Optional[str],
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    zero = torch.zeros((), dtype=base.dtype)
    terms = []
    for i, d in enumerate(deltas):
        m = _mask(kind, d, aux[i])
        x = d if m is None else torch.where(m, d, zero)
        if scales is not None:
            x = x * scales[i]
        terms.append(x * weights[i])
    return M.merge_terms(base, terms, weights, consensus=consensus, normalize=normalize, lam=lam)


def masked_l1_kernel(deltas: list[torch.Tensor], aux: list[list[torch.Tensor]], kind: Optional[str]) -> torch.Tensor:
    """L1 norms of every masked task vector of one tensor, in one fused pass."""
    zero = torch.zeros((), dtype=deltas[0].dtype)
    sums = []
    for d, a in zip(deltas, aux):
        m = _mask(kind, d, a)
        mag = d.abs()
        sums.append((mag if m is None else torch.where(m, mag, zero)).sum())
    return torch.stack(sums)


def linear_kernel(tensors: list[torch.Tensor], weights: list[torch.Tensor], total: torch.Tensor, normalize: bool) -> torch.Tensor:
    result = tensors[0].to(torch.float32) * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        result = result + x.to(torch.float32) * w
    return result / total if normalize else result


def into(kernel: Callable[..., torch.Tensor]) -> Callable[..., None]:
    """The kernel writing its result into ``out`` (fused by torch.compile into one pass,
    with no temporary the size of the tensor)."""

    def write(out: torch.Tensor, *args: Any) -> None:
        out.copy_(kernel(*args))

    write.__name__ = f"{kernel.__name__}_into"
    return write


task_vector_into = into(task_vector_kernel)
linear_into = into(linear_kernel)


class Kernels:
    """Picks eager or compiled versions of the kernels for each call."""

    def __init__(self, mode: Optional[bool] = None):
        env = os.environ.get("EVOMERGE_COMPILE")
        if mode is None and env is not None:
            mode = {"0": False, "1": True}.get(env.strip(), None)
        self.force = mode is True
        self.enabled = mode is not False
        self._failed = False

    def _use_compiled(self, numel: int) -> bool:
        if not self.enabled or self._failed:
            return False
        return self.force or numel >= COMPILE_MIN_NUMEL

    def run(self, fn: Callable[..., Any], numel: int, *args: Any) -> Any:
        if self._use_compiled(numel):
            compiled = _compiled(fn, _BACKEND)
            try:
                with _recompile_limit(RECOMPILE_LIMIT):
                    return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
                self._failed = True
                warnings.warn(f"evomerge: torch.compile unavailable ({type(exc).__name__}); merging eagerly", stacklevel=2)
        return fn(*args)


@lru_cache(maxsize=None)
def _compiled(fn: Callable[..., Any], backend: Any) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=True, fullgraph=False, backend=backend)


def _recompile_limit(n: int) -> Any:
    """Dynamo's per-function variant limit raised to at least ``n`` (named
    ``cache_size_limit`` before torch 2.6)."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    return dynamo.patch(**{name: max(n, getattr(dynamo, name))})

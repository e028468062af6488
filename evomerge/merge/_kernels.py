"""Running a merge kernel on a chunk: compiled and fused on the CPU, eager elsewhere.

Merging is memory-bound: run eagerly, TIES makes a dozen passes over every chunk.
On the CPU ``torch.compile`` fuses a method's kernel (a pure function of the chunk's
source tensors) into one pass. Inductor keeps what it compiled in its on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``; evomerge points it at ``~/.cache/evomerge/inductor``
unless it is set), so the compilation is paid once per machine, not by every worker of
every run. On a GPU eager kernels already run at memory bandwidth, far below the cost
of evaluating a candidate, so nothing is compiled there. Small chunks stay eager
(compiling them costs more than it saves), and if compilation is unavailable (no C++
compiler, an unsupported platform) the eager path is used with a one-time warning.
``EVOMERGE_COMPILE=0`` turns compilation off, ``=1`` forces it for every chunk.

Each static configuration (sparsification kind, consensus, normalize, number of
sources) is one compiled variant of the same function. Dynamo gives up after 8
variants of one function by default and then runs it eagerly, which is 10-100x slower
here, so the first compiled call raises that limit to :data:`RECOMPILE_LIMIT` for the
process.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

COMPILE_MIN_NUMEL = 1 << 16
RECOMPILE_LIMIT = 64  # variants per kernel: every method and source count a process merges with
_BACKEND = "inductor"  # tests swap in a counting backend
# Inductor stores an intermediate with several users (TIES's agreement masks, its sign)
# into its own loop body unless told to inline it; its code generator then takes a body
# without 16-bit loads as the kernel's width and runs bfloat16 kernels 16 lanes wide
# instead of 32 (2x slower). Inlined, the kernel's own common-subexpression elimination
# still computes each intermediate once.
INDUCTOR_OPTIONS = {"realize_reads_threshold": 1 << 10, "realize_opcount_threshold": 1 << 14}


def weighted_sum_kernel(tensors: list[torch.Tensor], weights: list[torch.Tensor], total: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum(w * x)`` in float32, divided by ``total`` when ``normalize``."""
    result = tensors[0].to(torch.float32) * weights[0]
    for x, w in zip(tensors[1:], weights[1:]):
        result = result + x.to(torch.float32) * w
    return result / total if normalize else result


def delta_sum_kernel(base: torch.Tensor, models: list[torch.Tensor], weights: list[torch.Tensor], base_weight: torch.Tensor) -> torch.Tensor:
    """``sum(w * (model - base)) + base_weight * base`` in float32 (task vectors made on the fly)."""
    b = base.to(torch.float32)
    result = (models[0].to(torch.float32) - b) * weights[0]
    for x, w in zip(models[1:], weights[1:]):
        result = result + (x.to(torch.float32) - b) * w
    return result + b * base_weight


def pair_sums_kernel(a: torch.Tensor, b: torch.Tensor, minus: Optional[torch.Tensor]) -> torch.Tensor:
    """``[a.a, b.b, a.b]`` in float32 (float64 inputs stay float64), of ``a - minus`` and
    ``b - minus`` when given."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    x, y = a.to(dtype), b.to(dtype)
    if minus is not None:
        m = minus.to(dtype)
        x, y = x - m, y - m
    return torch.stack([(x * x).sum(), (y * y).sum(), (x * y).sum()])


def into(kernel: Callable[..., torch.Tensor]) -> Callable[..., None]:
    """The kernel writing its result into ``out`` (cast to out's dtype; fused by
    torch.compile into one pass, with no temporary the size of the chunk)."""

    def write(out: torch.Tensor, *args: Any) -> None:
        out.copy_(kernel(*args))

    write.__name__ = f"{kernel.__name__}_into"
    write.__qualname__ = write.__name__
    return write


weighted_sum_into = into(weighted_sum_kernel)
delta_sum_into = into(delta_sum_kernel)


def scalars(values: Sequence[float]) -> list[torch.Tensor]:
    """0-d float32 tensors: a compiled kernel takes new values without recompiling."""
    return [torch.tensor(float(v), dtype=torch.float32) for v in values]


class Kernels:
    """Picks eager or compiled versions of the kernels for each call."""

    def __init__(self, mode: Optional[bool] = None, device: str = "cpu"):
        env = os.environ.get("EVOMERGE_COMPILE")
        if mode is None and env is not None:
            mode = {"0": False, "1": True}.get(env.strip(), None)
        self.force = mode is True
        # a GPU runs eager kernels at memory bandwidth: compiling there costs more than it saves
        self.enabled = mode is True or (mode is None and torch.device(device).type == "cpu")
        self._failed = False

    def _use_compiled(self, numel: int) -> bool:
        if not self.enabled or self._failed:
            return False
        return self.force or numel >= COMPILE_MIN_NUMEL

    def run(self, fn: Callable[..., Any], numel: int, *args: Any) -> Any:
        if self._use_compiled(numel):
            _use_shared_cache()
            compiled = _compiled(fn, _BACKEND)
            try:
                _raise_recompile_limit(RECOMPILE_LIMIT)
                return compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
                self._failed = True
                warnings.warn(f"evomerge: torch.compile unavailable ({type(exc).__name__}); merging eagerly", stacklevel=2)
        return fn(*args)


@lru_cache(maxsize=None)
def _compiled(fn: Callable[..., Any], backend: Any) -> Callable[..., Any]:
    options = INDUCTOR_OPTIONS if backend == "inductor" else None
    return torch.compile(fn, dynamic=True, fullgraph=False, backend=backend, options=options)


@lru_cache(maxsize=1)
def _use_shared_cache() -> None:
    """Inductor's on-disk cache in one place per user (:data:`SHARED_CACHE`), shared by
    workers and runs, unless the user chose a folder.

    Inductor writes its own default (a temp folder) into ``TORCHINDUCTOR_CACHE_DIR`` the
    first time anything asks for its cache, which importing transformers' models does,
    before any merge: that value is no user's choice.
    """
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == _inductor_default():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(SHARED_CACHE)


SHARED_CACHE = Path.home() / ".cache" / "evomerge" / "inductor"


def _inductor_default() -> Optional[str]:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # another torch layout: only an unset variable is ours to set
        return None
    return os.path.abspath(default_cache_dir())


@lru_cache(maxsize=None)
def _raise_recompile_limit(n: int) -> None:
    """Dynamo's per-function variant limit raised to at least ``n`` for the process (named
    ``cache_size_limit`` before torch 2.6); once: a patch around every call cost about
    0.1 ms, as much as a small tensor's kernel."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(n, getattr(dynamo, name)))

"""TensorJob: one tensor of one candidate, as a merge method sees it.

A job resolves nothing itself (the engine planned the parameters); it gives the method
chunked access to the sources, the statistics the method asks for (computed once per
tensor by the engine and kept, all of them small), and the output to write into.
Chunks are flat ranges of the tensor of the engine's chunk size; ``blocks`` are
row or column blocks for methods that work on whole vectors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from evomerge.merge._kernels import delta_sum_into, pair_sums_kernel, scalars, weighted_sum_into
from evomerge.merge._random import SEGMENT, stream_key
from evomerge.merge._selection import EMPTY_BIN, LowBits, bin_bounds, flagged, in_bins_kernel
from evomerge.merge.methods.base import TensorPlan

if TYPE_CHECKING:
    from evomerge.merge.engine import MergeEngine

Block = tuple  # an index into the tensor: (slice(r0, r1),) rows or (Ellipsis, slice(c0, c1)) columns


class TensorJob:
    """One tensor of one candidate: parameters, chunked sources, statistics, output."""

    def __init__(self, engine: "MergeEngine", plan: TensorPlan, base: Optional[str], seed: int, shape: tuple[int, ...], out: torch.Tensor):
        self.engine = engine
        self.plan = plan
        self.name = plan.name
        self.inputs = plan.inputs
        self.per_model = plan.per_model
        self.shared = plan.shared
        self.base = base
        self.seed = seed
        self.shape = shape
        self.numel = math.prod(shape)
        self.out = out  # flat, contiguous, any float dtype, on the engine's device

    # ------------------------------------------------------------------ chunks
    @property
    def row_length(self) -> int:
        """Entries per row (the first dimension indexes rows; a 1-D tensor is one row)."""
        return self.numel // self.shape[0] if len(self.shape) >= 2 and self.shape[0] else max(self.numel, 1)

    def chunks(self, rows: bool = False) -> list[tuple[int, int]]:
        """Flat [a, b) ranges covering the tensor; whole rows when ``rows``. A chunk never
        crosses a multiple of 2**31 entries (the random draws' counter segments)."""
        step = self.engine.chunk_numel
        if rows:
            step = max(self.row_length, step // self.row_length * self.row_length)
        out = []
        a = 0
        while a < self.numel:
            b = min(a + step, self.numel, (a // SEGMENT + 1) * SEGMENT)
            out.append((a, b))
            a = b
        return out

    def read(self, ref: str, a: int, b: int) -> torch.Tensor:
        """Entries [a, b) of a source's tensor, as stored, on the engine's device."""
        return self.engine.read(ref, self.name, a, b)

    def out_chunk(self, a: int, b: int) -> torch.Tensor:
        return self.out[a:b]

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A kernel on one chunk, compiled or eager as the engine decides (by the chunk's size)."""
        return self.engine.kernels.run(fn, _chunk_numel(args), *args)

    # ------------------------------------------------------------------ blocks of vectors
    def blocks(self, vectors_along_first_dim: bool) -> list[Block]:
        """Index blocks holding whole vectors: rows (vectors along the last dimension) or
        columns (along the first), each about one chunk. A 1-D tensor is one block."""
        if len(self.shape) < 2:
            return [(Ellipsis,)]
        if vectors_along_first_dim:
            per = self.numel // self.shape[-1]
            step = max(1, self.engine.chunk_numel // per)
            return [(Ellipsis, slice(c, min(c + step, self.shape[-1]))) for c in range(0, self.shape[-1], step)]
        per = self.numel // self.shape[0]
        step = max(1, self.engine.chunk_numel // per)
        return [(slice(r, min(r + step, self.shape[0])),) for r in range(0, self.shape[0], step)]

    def read_block(self, ref: str, block: Block) -> torch.Tensor:
        return self.engine.full(ref, self.name).reshape(self.shape)[block].to(self.engine.device, torch.float32)

    def write_block(self, block: Block, value: torch.Tensor) -> None:
        self.out.view(self.shape)[block].copy_(value)

    # ------------------------------------------------------------------ common passes
    def weighted_sum(self, refs: Sequence[str], weights: Sequence[float], total: Optional[float] = None) -> None:
        """out = sum(w * source) [/ total], one fused pass."""
        w = scalars(weights)
        t = torch.tensor(1.0 if total is None else float(total), dtype=torch.float32)
        for a, b in self.chunks():
            self.run(weighted_sum_into, self.out_chunk(a, b), [self.read(r, a, b) for r in refs], w, t, total is not None)

    def delta_sum(self, refs: Sequence[str], weights: Sequence[float], base_weight: float) -> None:
        """out = sum(w * (source - base)) + base_weight * base, one fused pass."""
        w = scalars(weights)
        bw = torch.tensor(float(base_weight), dtype=torch.float32)
        for a, b in self.chunks():
            self.run(delta_sum_into, self.out_chunk(a, b), self.read(self.base, a, b), [self.read(r, a, b) for r in refs], w, bw)

    # ------------------------------------------------------------------ statistics
    def pair_sums(self, a_ref: str, b_ref: str, minus: Optional[str] = None) -> tuple[float, float, float]:
        """``a.a``, ``b.b``, ``a.b`` over the tensor (of ``a - minus``, ``b - minus``); kept."""
        key = ("pair", self.name, a_ref, b_ref, minus)
        return self.engine.stat(key, lambda: self._sums(pair_sums_kernel, [a_ref, b_ref], minus))

    def gram(self, models: Sequence[str]) -> list[float]:
        """``(m_i - base) . (m_j - base)`` for i <= j over the tensor; kept."""
        from evomerge.merge.methods.model_stock import offset_gram

        key = ("gram", self.name, self.base, tuple(models))

        def compute() -> list[float]:
            total = None
            for a, b in self.chunks():
                part = self.run(offset_gram, self.read(self.base, a, b), [self.read(m, a, b) for m in models]).double()
                total = part if total is None else total + part
            return total.tolist()

        return self.engine.stat(key, compute)

    def _sums(self, kernel: Callable[..., torch.Tensor], refs: list[str], minus: Optional[str]) -> tuple[float, ...]:
        total = None
        for a, b in self.chunks():
            part = self.run(kernel, *[self.read(r, a, b) for r in refs], None if minus is None else self.read(minus, a, b)).double()
            total = part if total is None else total + part
        return tuple(total.tolist())

    def delta_l1(self, models: Sequence[str]) -> list[float]:
        """Each model's task-vector L1 norm over the tensor; kept."""
        self.engine.delta_stats(self.base, list(models), self.name, self.chunks())
        return [self.engine.stat(("delta", self.name, self.base, m)).l1 for m in models]

    def order_stats(self, wanted: dict[str, list[int]], width: int) -> dict[tuple[str, int], float]:
        """Exact ``rank``-th largest task-vector magnitudes (1-based), per model: at most
        ``width`` ranks each, the same number for every candidate of a method.

        One pass over the tensor for the ranks not seen before (see
        :mod:`evomerge.merge._selection`); answers are kept for later candidates.
        """
        engine = self.engine
        models = [m for m, ranks in wanted.items() if ranks]
        engine.delta_stats(self.base, models, self.name, self.chunks())
        answers: dict[tuple[str, int], float] = {}
        todo: dict[str, list[tuple[int, int, int]]] = {}
        for m in models:
            hist = engine.stat(("delta", self.name, self.base, m)).histogram
            for r in wanted[m]:
                hit = engine.recall(("order", self.base, m, self.name, r))
                if hit is not None:
                    answers[(m, r)] = hit
                    continue
                b, rank_in_bin = hist.locate(r)
                value = hist.floor_value(b, rank_in_bin)
                if value is not None:  # a tie on the bin's floor: no pass
                    engine.remember(("order", self.base, m, self.name, r), value)
                    answers[(m, r)] = value
                    continue
                todo.setdefault(m, []).append((r, b, rank_in_bin))
        if todo:
            low = {m: LowBits() for m in todo}
            bins = {m: sorted({bin_ for _, bin_, _ in todo.get(m, ())}) for m in models}
            # one kernel variant for every candidate: all the models, ``width`` bins each
            # (empty ones padded), so a new candidate never recompiles it; no more, as each
            # costs compute in the pass
            bounds = [[bin_bounds(b) for b in bins[m]] + [EMPTY_BIN] * (width - len(bins[m])) for m in models]
            lows = [[torch.tensor(lo, dtype=torch.float32) for lo, _ in bb] for bb in bounds]
            highs = [[torch.tensor(hi, dtype=torch.float32) for _, hi in bb] for bb in bounds]
            for a, b in self.chunks():
                base = self.read(self.base, a, b)
                chunk = [self.read(m, a, b) for m in models]
                where = flagged(self.run(in_bins_kernel, base, chunk, lows, highs))
                if where.numel():  # the few entries in some model's bin, made again exactly as the kernel saw them
                    # index_select: advanced indexing took 40x longer for these few entries
                    b0 = base.index_select(0, where).to(torch.float32)
                    for m, x in zip(models, chunk):
                        if m in low:
                            low[m].add((x.index_select(0, where).to(torch.float32) - b0).abs(), *bins[m])
            for m, asks in todo.items():
                for r, b, rank_in_bin in asks:
                    value = low[m].value(b, rank_in_bin)
                    engine.remember(("order", self.base, m, self.name, r), value)
                    answers[(m, r)] = value
        return answers

    def draw_position(self, index: int, a: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Counter start and key of the random draws of the ``index``-th model for the
        chunk starting at ``a`` (0-d int32 tensors: no recompilation per tensor)."""
        segment, start = divmod(a, SEGMENT)
        key = stream_key(self.seed, index, self.name, segment)
        device = self.engine.device
        return torch.tensor(start, dtype=torch.int32, device=device), torch.tensor(key, dtype=torch.int32, device=device)


def _chunk_numel(args: Sequence[Any]) -> int:
    """Entries of the largest tensor among a kernel's arguments (lists looked into)."""
    sizes = [0]
    for x in args:
        for t in x if isinstance(x, (list, tuple)) else (x,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel())
    return max(sizes)

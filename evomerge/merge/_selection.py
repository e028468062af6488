"""Exact order statistics of task-vector magnitudes without a sorted copy.

TIES keeps the ``k`` entries of largest ``|delta|`` (mergekit sorts the whole tensor);
Breadcrumbs keeps a band between two order statistics. Both need the exact k-th
largest magnitude for any density a candidate asks. Keeping every tensor's sorted
magnitudes would cost 4 bytes per parameter and source, so instead:

1. once per (model, tensor), a histogram of the magnitudes over the top 17 bits of
   their float32 pattern (a non-negative float's bits sort like the float, so the bins
   are ordered; each spans 1/256 of an octave): a few kilobytes;
2. per new rank, the histogram names the bin holding the k-th largest and its rank
   inside the bin; one pass over the tensor counts the low 15 bits of the entries in
   that bin (a 32768-bin histogram), which gives the exact 32-bit pattern. (The finer
   the bins, the fewer entries that pass gathers: about 0.1% of a float32 task vector's
   per model, half what 16-bit bins left.)

The histogram also counts, per bin, the entries whose low 15 bits are zero (the bin's
smallest value). Differences of 16-bit sources are mostly such values (99% of a
bfloat16 family's task-vector entries: they are exact in 16 bits), so most ranks fall
on one of them and are answered from the histogram alone, with no pass; the pass then
looks only at the entries above the bin's floor, a few per bin.

Memory stays a few chunks and two small histograms whatever the tensor size, and the
answer is the value a full sort gives.

Example:
    >>> import torch
    >>> x = torch.randn(10_000).abs()
    >>> h = MagnitudeHistogram.of([x])
    >>> b, r = h.locate(123)
    >>> h.floor_value(b, r) is None   # not one of the bin's floor entries: one pass
    True
    >>> low = LowBits()
    >>> low.add(x, b)   # (the engine passes only the entries in or near the bin)
    >>> low.value(b, r) == float(torch.sort(x, descending=True).values[122])
    True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

LOW_SHIFT = 15  # the low bits counted inside a bin
LOW_MASK = (1 << LOW_SHIFT) - 1
HIGH_BINS = 1 << (31 - LOW_SHIFT)  # a non-negative float32's top 17 bits (sign bit 0)
LOW_BINS = 1 << LOW_SHIFT


def magnitude_bits(magnitudes: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of non-negative float32 values (ordered like the values)."""
    return magnitudes.contiguous().view(torch.int32)


def bits_value(bits: int) -> float:
    """The float32 whose bit pattern is ``bits`` (a non-negative int32)."""
    return _FLOAT32.unpack(_INT32.pack(bits))[0]


_INT32, _FLOAT32 = struct.Struct("<i"), struct.Struct("<f")


def bin_bounds(b: int) -> tuple[float, float]:
    """[low, high) of the magnitudes in high bin ``b`` (high is +inf for the top bin)."""
    top = (b + 1) << LOW_SHIFT
    return bits_value(b << LOW_SHIFT), (float("inf") if top >= 0x7F800000 else bits_value(top))


@dataclass
class MagnitudeHistogram:
    """How many magnitudes fall in each high bin, for the non-empty bins only, counted from
    the top down. (A task vector's bins span most of the float range, from its exact zeros
    up, but only a few thousand hold anything: kept whole, the histograms of a 300M
    model's tensors grew the engine's memory by 0.8 bytes per parameter; kept sparse, in
    int32 where a tensor's size allows, about 60 KB each for the largest.)"""

    bins: np.ndarray  # int32, ascending: the non-empty high bins
    above: np.ndarray  # above[j] = entries in bins >= bins[j] (int32, int64 for 2**31 entries or more)
    n: int
    floor: np.ndarray  # floor[j] = entries of bin bins[j] whose low bits are 0 (as ``above``)

    @classmethod
    def of(cls, chunks: Iterable[torch.Tensor]) -> "MagnitudeHistogram":
        counts = torch.zeros(2 * HIGH_BINS, dtype=torch.int64)
        for magnitudes in chunks:
            counts += histogram_chunk(magnitudes)
        return cls.from_counts(counts)

    @classmethod
    def from_counts(cls, counts: torch.Tensor) -> "MagnitudeHistogram":
        """From the counts of :func:`count_bins` (per bin: floor entries, then the others)."""
        pairs = counts.view(HIGH_BINS, 2).numpy()
        per_bin = pairs.sum(1)
        bins = np.flatnonzero(per_bin)
        kept = per_bin[bins]
        above = counts_above(torch.from_numpy(kept)).numpy()
        n = int(kept.sum())
        count_type = np.int32 if n < 2**31 else np.int64
        return cls(bins.astype(np.int32), above.astype(count_type), n, pairs[bins, 0].astype(count_type))

    def _index(self, b: int) -> int:
        """Position of the first non-empty bin >= ``b``."""
        return int(np.searchsorted(self.bins, b, side="left"))

    def count_at_or_above(self, b: int) -> int:
        j = self._index(b)
        return int(self.above[j]) if j < len(self.above) else 0

    def locate(self, rank: int) -> tuple[int, int]:
        """(bin, rank inside the bin) of the ``rank``-th largest magnitude (1-based)."""
        if not 1 <= rank <= self.n:
            raise ValueError(f"rank {rank} outside 1..{self.n}")
        # the highest bin whose count from the top reaches the rank
        b = int(self.bins[last_reaching(self.above, rank)])
        return b, rank - self.count_at_or_above(b + 1)

    def floor_value(self, b: int, rank_in_bin: int) -> Optional[float]:
        """The value when the rank falls on bin ``b``'s floor entries (low bits zero, the
        bin's smallest: they rank last in it); None when a pass must find it."""
        j = self._index(b)
        above_floor = self.count_at_or_above(b) - self.count_at_or_above(b + 1) - int(self.floor[j])
        if rank_in_bin <= above_floor:
            return None
        return bits_value(b << LOW_SHIFT)


def histogram_chunk(magnitudes: torch.Tensor) -> torch.Tensor:
    """Bin counts (see :func:`count_bins`) of one chunk of non-negative float32 magnitudes."""
    return count_bins(bin_codes(magnitude_bits(magnitudes)))


def bin_codes(bits: torch.Tensor) -> torch.Tensor:
    """Each entry's high bin times two, plus one when its low bits are not zero (int32)."""
    return (bits >> LOW_SHIFT) * 2 + ((bits & LOW_MASK) != 0).to(torch.int32)


def count_bins(codes: torch.Tensor) -> torch.Tensor:
    """Counts of a chunk's :func:`bin_codes` (2 per high bin: floor entries, the others), on the CPU."""
    return torch.bincount(codes.flatten(), minlength=2 * HIGH_BINS).cpu()


def delta_stats_kernel(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """For each model's task vector on one chunk: its L1 norm (float64) and each entry's
    bin code (int32, :func:`bin_codes`), in one fused pass reading the base once."""
    b = base.to(torch.float32)
    sums, codes = [], []
    for m in models:
        a = (m.to(torch.float32) - b).abs()
        sums.append(a.to(torch.float64).sum())
        codes.append(bin_codes(a.view(torch.int32)))
    return torch.stack(sums), codes


def counts_above(counts: torch.Tensor) -> torch.Tensor:
    """``above[j]`` = sum of ``counts[j:]`` (int64; empty for no counts)."""
    return torch.cumsum(counts.flip(0), 0).flip(0)


def last_reaching(above: "torch.Tensor | np.ndarray", rank: int) -> int:
    """The last index whose count from the top is at least ``rank`` (``above`` non-increasing)."""
    values = above.numpy() if isinstance(above, torch.Tensor) else above
    return int(np.searchsorted(-values, -rank, side="right")) - 1


EMPTY_BIN = (float("inf"), float("inf"))  # bounds no magnitude falls between
FLAG_WORD = 8  # int8 flags looked at 8 at a time (as int64 words) when finding the few set ones


def in_bins_kernel(base: torch.Tensor, models: list[torch.Tensor], lows: list[list[torch.Tensor]], highs: list[list[torch.Tensor]]) -> torch.Tensor:
    """Whether each entry's ``|model - base|`` falls, for some model, in one of that
    model's bins above the bin's floor ((low, high) float32 bounds): an int8 flag per
    entry, in one fused pass reading the base once. (Computed as float32, which inductor
    vectorizes, and converted once; which model's bin it is, is found again on the few
    flagged entries.)"""
    b = base.to(torch.float32)
    flags = torch.zeros_like(b)
    for m, lo, hi in zip(models, lows, highs):
        a = (m.to(torch.float32) - b).abs()
        inside = (a > lo[0]) & (a < hi[0])
        for low, high in zip(lo[1:], hi[1:]):
            inside = inside | ((a > low) & (a < high))
        flags = torch.maximum(flags, inside.to(torch.float32))
    return flags.to(torch.int8)


def flagged(flags: torch.Tensor) -> torch.Tensor:
    """Positions of the non-zero entries of a chunk's int8 flags (int64), few of many:
    the 8-byte words holding any are found first, then the entries inside them, gathered
    with ``index_select`` (about 2x faster than ``torch.nonzero`` over the whole chunk on
    a CPU; advanced indexing there ran 40x slower than ``index_select`` when other
    processes shared the cores)."""
    if flags.numel() % FLAG_WORD or flags.storage_offset() % FLAG_WORD:
        return torch.nonzero(flags).flatten()
    words = torch.nonzero(flags.view(torch.int64)).flatten()
    inside = torch.nonzero(flags.view(-1, FLAG_WORD).index_select(0, words))
    return words.index_select(0, inside[:, 0]) * FLAG_WORD + inside[:, 1]


class LowBits:
    """The low bits of the entries in some high bins above their floors (low bits not
    zero), gathered over chunks: kept as values while few (a chunk adds a handful),
    folded into a 32768-bin count when many, so memory stays bounded whatever the tensor
    size. Ranks count from the bin's top, as :meth:`MagnitudeHistogram.locate` gives them;
    a rank among the floor entries is :meth:`MagnitudeHistogram.floor_value`'s."""

    def __init__(self) -> None:
        self.values: dict[int, list[torch.Tensor]] = {}
        self.held: dict[int, int] = {}
        self.counts: dict[int, torch.Tensor] = {}

    def add(self, magnitudes: torch.Tensor, *bins: int) -> None:
        """Keep the entries of ``magnitudes`` (float32, >= 0, few: those in or near the bins) in ``bins``."""
        bits = magnitude_bits(magnitudes.flatten()).cpu().numpy()  # few entries: numpy, no thread start-up
        high = bits >> LOW_SHIFT
        low = bits & LOW_MASK
        for b in bins:
            inside = torch.from_numpy(low[(high == b) & (low != 0)])
            if inside.numel():
                self.values.setdefault(b, []).append(inside)
                self.held[b] = self.held.get(b, 0) + inside.numel()
                if self.held[b] > LOW_BINS:
                    self._fold(b)

    def _fold(self, b: int) -> None:
        pending = self.values.pop(b, [])
        if pending:
            self.counts[b] = self.counts.get(b, 0) + torch.bincount(torch.cat(pending).to(torch.int64), minlength=LOW_BINS)
        self.held[b] = 0

    def value(self, b: int, rank: int) -> float:
        """The ``rank``-th largest magnitude inside bin ``b`` (1-based), exactly."""
        if b in self.counts:
            self._fold(b)
            low = last_reaching(counts_above(self.counts[b]), rank)
        else:
            values = torch.cat(self.values[b])
            low = int(torch.kthvalue(values, values.numel() - rank + 1).values)  # the rank-th largest
        return bits_value((b << LOW_SHIFT) | low)

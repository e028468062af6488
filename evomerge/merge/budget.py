"""Memory the merge engine may use, and where it keeps the sources.

The engine never keeps anything of full-model size per source unless the budget has
room for it. On the CPU the sources stay memory-mapped (the page cache, shared by every
worker of the node) and the engine's own memory is a workspace of a few chunks. On a
GPU it copies as many sources as fit in the device budget (the base first) and streams
the others per chunk from the mapped files.

The default device budget is :data:`DEVICE_SHARE` of the device's memory, live model
included: on an 80 GB GPU, 60 GB for the live model, resident sources and workspace,
20 GB left for evaluation (activations, KV caches).

Example:
    >>> p = plan_placement([("base", 16 * 10**9), ("ft", 16 * 10**9)], device="cuda", live_model_bytes=16 * 10**9,
    ...                    n_models=1, device_total=80 * 10**9)
    >>> p.resident, p.peak_bytes <= 60 * 10**9
    (['base', 'ft'], True)
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Sequence, Union

from evomerge.errors import ConfigError
from evomerge.units import format_bytes, parse_bytes

CHUNK_NUMEL = {"cpu": 1 << 22, "cuda": 1 << 24}  # entries per chunk: float32 temporaries of 16 / 64 MiB
MIN_CHUNK_NUMEL = 1 << 16
DEVICE_SHARE = 0.75


def return_freed_host_memory() -> None:
    """Give the chunk temporaries the C allocator keeps back to the system.

    glibc serves allocations below its (self-raising, up to 32 MiB) mmap threshold from
    its heap and keeps freed heap memory: chunk-sized temporaries of varying sizes then
    pile up with every tensor (``bench scale`` measured DELLA's retained heap growing by
    about 3 bytes per parameter). Trimming after each large tensor keeps the engine's
    host memory at its workspace. (Trimming only when ``mallinfo2`` reported 32 MiB free
    was tried: DELLA's peak at 297M parameters rose from 850 to 1192 MiB.) A no-op where
    the C library has no ``malloc_trim``.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def workspace_chunks(n_models: int) -> int:
    """float32 chunk-sized temporaries a merge kernel holds at once with ``n_models`` inputs.

    Eager kernels (the GPU's) keep a delta, a mask, a draw and a term per model besides the
    consensus sums: ``bench scale`` measured 21.5 / 29 chunks for TIES and 27.8 / 46.9 for
    DARE-TIES with 2 / 4 fine-tunes (the heaviest methods); this bound covers them. Compiled
    CPU kernels need far fewer.
    """
    return 10 * n_models + 10


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the engine may use on the device (live model included) and on the host
    (its workspace when merging on the CPU). None: the default (see the module docstring)."""

    device: Optional[int] = None
    host: Optional[int] = None

    @classmethod
    def parse(cls, device: Any = None, host: Any = None, *, labels: tuple[str, str] = ("memory.device", "memory.host")) -> "MemoryBudget":
        """Sizes as given by a user (``60GB``); ``labels`` name them in errors."""
        return cls(
            None if device is None else parse_bytes(device, labels[0]),
            None if host is None else parse_bytes(host, labels[1]),
        )


@dataclass
class Placement:
    """What the engine holds where, decided once when it opens its sources."""

    device: str
    chunk_numel: int
    live_model_bytes: int
    workspace_bytes: int
    resident: list[str] = field(default_factory=list)  # sources copied to the device
    resident_bytes: int = 0
    streamed: list[str] = field(default_factory=list)  # read per chunk from the mapped files
    streamed_bytes: int = 0
    budget_bytes: Optional[int] = None

    @property
    def peak_bytes(self) -> int:
        """Device memory at merge time, live model included."""
        return self.live_model_bytes + self.resident_bytes + self.workspace_bytes

    def describe(self) -> str:
        """One line: what the engine holds where."""
        if self.device == "cpu":
            return (
                f"merge memory on cpu: live model {format_bytes(self.live_model_bytes)} + workspace "
                f"{format_bytes(self.workspace_bytes)}; sources memory-mapped ({format_bytes(self.streamed_bytes)} "
                "of files, read through the page cache the workers of this machine share)"
            )
        budget = f" of a {format_bytes(self.budget_bytes)} budget" if self.budget_bytes else ""
        held = f" + resident sources {format_bytes(self.resident_bytes)}" if self.resident else ""
        line = (
            f"merge memory on {self.device}: live model {format_bytes(self.live_model_bytes)}{held} + workspace "
            f"{format_bytes(self.workspace_bytes)} = {format_bytes(self.peak_bytes)}{budget}"
        )
        if self.streamed:
            line += f"; streamed from the host per merge: {len(self.streamed)} source(s), {format_bytes(self.streamed_bytes)}"
        return line


def plan_placement(
    source_bytes: Sequence[tuple[str, int]],
    *,
    device: str,
    live_model_bytes: int,
    n_models: int,
    budget: MemoryBudget = MemoryBudget(),
    device_total: Optional[int] = None,
) -> Placement:
    """Decide the chunk size and which sources live on the device.

    ``source_bytes``: (ref, bytes of its floating-point tensors as stored), base first;
    ``device_total``: the device's memory (read from CUDA when None).
    """
    kind = device.split(":")[0]
    chunk = CHUNK_NUMEL.get(kind, CHUNK_NUMEL["cuda"])
    per_chunk = 4 * workspace_chunks(n_models)
    if kind == "cpu":  # the device is the host: one budget, live model included
        limit = budget.host if budget.host is not None else budget.device
        if limit is not None:
            chunk = _fit_chunk(chunk, limit - live_model_bytes, per_chunk, "host")
        total = sum(b for _, b in source_bytes)
        return Placement("cpu", chunk, live_model_bytes, chunk * per_chunk, streamed=[r for r, _ in source_bytes], streamed_bytes=total, budget_bytes=limit)
    if budget.device is not None:
        limit = budget.device
    else:
        if device_total is None:
            import torch

            device_total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        limit = int(DEVICE_SHARE * device_total)
    room = limit - live_model_bytes
    if room <= 0:
        raise ConfigError(
            f"memory.device: the live model alone is {format_bytes(live_model_bytes)}, over the merge budget of "
            f"{format_bytes(limit)} on {device}; raise the budget or use a larger device"
        )
    chunk = _fit_chunk(chunk, room, per_chunk, "device")
    placement = Placement(device, chunk, live_model_bytes, chunk * per_chunk, budget_bytes=limit)
    free = room - placement.workspace_bytes
    for ref, size in source_bytes:  # the base first: every task vector reads it
        if size <= free:
            placement.resident.append(ref)
            placement.resident_bytes += size
            free -= size
        else:
            placement.streamed.append(ref)
            placement.streamed_bytes += size
    return placement


def _fit_chunk(chunk: int, room: int, per_chunk: int, which: str) -> int:
    """The largest power-of-two chunk (up to the default) whose workspace fits ``room``."""
    while chunk > MIN_CHUNK_NUMEL and chunk * per_chunk > room:
        chunk //= 2
    if room <= 0 or chunk * per_chunk > room:
        raise ConfigError(
            f"memory.{which}: {format_bytes(room)} leaves no room for the merge's workspace "
            f"({format_bytes(chunk * per_chunk)} at least); raise the budget"
        )
    return chunk

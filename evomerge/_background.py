"""Front members written in a thread while the worker merges its next candidate.

A worker's live model holds a front member's merge only until the next candidate is
merged into it. The worker copies the merged tensors to host memory (a snapshot: about
a second per 2 GB on a CPU, a device-to-host copy on a GPU) and a :class:`BackgroundWriter`
writes the folder from the copy while the worker goes on; safetensors releases the GIL
while it writes. One write is in flight per worker: a second member waits for the first,
so at most one snapshot is held. A write that fails is reported with the worker's next
result (or at :meth:`BackgroundWriter.drain` time); the driver then has the folder
written again from its recipe.

Example:
    >>> w = BackgroundWriter()
    >>> w.start(7, "pareto/7", lambda: None)
    >>> w.wait() >= 0.0
    True
    >>> [(d.trial, d.error) for d in w.drain()]
    [(7, None)]
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

#: The snapshot is taken only when the machine's available memory is at least this many
#: times its size; otherwise the member is written before the worker goes on.
SNAPSHOT_HEADROOM = 2.0


@dataclass(frozen=True)
class WriteDone:
    """A member folder a worker finished writing in the background (or failed to)."""

    trial: int
    folder: str
    seconds: float
    error: Optional[str] = None


class BackgroundWriter:
    """Runs one write at a time in a daemon thread; finished writes are drained by the caller."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._done: list[WriteDone] = []

    def start(self, trial: int, folder: str, write: Callable[[], object]) -> None:
        """Write in the background; waits first for a write still in flight."""
        self.wait()

        def run() -> None:
            t0, error = time.perf_counter(), None
            try:
                write()
            except Exception as exc:  # noqa: BLE001 - reported with the next result; the folder is written again
                error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            with self._lock:
                self._done.append(WriteDone(trial, folder, time.perf_counter() - t0, error))

        # A daemon: an interrupted run leaves a hidden temp folder, removed by the next sync.
        self._thread = threading.Thread(target=run, name=f"evomerge-member-{trial}", daemon=True)
        self._thread.start()

    def wait(self) -> float:
        """Wait for the write in flight, if any; returns the seconds waited."""
        thread, t0 = self._thread, time.perf_counter()
        if thread is not None:
            thread.join()
            self._thread = None
        return time.perf_counter() - t0

    def drain(self) -> list[WriteDone]:
        """The writes finished since the last drain."""
        with self._lock:
            done, self._done = self._done, []
        return done


def snapshot_fits(nbytes: int) -> bool:
    """Whether a host copy of ``nbytes`` leaves the machine room (see :data:`SNAPSHOT_HEADROOM`)."""
    available = _available_bytes()
    return available is not None and available >= SNAPSHOT_HEADROOM * nbytes


def _available_bytes() -> Optional[int]:
    """MemAvailable (free memory plus reclaimable page cache) on Linux; None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

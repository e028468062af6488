"""The serial executor: one Worker in the driver's process.

``workers`` sets how many jobs may be in flight (slots), so the driver sees the same
scheduling as with that many parallel workers; jobs then run one after another, in
submission order, when results are polled.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from evomerge._background import WriteDone
from evomerge.worker import Job, JobResult, Worker, WorkerSpec


class SerialExecutor:
    def __init__(self, spec: WorkerSpec, *, workers: int = 1, worker: Optional[Worker] = None):
        self.slots = workers
        self.worker = worker or Worker(spec, worker_id="serial-0")
        self._queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        if not self._queue:
            return []
        return [self.worker.run(self._queue.popleft())]

    def in_flight(self) -> int:
        return len(self._queue)

    def cancel_all(self) -> list[Job]:
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    def flush(self) -> list[WriteDone]:
        return self.worker.flush_writes()

    def shutdown(self) -> None:
        self._queue.clear()

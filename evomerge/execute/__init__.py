"""Executors: where candidates are merged and scored.

One protocol, small classes in a registry: ``serial`` runs a :class:`~evomerge.worker.Worker`
in the driver's process (tests, small runs); ``ray`` runs a pool of worker actors.
Both run the same Worker code, so the same seed gives the same values.

Example:
    >>> ex = build_executor("serial", spec, workers=2)   # doctest: +SKIP
    >>> ex.submit(Job(trial=0, recipe=recipe.to_dict()))  # doctest: +SKIP
    >>> [result] = ex.poll()                              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Protocol

from evomerge.errors import ConfigError
from evomerge.worker import Job, JobResult, WorkerSpec


class Executor(Protocol):
    """Runs jobs on workers; ``slots`` jobs may be in flight at once."""

    slots: int

    def submit(self, job: Job) -> None: ...

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        """Finished results; waits (up to ``timeout``) until at least one is there."""
        ...

    def in_flight(self) -> int: ...

    def cancel_all(self) -> list[Job]:
        """Drop every job not yet finished; returns them."""
        ...

    def shutdown(self) -> None: ...


def build_executor(kind: str, spec: WorkerSpec, *, workers: int = 1, **options: Any) -> Executor:
    from evomerge.execute.serial import SerialExecutor

    registry: dict[str, Any] = {"serial": SerialExecutor}
    try:
        from evomerge.execute.ray import RayExecutor

        registry["ray"] = RayExecutor
    except ImportError:
        pass
    if kind not in registry:
        raise ConfigError(f"unknown executor {kind!r} (known: {', '.join(sorted(registry))})")
    return registry[kind](spec, workers=workers, **options)

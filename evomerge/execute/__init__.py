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

from typing import Any, Optional, Protocol

from evomerge.errors import ConfigError
from evomerge._background import WriteDone
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

    def flush(self) -> list[WriteDone]:
        """Wait for the front members workers write in the background; those finished
        since the workers' last results."""
        ...

    def shutdown(self) -> None: ...


def build_executor(config: Any, spec: WorkerSpec, *, workers: Optional[int] = None, **options: Any) -> Executor:
    """The executor an ``executor:`` config names (a mapping, a kind, or its config model).

    Kinds live in :data:`evomerge.run_config.EXECUTORS`, each with its config model; a new
    executor is one module and one :func:`~evomerge.run_config.register_executor` call.
    """
    from pydantic import ValidationError

    from evomerge.errors import validation_message
    from evomerge.run_config import EXECUTORS, executor_config

    try:
        cfg = executor_config({"kind": config} if isinstance(config, str) else config)
    except ValidationError as exc:
        raise ConfigError(f"executor.{validation_message(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"executor.{exc}") from None
    return EXECUTORS.load(cfg.kind)(spec, workers=workers or cfg.workers, **{**cfg.options(), **options})

"""The command line's progress reporter: :mod:`evomerge.progress` events drawn as rich bars."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from evomerge.progress import Event, set_reporter


class RichReporter:
    """One bar per open task: label, bar, done/total, elapsed, a status line cut to fit."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._tasks: dict[int, Any] = {}

    def __call__(self, e: Event) -> None:
        if e.kind == "start":
            if self._progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
                self._progress.__enter__()
            self._tasks[e.id] = self._progress.add_task(e.task, total=e.total, info="")
        elif self._progress is None or e.id not in self._tasks:
            return
        elif e.kind == "advance":
            room = max(12, self._progress.console.width - 48)  # label, bar, counts, time: cut the details, not them
            info = e.info if len(e.info) <= room else e.info[: room - 1] + "…"
            self._progress.update(self._tasks[e.id], completed=e.completed, info=info)
        elif e.kind == "message":
            self._progress.console.print(e.text, markup=False, highlight=False)
        elif e.kind == "end":
            self._tasks.pop(e.id)
            if not self._tasks:
                self._progress.__exit__(None, None, None)
                self._progress = None

    def close(self) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None


@contextlib.contextmanager
def rich_progress(*, enabled: bool = True) -> Iterator[None]:
    """Events of the library drawn as rich bars while the block runs (nothing when not enabled)."""
    if not enabled:
        yield
        return
    renderer = RichReporter()
    previous = set_reporter(renderer)
    try:
        yield
    finally:
        set_reporter(previous)
        renderer.close()

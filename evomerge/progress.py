"""Progress as events: the library reports, the application decides how (or whether) to show them.

Long work (a search, a zoo build, a benchmark) opens a :func:`task`, advances it and may
say a line; each step is an :class:`Event` handed to the current reporter. Imported as a
library, evomerge has no reporter and says nothing; the command line installs one that
draws rich progress bars (:mod:`evomerge.cli._render`). A script may install its own.

Example:
    >>> seen = []
    >>> previous = set_reporter(seen.append)
    >>> with task("search", total=2) as t:
    ...     t.advance(1, info="best 0.5")
    ...     t.say("trial 1 failed: boom")
    >>> [(e.kind, e.completed, e.info or e.text) for e in seen]
    [('start', None, ''), ('advance', 1, 'best 0.5'), ('message', None, 'trial 1 failed: boom'), ('end', None, '')]
    >>> _ = set_reporter(previous)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

__all__ = ["Event", "Reporter", "Task", "reporter", "set_reporter", "task"]


@dataclass(frozen=True)
class Event:
    kind: str  # start, advance, message, end
    task: str  # the task's label, such as "search"
    id: int  # tells apart two tasks of the same label
    total: Optional[int] = None  # start: how many steps (None: unknown)
    completed: Optional[int] = None  # advance: steps done so far
    info: str = ""  # advance: a short status line
    text: str = ""  # message: a line to show above the bars


Reporter = Callable[[Event], None]
_current: Optional[Reporter] = None
_ids = itertools.count()


def set_reporter(new: Optional[Reporter]) -> Optional[Reporter]:
    """Install ``new`` (None: quiet); returns the reporter it replaces."""
    global _current
    previous, _current = _current, new
    return previous


def reporter() -> Optional[Reporter]:
    return _current


class Task:
    """One piece of long work; its events go to the reporter current when it started."""

    def __init__(self, label: str, total: Optional[int], to: Optional[Reporter]):
        self.label, self.total, self.id = label, total, next(_ids)
        self._to = to

    def _emit(self, kind: str, **fields: Any) -> None:
        if self._to is not None:
            self._to(Event(kind, self.label, self.id, **fields))

    def advance(self, completed: int, *, info: str = "") -> None:
        self._emit("advance", completed=completed, info=info)

    def say(self, text: str) -> None:
        self._emit("message", text=text)

    def __enter__(self) -> "Task":
        self._emit("start", total=self.total)
        return self

    def __exit__(self, *exc: Any) -> bool:
        self._emit("end")
        return False


def task(label: str, total: Optional[int] = None, *, enabled: bool = True) -> Task:
    """A task reporting to the current reporter (to none when ``enabled`` is false)."""
    return Task(label, total, _current if enabled else None)

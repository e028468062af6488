"""One driver at a time per study: a lease kept in the study itself, with a heartbeat.

Optuna's storages offer no compare-and-set, only "set an attribute" and "read them all".
The lease is built from those two alone:

1. **Look.** Read every claim (study system attributes ``evomerge:lease:<id>``). A claim
   whose heartbeat is younger than the timeout belongs to a live driver: refuse, naming
   its host, process and start.
2. **Claim.** Write our own claim: host, pid, start time, heartbeat.
3. **Settle.** Wait ``settle`` seconds (0.2), far longer than a storage write takes to
   be seen by every reader (journal and RDB writes are synchronous commits).
4. **Read back.** Read every claim again. Of the live ones, the earliest start wins
   (ties: the smaller id). Each of two drivers that both got past step 1 wrote its
   claim before the other read back (each wrote, then waited), so both read the same
   two claims and agree on one winner; the loser withdraws its claim and refuses.

A driver that comes later sees a live claim in step 1. The start is stamped right
before the claim is written, so "earliest start" is "first written" up to the clocks'
agreement. While it runs, the winner stamps
its heartbeat every ``timeout / 4`` seconds from a thread. A driver killed without
releasing (``kill -9``, a lost machine) stops stamping: once its heartbeat is older
than ``timeout`` its claim is dead, and the next driver takes over. The heartbeat is
compared with the reader's clock, so machines sharing a study need clocks that agree
to well within the timeout (NTP does). A driver that finds a newer live claim than its
own while it runs (its heartbeat stalled past the timeout and another took over) marks
the lease :attr:`Lease.lost`, and the search stops instead of writing beside it.

The timeout is ``EVOMERGE_LEASE_TIMEOUT`` seconds (default 60), or the ``timeout``
argument.

Example:
    >>> import optuna
    >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
    >>> study = optuna.create_study()
    >>> with Lease(study, timeout=1.0, settle=0.01) as lease:
    ...     try:
    ...         Lease(study, timeout=1.0, settle=0.01).acquire()
    ...     except LeaseHeld as exc:
    ...         print(str(exc).split(" (")[0])
    another driver runs this study: ... pid ...
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from evomerge.errors import EvomergeError

_PREFIX = "evomerge:lease:"
DEFAULT_TIMEOUT = 60.0
#: Seconds between writing a claim and reading the claims back: far more than a storage
#: write takes to be visible to every reader (they are synchronous commits).
SETTLE = 0.2


class LeaseHeld(EvomergeError):
    """Another live driver holds the study (exit code 2)."""


def lease_timeout() -> float:
    """The heartbeat timeout: ``EVOMERGE_LEASE_TIMEOUT`` seconds, else 60."""
    text = os.environ.get("EVOMERGE_LEASE_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise EvomergeError(f"EVOMERGE_LEASE_TIMEOUT={text!r}: expected seconds") from None
    if not value > 0:
        raise EvomergeError(f"EVOMERGE_LEASE_TIMEOUT={text!r}: must be more than 0 seconds")
    return value


class Lease:
    """The right to drive one study, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, study: Any, *, timeout: Optional[float] = None, settle: Optional[float] = None):
        self.study = study
        self.timeout = lease_timeout() if timeout is None else float(timeout)
        self.settle = min(SETTLE, self.timeout / 4) if settle is None else float(settle)
        self.id = uuid.uuid4().hex[:12]
        self.claim = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "beat": time.time(), "id": self.id}
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ storage
    def _claims(self) -> dict[str, dict]:
        attrs = self.study._storage.get_study_system_attrs(self.study._study_id)
        return {k[len(_PREFIX):]: v for k, v in attrs.items() if k.startswith(_PREFIX) and v}

    def _write(self, value: Optional[dict]) -> None:
        self.study._storage.set_study_system_attr(self.study._study_id, _PREFIX + self.id, value)

    def _live(self, claims: dict[str, dict], now: float) -> list[dict]:
        return [c for c in claims.values() if now - c["beat"] < self.timeout]

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> "Lease":
        others = [c for c in self._live(self._claims(), time.time()) if c["id"] != self.id]
        if others:
            raise LeaseHeld(self._describe(min(others, key=_order)))
        self.claim["since"] = self.claim["beat"] = time.time()
        self._write(self.claim)
        time.sleep(self.settle)
        live = self._live(self._claims(), time.time())
        winner = min(live, key=_order) if live else self.claim
        if winner["id"] != self.id:
            self._write(None)
            raise LeaseHeld(self._describe(winner))
        self._thread = threading.Thread(target=self._beat, name="evomerge-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.lost:
            self._write(None)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.timeout / 4):
            try:
                now = time.time()
                newer = [c for c in self._live(self._claims(), now) if c["id"] != self.id and _order(c) > _order(self.claim)]
                if newer:
                    self.lost = True  # another driver took the study over while we stalled
                    return
                self.claim["beat"] = now
                self._write(self.claim)
            except Exception:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                continue

    def _describe(self, claim: dict) -> str:
        since = datetime.fromtimestamp(claim["since"], timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
        ago = max(0.0, time.time() - claim["beat"])
        return (
            f"another driver runs this study: {claim['host']} pid {claim['pid']} since {since} "
            f"(heartbeat {ago:.0f} s ago; if it died, it is taken over {self.timeout:.0f} s after its last heartbeat)"
        )


def _order(claim: dict) -> tuple[float, str]:
    return (claim["since"], claim["id"])

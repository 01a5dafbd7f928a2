"""The event log: every change of every job, numbered, kept in the job root.

Each state change (and each restart, escalation and checkpoint commit) is one
event with a sequence number that only grows, also across server restarts:
the log is a JSON-lines file in the job root (``.events/events.jsonl``),
appended as events happen and read back at start. Clients follow it with
``GET /cumulus/api/events?since=N&wait=S`` (a long-poll), so the panel, the
widgets and JupyterLab's notifications learn what changed without re-reading
every job. It is bounded: the newest ``max_events`` events no older than
``max_age`` seconds are kept; the file is rewritten (atomically) once it holds
twice that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes

#: The event log's directory in the job root (not a job id, so not a job).
EVENTS_DIR = ".events"
EVENTS_FILE = "events.jsonl"
#: The kind of an event that is a job's change of state (``old`` -> ``new``).
STATE_CHANGE = "state"


def _line(event: dict[str, Any]) -> bytes:
    """One event as the log's file holds it: one JSON line."""
    return (json.dumps(event, separators=(",", ":"), default=str) + "\n").encode()


class EventLog:
    """The numbered events of one job root, in memory and on disk."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        max_events: int = 10_000,
        max_age: float = 30 * 86400,
        log: logging.Logger | None = None,
    ) -> None:
        self.path = Path(root) / EVENTS_DIR / EVENTS_FILE
        self.max_events = max_events
        self.max_age = max_age
        self.log = log or logging.getLogger("cumulus_jupyter")
        self._events: deque[dict[str, Any]] = deque()
        self._last = 0
        self._on_disk = 0  # lines in the file, kept ones or not
        self._changed: asyncio.Event | None = None  # made by the first waiter
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._load()

    # -- reading --------------------------------------------------------------------

    @property
    def last(self) -> int:
        """The sequence number of the newest event (0 before the first)."""
        return self._last

    @property
    def first(self) -> int:
        """The sequence number of the oldest event kept (``last + 1`` when none is)."""
        return self._events[0]["seq"] if self._events else self._last + 1

    def since(self, seq: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Events after ``seq``, oldest first, at most ``limit``."""
        if seq >= self._last:
            return []
        out = []
        # Newest at the right: walk back to seq, then return in order.
        for event in reversed(self._events):
            if event["seq"] <= seq:
                break
            out.append(event)
        out.reverse()
        return out[:limit]

    async def wait(self, seq: int, timeout: float) -> None:
        """Return once there is an event after ``seq``, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._last <= seq:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            event = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), left)

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(event)`` for every event from now on (webhooks)."""
        self._listeners.append(listener)

    # -- writing --------------------------------------------------------------------

    def add(self, **fields: Any) -> dict[str, Any]:
        """Number, keep, append and announce one event."""
        self._last += 1
        event = {"seq": self._last, "time": time.time(), **fields}
        self._events.append(event)
        self._trim()
        self._append(event)
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not lose the event for the others
                self.log.exception("cumulus: an event listener failed")
        return event

    def _append(self, event: dict[str, Any]) -> None:
        # One write() of one line on an O_APPEND descriptor: whole lines, in
        # order, and in the page cache before the next event (a SIGKILLed
        # server loses none). Not fsynced: the job records, which are, say
        # where each job ended up after a power loss.
        line = _line(event)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as e:
            self.log.error("cumulus: could not write event %d: %s", event["seq"], e)
            return
        self._on_disk += 1
        if self._on_disk > 2 * self.max_events:
            self._compact()

    def _trim(self) -> None:
        # The file always holds the newest event (compaction follows an add),
        # so numbering goes on after a restart even when all else is dropped.
        old = time.time() - self.max_age
        while self._events and (
            len(self._events) > self.max_events or self._events[0]["time"] < old
        ):
            self._events.popleft()

    def _compact(self) -> None:
        """Rewrite the file with the kept events only (atomically: a crash keeps either)."""
        data = b"".join(_line(e) for e in self._events)
        try:
            atomic_write_bytes(self.path, data, durable=False)
        except OSError as e:
            self.log.error("cumulus: could not compact %s: %s", self.path, e)
            return
        self._on_disk = len(self._events)

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.error("cumulus: could not read the event log %s: %s", self.path, e)
            return
        if raw and not raw.endswith(b"\n"):
            # The last line was cut by a crash mid-write: end it, so the next
            # event starts a line of its own.
            with contextlib.suppress(OSError), open(self.path, "ab") as f:
                f.write(b"\n")
        for line in raw.splitlines():
            self._on_disk += 1
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write: the next is whole again
            seq = event.get("seq") if isinstance(event, dict) else None
            if isinstance(seq, int) and seq > self._last:
                self._events.append(event)
                self._last = seq
        self._trim()

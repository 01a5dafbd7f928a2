"""Watching running jobs: ended processes, duration limits, pauses and cancels nobody answered.

The :class:`Monitor` looks at every running job a few times a second and
tells the manager what it found; the manager makes the state change. The
policies are plain functions: when to escalate (:func:`escalation_due`) and
how to tell the user how a run ended (:func:`end_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Literal

from ..states import RUNNING_STATES, JobState
from .record import JobRecord

if TYPE_CHECKING:
    from .manager import JobManager

INTERVAL = 0.2
#: Below this much free space a job that died is said to have met a full disk.
LOW_DISK = 16 << 20

Escalation = Literal["sigterm", "sigkill"]


def escalation_due(
    job: JobRecord, now: float, pause_timeout: float, kill_grace: float
) -> Escalation | None:
    """The signal a run that did not stop in time gets now, if any.

    A cancel sends SIGTERM at once and SIGKILL ``kill_grace`` later; a pause
    (or a reached duration limit) waits ``pause_timeout`` for the job to stop
    by itself, then SIGTERM, then SIGKILL ``kill_grace`` after that.
    """
    if job.cancel_requested:
        late = now - job.cancel_requested >= kill_grace
        return "sigkill" if late and job.escalation != "sigkill" else None
    if job.state is not JobState.PAUSING or job.pause_requested is None:
        return None
    if job.escalation is None and now - job.pause_requested >= pause_timeout:
        return "sigterm"
    if (
        job.escalation == "sigterm"
        and job.escalated_at is not None
        and now - job.escalated_at >= kill_grace
    ):
        return "sigkill"
    return None


def duration_reached(job: JobRecord, now: float) -> bool:
    """A running job's run has used up its duration limit (it is then paused)."""
    return bool(
        job.duration
        and job.state is JobState.RUNNING
        and not job.cancel_requested
        and job.started is not None
        and now - job.started >= job.duration
    )


def end_message(
    new: JobState,
    *,
    error: str | None,
    exit_code: int | None,
    escalation: str | None,
    stopped_by_signal: bool,
    last_line: str = "",
    free_bytes: int | None = None,
    note: str = "",
) -> str:
    """What the record says about a run that ended in state ``new``."""
    if new is JobState.LOST:
        message = (
            "the job process ended without recording an outcome"
            + _how_it_ended(exit_code)
            + (f" ({note})" if note else "")
            + "; see its log, resume it from its last checkpoint"
        )
        if last_line:
            message += f". Last output: {last_line}"
        if free_bytes is not None and free_bytes < LOW_DISK:
            message += (
                f". The disk holding the job root is full ({free_bytes / 2**20:.1f} MiB free): "
                "free space, then resume the job"
            )
    else:
        message = {
            JobState.COMPLETED: "completed",
            JobState.FAILED: error or "the job raised an exception",
            JobState.CANCELLED: "cancelled",
            JobState.PAUSED: "paused",
            JobState.TIMED_OUT: "duration limit reached; resume to continue",
        }[new]
    notes = []
    if escalation and new in (JobState.PAUSED, JobState.TIMED_OUT):
        notes.append(f"did not stop in time: {escalation} sent")
    if stopped_by_signal:
        notes.append(f"while stopping on {escalation}, it raised {error or 'an exception'}")
    if notes:
        message += f" ({'; '.join(notes)})"
    return message


def _how_it_ended(exit_code: int | None) -> str:
    """`` (killed by SIGKILL)`` for a negative status (as Popen gives it), else the status."""
    if exit_code is None:
        return ""
    if exit_code < 0:
        with contextlib.suppress(ValueError):
            # SIGKILL from outside is also how the kernel's OOM killer ends a process.
            return f" (killed by {signal.Signals(-exit_code).name}, exit status {exit_code})"
    return f" (exit status {exit_code})"


class Monitor:
    """A task of the server's event loop that watches the manager's running jobs."""

    def __init__(self, manager: JobManager, log: logging.Logger, interval: float = INTERVAL):
        self.manager = manager
        self.log = log
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def tick(self) -> None:
        """One look at every running job: ended, out of time, overdue to stop."""
        manager = self.manager
        now = time.time()
        backend = manager.backend
        for job in list(manager.jobs.values()):
            if manager.placing(job):
                manager.check_placement(job)
            if job.state not in RUNNING_STATES or manager.finishing(job.id):
                continue
            handle = manager.handle(job)
            if handle is None or not backend.is_alive(handle):
                manager.finish_soon(job.id)  # admits once the share is free
                continue
            if backend.places_runs and not job.devices:
                manager.learn_devices(job)
            manager.note_checkpoints(job)
            if duration_reached(job, now):
                manager.pause(job.id, reason="duration")
            signal = escalation_due(job, now, manager.pause_timeout, manager.kill_grace)
            if signal is not None:
                manager.escalate(job.id, signal)

    async def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad job must not stop the watching of the others
                self.log.exception("cumulus: monitor pass failed")
            await asyncio.sleep(self.interval)

"""The job lifecycle: states and the transitions the manager allows.

::

    queued -> running -> pausing -> paused -> (resume) -> queued -> running ...
                      -> completed | failed | cancelled | timed_out | lost
"""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """Where a job is in its lifecycle (the ``state`` field of a job record)."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    def __str__(self) -> str:
        return self.value


#: A process exists (or is about to) for jobs in these states.
ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.PAUSING})
#: States a job can be resumed from: it stopped with its checkpoints kept.
RESUMABLE = frozenset({JobState.PAUSED, JobState.TIMED_OUT, JobState.LOST})
#: States no operation leaves, except forgetting the job.
TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

#: Every legal transition; the manager refuses anything else with 409.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {
            JobState.PAUSING,
            JobState.COMPLETED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.LOST,
            JobState.PAUSED,  # stopped by a SIGTERM from outside the server: resumable
        }
    ),
    JobState.PAUSING: frozenset(
        {
            JobState.PAUSED,
            JobState.TIMED_OUT,
            JobState.COMPLETED,
            JobState.FAILED,
            JobState.CANCELLED,
            JobState.LOST,
        }
    ),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.TIMED_OUT: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.LOST: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.COMPLETED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def can_transition(src: JobState, dst: JobState) -> bool:
    """Whether the lifecycle allows going from ``src`` to ``dst``."""
    return dst in TRANSITIONS[src]

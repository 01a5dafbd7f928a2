"""The job lifecycle, the one authority on it: states, transitions, actions, outcomes.

::

    queued -> running -> pausing -> paused -> (resume) -> queued -> running ...
                      -> completed | failed | cancelled | timed_out | lost

Every state change of the server goes through :func:`can_transition`; what a
user may do to a job now is :func:`actions` (the job record carries it, and
the widgets, magics and the JupyterLab panel show exactly those buttons); how
a run ended is decided by :func:`run_outcome` (in the job process) and
:func:`end_state` (in the server), side by side below.

*Cancelling* is a phase of ``running`` and ``pausing``, not a state of its
own: the job has been sent SIGTERM and its record's ``cancel_requested`` is
set. Nothing but waiting is left to do then, so :func:`actions` offers none.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any


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
#: A run's process exists (or did until the server notices it ended).
RUNNING_STATES = frozenset({JobState.RUNNING, JobState.PAUSING})
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


class Action(str, Enum):
    """What a user can ask of a job (the ``actions`` field of a job record)."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    DELETE = "delete"

    def __str__(self) -> str:
        return self.value


def actions(state: JobState, *, cancelling: bool = False, damaged: bool = False) -> list[Action]:
    """What may be asked of a job in ``state`` now, in button order.

    A damaged job (its record could not be read) can only be deleted.
    """
    if damaged:
        return [Action.DELETE]
    if cancelling and state in ACTIVE:
        return []
    out = []
    if state is JobState.RUNNING:
        out.append(Action.PAUSE)
    if state in RESUMABLE:
        out.append(Action.RESUME)
    if state not in TERMINAL:
        out.append(Action.CANCEL)
    if state not in ACTIVE:
        out.append(Action.DELETE)
    return out


def refusal(action: Action, state: JobState, *, cancelling: bool = False) -> str | None:
    """Why ``action`` is not allowed on a job in ``state``, or ``None`` when it is.

    The reason reads after "job <id> ": ``"is paused; only a running job can pause"``.
    """
    if action in actions(state, cancelling=cancelling):
        return None
    if cancelling and state in ACTIVE:
        return f"is being cancelled; it cannot {action.value} now"
    if action is Action.PAUSE:
        if state is JobState.PAUSING:
            return "is already pausing"
        return f"is {state.value}; only a running job can pause"
    if action is Action.RESUME:
        return f"is {state.value}; only a paused, timed-out or lost job can resume"
    if action is Action.DELETE:
        return f"is {state.value}; cancel it before deleting it"
    return f"is {state.value}; it cannot be cancelled"


# -- how a run ended ------------------------------------------------------------------
#
# The job process knows what its function did; the server knows what it asked
# for and whether it had to send signals. Each side classifies with what it
# knows; the server's verdict is the job's state.


def run_outcome(*, ok: bool, stopped: bool, control: Mapping[str, Any]) -> JobState:
    """The job process's own account of its run, written to ``state.json``.

    ``ok``: the function returned (it did not raise); ``stopped``: it stopped
    because it was asked to (a signal interrupted it, or should_pause() told it
    to); ``control``: the server's instructions as the run ends.
    """
    if not ok:
        return JobState.FAILED
    if control.get("cancel"):
        return JobState.CANCELLED
    if stopped:
        return JobState.TIMED_OUT if control.get("reason") == "duration" else JobState.PAUSED
    return JobState.COMPLETED


def end_state(
    reported: JobState | None,
    *,
    pause_reason: str | None,
    cancel_requested: bool,
    signalled: bool,
) -> JobState:
    """The state a job takes when its run's process has ended.

    ``reported`` is the run's own account (:func:`run_outcome`), ``None`` when
    it left none; ``pause_reason`` is set when the server asked it to pause
    (``"duration"`` for a reached time limit); ``signalled`` when the server
    sent it SIGTERM or SIGKILL.
    """
    # SIGTERM raises JobInterrupted wherever the job is, an import included;
    # code interrupted halfway may then fail with any exception. A run that
    # failed after the server signalled it was stopped by the server: it ends
    # as the cancel or the pause asked.
    stopped_by_signal = reported is JobState.FAILED and signalled
    if reported is JobState.COMPLETED or (reported is JobState.FAILED and not stopped_by_signal):
        return reported
    if cancel_requested or reported is JobState.CANCELLED:
        return JobState.CANCELLED
    if reported in (JobState.PAUSED, JobState.TIMED_OUT) or pause_reason:
        if pause_reason == "duration" or reported is JobState.TIMED_OUT:
            return JobState.TIMED_OUT
        return JobState.PAUSED
    return JobState.LOST

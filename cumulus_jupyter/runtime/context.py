"""Inside the job process: where the job is and whether it has been asked to pause.

Imported by the worker before anything slow, so it imports no torch (nor
does the ``runtime`` package itself: its names load on first use).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import signal
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from ..fileio import make_private_dir
from ..jobdir import (
    CONTROL_POLL_ENV,
    JOB_DIR_ENV,
    JOB_ID_ENV,
    PAUSE_AT_ENV,
    RUN_ENV,
    JobDir,
)

#: How often should_pause() looks at control.json when no signal arrived
#: (a fallback for a lost signal, e.g. a job re-adopted after a server restart).
#: A backend that cannot signal its runs (Ray) sets CUMULUS_CONTROL_POLL lower.
_CONTROL_POLL_SECONDS = 1.0


def _control_poll_seconds() -> float:
    # Read when polling, not at import: a warm template imports this module
    # before any job's environment exists.
    try:
        value = float(os.environ.get(CONTROL_POLL_ENV, _CONTROL_POLL_SECONDS))
    except ValueError:
        return _CONTROL_POLL_SECONDS
    return min(max(value, 0.01), 60.0)


class JobInterrupted(BaseException):
    """Raised in the job when SIGTERM or SIGINT stopped it (after saving, if guarded).

    A ``BaseException`` like ``KeyboardInterrupt``, so ``except Exception``
    in training code does not swallow it.
    """

    def __init__(self, signum: int, checkpoint: str | None = None):
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


_pause_requested = False
_pause_observed = False
_next_control_check = 0.0


def in_job() -> bool:
    """True inside a job process started by the cumulus server."""
    return JOB_DIR_ENV in os.environ


def job_dir() -> Path:
    """The directory of the current job.

    Outside a job (debugging the training code in a kernel) this is
    ``./cumulus-local``, created on first use, so the same code runs unchanged.
    """
    env = os.environ.get(JOB_DIR_ENV)
    if env:
        return Path(env)
    return make_private_dir(Path.cwd() / "cumulus-local")


def current_run() -> int:
    """This process's run of the job (1, 2, ...); 1 outside a job."""
    try:
        run = int(os.environ.get(RUN_ENV, "1"))
    except ValueError:
        return 1
    return run if run >= 1 else 1


def job_id() -> str | None:
    """The id of the current job, or ``None`` outside a job."""
    return os.environ.get(JOB_ID_ENV)


def read_control() -> dict[str, Any]:
    """The server's instructions to this job (``control.json``); empty outside a job."""
    if not in_job():
        return {}
    return JobDir(job_dir()).read_control()


def request_pause(*_: Any) -> None:
    """Mark the job as asked to pause. Installed as the pause signal's handler."""
    global _pause_requested
    _pause_requested = True


def should_pause() -> bool:
    """Whether the job was asked to pause; call it at every batch boundary.

    It costs a flag test and a clock read almost always (about 0.1 us): the
    server signals the process when it writes the pause flag, and
    ``control.json`` is looked at no more than once a second as a fallback.
    Outside a job it is always ``False``.

    In a job of several ranks every rank gets the same answer at the same
    call (call it at the same points on every rank), one call after the
    request reached them: all ranks stop after the same step.
    """
    global _pause_observed
    asked = _pause_requested
    if not asked:
        now = _monotonic()
        asked = now >= _next_control_check and _look_at_control(now)
    if _agreement is not None:
        asked = _agreement(asked)
    if asked:
        _pause_observed = True
    return asked


#: Set in a job of several ranks (see :mod:`.ranks`): turns this rank's answer
#: into the answer every rank gives at this call.
_agreement: Any = None
_rank = 0
_world_size = 1


def rank() -> int:
    """This process's rank in its job (0 in a job of one process, and outside a job)."""
    return _rank


def world_size() -> int:
    """How many ranks the job has (1 in a job of one process, and outside a job)."""
    return _world_size


def set_rank(rank_: int, world: int) -> None:
    """Called once in each rank's process, before the job's function runs."""
    global _rank, _world_size
    _rank, _world_size = rank_, world


def set_agreement(agreement: Any) -> None:
    """Install what makes every rank's ``should_pause()`` agree."""
    global _agreement
    _agreement = agreement


_checkpoint_group: Any = None


def set_checkpoint_group(group: Any) -> None:
    """Install the process group sharded checkpoints coordinate on (see :mod:`.sharded`)."""
    global _checkpoint_group
    _checkpoint_group = group


def checkpoint_group() -> Any:
    """The gloo group of this job's ranks reserved for checkpoints (None outside ranks).

    A save's collectives run beside training (an asynchronous save finishes
    in a background thread): on a group of their own they never interleave
    with the training's collectives.
    """
    return _checkpoint_group


def finish_agreement() -> None:
    """Wait for the agreement's last collective, before the process group goes."""
    if _agreement is not None:
        _agreement.finish()


_monotonic = time.monotonic


def _look_at_control(now: float) -> bool:
    """The fallback of :func:`should_pause`: read ``control.json``.

    Opened and read at every look, not first compared by ``stat``: on NFS an
    open revalidates the file (close-to-open consistency) while a ``stat`` may
    answer from an attribute cache seconds old, which a run on another node
    (the Ray backend) would wait out.
    """
    global _next_control_check
    _next_control_check = now + _control_poll_seconds()
    if in_job() and read_control().get("pause"):
        request_pause()
    return _pause_requested


def pause_observed() -> bool:
    """Whether training code has been told to pause (should_pause() returned True).

    The worker uses it to tell a run that stopped for a pause from one that
    finished on its own while a pause request was on its way.
    """
    return _pause_observed


def pause_at_step() -> int | None:
    """The global step at which ``Checkpointer.loop`` pauses the run by itself, if set."""
    value = os.environ.get(PAUSE_AT_ENV)
    return int(value) if value else None


_saving: weakref.WeakSet[Any] = weakref.WeakSet()


def track_save(checkpointer: Any) -> None:
    """Remember a Checkpointer with a save in flight, so the job's end can wait for it."""
    _saving.add(checkpointer)


def wait_for_saves() -> list[BaseException]:
    """Wait until every asynchronous save is durable; return the errors of those that failed."""
    errors = []
    for checkpointer in list(_saving):
        try:
            checkpointer.wait()
        except BaseException as e:  # reported by the worker as the job's failure
            errors.append(e)
    _saving.clear()
    return errors


class _RuntimeAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import runtime`` give ``cumulus_jupyter.runtime``, imported only then.

    The seed's examples say ``from runtime import Checkpointer``; importing
    the real module eagerly would put torch's import time on every job start.
    """

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "runtime":
            return None
        return importlib.util.spec_from_loader(name, self)

    def create_module(self, spec: Any) -> Any:
        return importlib.import_module("cumulus_jupyter.runtime")

    def exec_module(self, module: Any) -> None:
        """Nothing to run: the module was imported under its own name."""


def install_runtime_alias() -> None:
    """Let ``import runtime`` work in this process (once; idempotent)."""
    if not any(isinstance(f, _RuntimeAlias) for f in sys.meta_path):
        sys.meta_path.append(_RuntimeAlias())

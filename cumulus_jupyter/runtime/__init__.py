"""The job process: the worker that runs a job, and the API training code imports.

Inside a job the same names are importable as ``runtime`` (the seed's
``from runtime import Checkpointer, should_pause``). Outside a job they work
against ``./cumulus-local`` and ``should_pause()`` is always ``False``, so the
code can be debugged in the kernel first.

Each name loads on first use: the worker imports this package before it has
installed its pause handler, and a job that never touches a Checkpointer must
not pay torch's import time for it.

Modules: ``context`` (where the job is, should_pause), ``worker`` (one run),
``checkpointer`` (Checkpointer; ``state``, ``persist``, ``rng``, ``loop``,
``retention`` are its parts), ``reporting`` (report), ``interrupt`` (save_on_interrupt),
``verify`` (verify_resume, run from a kernel), ``cellrun`` (what %%cumulus ships).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checkpointer import Checkpointer, CheckpointError, list_checkpoints
    from .context import JobInterrupted, job_dir, job_id, rank, should_pause, world_size
    from .interrupt import save_on_interrupt
    from .reporting import report
    from .verify import ResumeReport, verify_resume

_LAZY = {
    "CheckpointError": "checkpointer",
    "Checkpointer": "checkpointer",
    "list_checkpoints": "checkpointer",
    "JobInterrupted": "context",
    "job_dir": "context",
    "job_id": "context",
    "should_pause": "context",
    "rank": "context",
    "world_size": "context",
    "save_on_interrupt": "interrupt",
    "report": "reporting",
    "ResumeReport": "verify",
    "verify_resume": "verify",
}

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "JobInterrupted",
    "ResumeReport",
    "job_dir",
    "job_id",
    "list_checkpoints",
    "rank",
    "report",
    "save_on_interrupt",
    "should_pause",
    "verify_resume",
    "world_size",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cumulus_jupyter.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""What training code imports inside a job (also importable as ``runtime`` there).

Outside a job the same functions work against ``./cumulus-local`` and
``should_pause()`` is always ``False``, so the code can be debugged in the
kernel first.
"""

from ..jobcontext import JobInterrupted, job_dir, job_id, should_pause
from .checkpoint import Checkpointer, CheckpointError, list_checkpoints
from .helpers import report, save_on_interrupt
from .verify import ResumeReport, verify_resume

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "JobInterrupted",
    "ResumeReport",
    "job_dir",
    "job_id",
    "list_checkpoints",
    "report",
    "save_on_interrupt",
    "should_pause",
    "verify_resume",
]

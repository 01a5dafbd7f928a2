"""``save_on_interrupt``: save a checkpoint when SIGTERM or SIGINT stops the job."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

from .checkpointer import Checkpointer
from .context import JobInterrupted


@contextlib.contextmanager
def save_on_interrupt(
    ckpt: Checkpointer,
    model: Any,
    optimizer: Any,
    get_epoch: Callable[[], int],
    get_step: Callable[[], int],
    *,
    scheduler: Any = None,
) -> Iterator[None]:
    """Save a checkpoint if SIGTERM or SIGINT arrives inside the block, then stop.

    This is what the server's escalation relies on when a job does not answer
    a pause in time: it sends SIGTERM, the guard saves at the current epoch and
    step, and the job ends as paused and resumable. ``get_epoch`` and
    ``get_step`` are called at that moment, e.g. ``lambda: epoch``.
    ``scheduler`` (one, or a list) is saved with them, as
    :meth:`Checkpointer.save` does.
    """

    def handler(signum: int, _frame: Any) -> None:
        path = ckpt.save(model, optimizer, get_epoch(), get_step(), scheduler=scheduler)
        raise JobInterrupted(signum, path)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

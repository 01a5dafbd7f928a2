"""Metrics reporting and the save-on-interrupt guard."""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..fileio import FILE_MODE
from ..jobcontext import RUN_ENV, JobInterrupted, job_dir
from ..metrics import RUN_FIELD
from .checkpoint import Checkpointer


def _plain(value: Any) -> Any:
    if isinstance(value, bool | str) or value is None:
        return value
    if hasattr(value, "item") and callable(value.item):  # torch / NumPy scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise TypeError("report() takes scalars; got a tensor with several elements") from None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else str(f)
    raise TypeError(f"report() takes numbers and strings; got {type(value).__name__}")


_last_reported: dict[str, Any] = {}


def last_reported() -> dict[str, Any]:
    """The metrics of the last :func:`report` call in this process."""
    return dict(_last_reported)


def _current_run() -> int:
    """This process's run of the job (the server sets ``CUMULUS_RUN``); 1 outside a job."""
    try:
        run = int(os.environ.get(RUN_ENV, "1"))
    except ValueError:
        return 1
    return run if run >= 1 else 1


def report(**metrics: Any) -> None:
    """Record metrics (``report(step=10, total=500, loss=0.31)``) for the job's UI.

    Each call appends one JSON line to ``metrics.jsonl``, with the time and
    the job's run; ``step`` and ``total`` drive progress bars, everything else
    is plotted. A step reported by several runs (a resume from a checkpoint
    runs the steps after it again) is shown with the newest run's values.
    ``run`` is therefore not a metric name.
    """
    if RUN_FIELD in metrics:
        raise TypeError(
            f"report() records the job's run as {RUN_FIELD!r} itself; "
            "report your value under another name"
        )
    record = {key: _plain(value) for key, value in metrics.items()}
    record["time"] = time.time()
    _last_reported.clear()
    _last_reported.update(record)
    # The run goes to the file only: it tells the server which of two records
    # for a step is the newer; a checkpoint's metrics (last_reported) need not say.
    line = json.dumps({**record, RUN_FIELD: _current_run()})
    fd = os.open(job_dir() / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line + "\n")


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

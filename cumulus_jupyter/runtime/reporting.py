"""``report()``: metrics a job records for its UI (``metrics.jsonl``)."""

from __future__ import annotations

import json
import math
import numbers
import time
from typing import Any

from ..jobdir import JobDir
from ..metrics import RUN_FIELD
from .context import current_run, job_dir, rank


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


def report(**metrics: Any) -> None:
    """Record metrics (``report(step=10, total=500, loss=0.31)``) for the job's UI.

    Each call appends one JSON line to ``metrics.jsonl``, with the time and
    the job's run; ``step`` and ``total`` drive progress bars, everything else
    is plotted. In a job of several ranks only rank 0's calls are recorded
    (the others are checked and dropped). A step reported by several runs (a
    resume from a checkpoint runs the steps after it again) is shown with the
    newest run's values.
    ``run`` is therefore not a metric name.
    """
    if RUN_FIELD in metrics:
        raise TypeError(
            f"report() records the job's run as {RUN_FIELD!r} itself; "
            "report your value under another name"
        )
    record = {key: _plain(value) for key, value in metrics.items()}
    if rank() != 0:
        return  # in a job of several ranks, rank 0's reports are the job's
    record["time"] = time.time()
    _last_reported.clear()
    _last_reported.update(record)
    # The run goes to the file only: it tells the server which of two records
    # for a step is the newer; a checkpoint's metrics (last_reported) need not say.
    JobDir(job_dir()).append_metrics(json.dumps({**record, RUN_FIELD: current_run()}))

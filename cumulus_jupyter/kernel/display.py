"""How jobs look on the kernel side: text, HTML and SVG from job records, written once.

The client's ``Job`` (its repr and :meth:`~cumulus_jupyter.kernel.client.Job.summary`),
the magics (``%cumulus jobs``, ``%cumulus checkpoints``) and the widgets all
render records with these functions. Nothing here talks to the server or
imports ipywidgets; IPython is used only when it is already loaded.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..metrics import POSITION_FIELDS
from ..spec import format_duration
from ..states import JobState

#: The colour each state is shown in (the JupyterLab panel's style/base.css has its own).
STATE_COLORS: dict[str, str] = {
    JobState.QUEUED: "#6c757d",
    JobState.RUNNING: "#1565c0",
    JobState.PAUSING: "#ef6c00",
    JobState.PAUSED: "#b8860b",
    JobState.COMPLETED: "#2e7d32",
    JobState.FAILED: "#c62828",
    JobState.CANCELLED: "#616161",
    JobState.TIMED_OUT: "#6a1b9a",
    JobState.LOST: "#8d6e63",
}
_UNKNOWN_COLOR = "#555"


def state_color(state: object) -> str:
    """The colour of ``state`` (a :class:`JobState` or its string)."""
    return STATE_COLORS.get(str(state), _UNKNOWN_COLOR)


# -- plain values ------------------------------------------------------------------


def format_age(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``2h07m``: how long ago something was."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"


def format_size(n: float) -> str:
    """A byte count as ``512 B``, ``1.5 KB``, ``3.2 MB`` or ``1.1 GB``."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# -- a job record --------------------------------------------------------------------

#: The facts of a job shown in text, in table order (the columns of :class:`JobTable`).
FACTS = ("id", "name", "state", "elapsed", "duration", "gpu_memory", "device")


def job_facts(record: Mapping[str, Any]) -> dict[str, str]:
    """The job's :data:`FACTS` as text (durations formatted, ``-`` for none)."""
    elapsed = record.get("elapsed")
    return {
        "id": str(record.get("id")),
        "name": str(record.get("name")),
        "state": str(record.get("state")),
        "elapsed": format_duration(elapsed) if elapsed is not None else "-",
        "duration": format_duration(record.get("duration")),
        "gpu_memory": str(record.get("gpu_memory")),
        # A job of several ranks holds several devices ("0,1"); older servers
        # send only "device".
        "device": ",".join(record.get("devices") or []) or str(record.get("device") or "-"),
    }


def job_message(record: Mapping[str, Any]) -> str:
    """The record's message, unless it is empty or only repeats the state."""
    message = record.get("message")
    return str(message) if message and message != record.get("state") else ""


def job_summary(record: Mapping[str, Any]) -> str:
    """The job in one line of text: ``Job ID 'name': state | elapsed E of D | GPU share G``."""
    f = job_facts(record)
    message = job_message(record)
    return (
        f"Job {f['id']} {record.get('name')!r}: {f['state']}"
        f" | elapsed {f['elapsed']} of {f['duration']} | GPU share {f['gpu_memory']}"
        + (f" | {message}" if message else "")
    )


def job_header_html(record: Mapping[str, Any]) -> str:
    """The job's facts as the HTML header of its widget: name, id, a state badge, times."""
    f = job_facts(record)
    device = record.get("device")
    devices = record.get("devices") or ([device] if device else [])
    nprocs = record.get("nprocs") or 1
    ranks = f", {nprocs} ranks" if nprocs > 1 else ""
    where = ""
    if device == "cpu":
        where = f" (CPU-only host{ranks})"
    elif len(devices) > 1:
        where = f" on each of GPUs {html.escape(', '.join(map(str, devices)))}"
    elif device:
        where = f" of GPU {html.escape(str(device))}"
    if record.get("node"):  # placed by Ray on one of its nodes
        where += f" on node {html.escape(str(record['node']))}"
    message = job_message(record)
    restarted = restarts_text(record)
    return (
        '<div style="font-family:var(--jp-ui-font-family, sans-serif)">'
        f"<b>{html.escape(f['name'])}</b> "
        f'<code style="color:#777">{html.escape(f["id"])}</code> '
        f'<span style="background:{state_color(f["state"])};color:white;border-radius:3px;'
        f'padding:1px 6px">{html.escape(f["state"])}</span>'
        f" &nbsp; elapsed {f['elapsed']} / {f['duration']} &nbsp; GPU share {f['gpu_memory']}"
        + where
        + (f'<br><span style="color:#555">{html.escape(message)}</span>' if message else "")
        + (f'<br><span style="color:#ef6c00">{html.escape(restarted)}</span>' if restarted else "")
        + "</div>"
    )


def restarts_text(record: Mapping[str, Any]) -> str:
    """How often a lost run was started again, and the last cause; "" when never."""
    restarts = record.get("restarts") or []
    if not restarts:
        return ""
    last = restarts[-1]
    when = time.strftime("%H:%M:%S", time.localtime(last.get("time", 0)))
    return (
        f"restarted {len(restarts)} of {record.get('max_restarts', len(restarts))} times; "
        f"last at {when}, after run {last.get('run')} was lost: {last.get('cause', '')}"
    )


def error_html(error: BaseException) -> str:
    """An error's message, in red."""
    return f'<span style="color:#c62828">{html.escape(str(error))}</span>'


class JobTable:
    """A table of jobs: HTML in a notebook, aligned text elsewhere."""

    columns = FACTS

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def _rows(self) -> list[list[str]]:
        return [[job_facts(r)[c] for c in self.columns] for r in self.records]

    def __repr__(self) -> str:
        if not self.records:
            return "no jobs"
        rows = [list(self.columns), *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.columns))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
        )

    def _repr_html_(self) -> str:
        if not self.records:
            return "<i>no jobs</i>"
        state = self.columns.index("state")
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = []
        for row in self._rows():
            cells = [html.escape(c) for c in row]
            cells[state] = f'<b style="color:{state_color(row[state])}">{cells[state]}</b>'
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- checkpoints -----------------------------------------------------------------------

#: The header over :func:`checkpoint_rows`.
CHECKPOINT_HEADER = f"{'name':<28} {'epoch':>5} {'step':>7}  {'saved':<8} {'size':>9}  metrics"


def metrics_at(
    metrics: Iterable[Mapping[str, Any]], checkpoint: Mapping[str, Any]
) -> dict[str, Any]:
    """What the job measured when the checkpoint was saved: the last record reported
    by then, without its position fields (step, time, ...)."""
    found: Mapping[str, Any] = {}
    for m in metrics:
        if m.get("time", 0) <= checkpoint.get("time", 0):
            found = m
    return {k: v for k, v in found.items() if k not in POSITION_FIELDS}


def checkpoint_rows(
    checkpoints: list[dict[str, Any]], metrics: list[dict[str, Any]]
) -> list[tuple[str, str]]:
    """``(row text, name)`` per checkpoint, newest first, under :data:`CHECKPOINT_HEADER`."""
    latest = checkpoints[-1]["name"] if checkpoints else None
    rows = []
    for c in reversed(checkpoints):
        saved = time.strftime("%H:%M:%S", time.localtime(c.get("time", 0)))
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics_at(metrics, c).items()
        )
        # A sharded checkpoint says how many ranks saved it (it resumes on any number).
        ranks = f"{c['ranks']} ranks  " if c.get("ranks") else ""
        row = (
            f"{c['name']:<28} {c.get('epoch', ''):>5} {c.get('step', ''):>7}  {saved:<8} "
            f"{format_size(c.get('size', 0)):>9}  {ranks}{shown}"
        )
        rows.append((row + ("  ← latest" if c["name"] == latest else ""), c["name"]))
    return rows


# -- metric charts -------------------------------------------------------------------

_PALETTE = ("#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00")


def svg_chart(
    series: Mapping[str, list[tuple[float, float]]], width: int = 460, height: int = 120
) -> str:
    """A small line chart of each metric's ``(step, value)`` points, as inline SVG
    (the first five metrics by name, each on its own scale)."""
    if not series:
        return ""
    parts = []
    pad = 4
    for i, (name, points) in enumerate(sorted(series.items())[: len(_PALETTE)]):
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        sx = (width - 2 * pad) / ((x1 - x0) or 1)
        sy = (height - 2 * pad) / ((y1 - y0) or 1)
        coords = " ".join(
            f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in points
        )
        color = _PALETTE[i]
        parts.append(
            f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>'
        )
        parts.append(
            f'<text x="{width - pad}" y="{14 + 14 * i}" text-anchor="end" font-size="11" '
            f'fill="{color}">{html.escape(name)} {ys[-1]:.4g} (min {y0:.4g})</text>'
        )
    return (
        f'<svg width="{width}" height="{height}" style="background:#fcfcfc;border:1px solid #eee">'
        + "".join(parts)
        + "</svg>"
    )


# -- IPython -----------------------------------------------------------------------------


def ipython() -> Any:
    """The running IPython shell, or ``None``.

    IPython is not imported for this: where nothing has loaded it, no shell runs.
    """
    module = sys.modules.get("IPython")
    get_ipython = getattr(module, "get_ipython", None)
    return get_ipython() if get_ipython is not None else None


def in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (where widgets and displays show)."""
    ip = ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def show_in_notebooks(type_module: str, type_name: str, view: Callable[[Any], Any]) -> None:
    """In a Jupyter kernel, display every instance of ``type_module.type_name`` as
    ``view(obj)`` (a widget) instead of by its own ``_ipython_display_``.

    The class is named, not imported: it is registered before it is loaded.
    Outside a kernel this does nothing.
    """
    if not in_kernel():
        return

    def show(obj: Any) -> None:
        from IPython.display import display  # loaded: a kernel runs

        display(view(obj))

    formatter = ipython().display_formatter.ipython_display_formatter
    formatter.for_type_by_name(type_module, type_name, show)

"""ipywidgets for jobs: ``JobWidget`` (state, controls, live log, progress, chart)
and ``CheckpointBrowser`` (browse, resume from and delete checkpoints).

Every widget is refreshed by one shared background thread that talks to the
server, so the kernel is never blocked and a notebook full of widgets costs
one thread. A widget leaves the thread when it is closed or its job ends; the
thread exits when no widget is left.
"""

from __future__ import annotations

import contextlib
import html
import threading
import time
from collections import deque
from typing import Any

import ipywidgets as w

from ..errors import CumulusError
from ..metrics import StepMerger
from ..spec import format_duration
from .client import Job, _quote
from .logstream import LineAssembler

STATE_COLORS = {
    "queued": "#6c757d",
    "running": "#1565c0",
    "pausing": "#ef6c00",
    "paused": "#b8860b",
    "completed": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#616161",
    "timed_out": "#6a1b9a",
    "lost": "#8d6e63",
}
#: Which buttons a state allows.
LEGAL = {
    "pause": {"running"},
    "resume": {"paused", "timed_out", "lost"},
    "cancel": {"queued", "running", "pausing", "paused", "timed_out", "lost"},
}
TERMINAL = {"completed", "failed", "cancelled"}
_NOT_PLOTTED = {"step", "total", "time", "epoch", "run"}
#: Steps a chart holds at most; past it every other one is dropped (the shape stays).
_MAX_POINTS = 2000
_MAX_LOG_BYTES = 256 * 1024  # read per refresh at most; older output is skipped


class _Poller:
    """One daemon thread refreshing every registered widget when it is due."""

    def __init__(self) -> None:
        self._widgets: set[_Polled] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, widget: _Polled) -> None:
        with self._lock:
            self._widgets.add(widget)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="cumulus-widgets", daemon=True
                )
                self.thread.start()
        self._wake.set()

    def remove(self, widget: _Polled) -> None:
        with self._lock:
            self._widgets.discard(widget)
        self._wake.set()

    def _run(self) -> None:
        while True:
            with self._lock:
                widgets = list(self._widgets)
                if not widgets:
                    self.thread = None
                    return
            now = time.monotonic()
            for widget in widgets:
                if widget.due(now):
                    keep = widget.poll()
                    if not keep:
                        self.remove(widget)
            self._wake.wait(0.2)
            self._wake.clear()


POLLER = _Poller()


class _Polled:
    """Mixin: refreshed by :data:`POLLER` every ``poll_interval`` seconds."""

    poll_interval = 1.0
    _next_poll = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next_poll

    def poll(self) -> bool:
        """Refresh; return whether to keep polling."""
        raise NotImplementedError


def _button(description: str, icon: str, style: str) -> w.Button:
    return w.Button(
        description=description,
        icon=icon,
        button_style=style,
        layout=w.Layout(width="auto"),
    )


class JobWidget(w.VBox, _Polled):
    """A job at a glance: state, elapsed time, GPU share, Pause/Resume/Cancel,
    a progress bar and a metric chart fed by ``report()``, and the live log.

    ``Job`` objects display as this widget in a notebook; ``%cumulus attach``
    makes one for an existing job.
    """

    def __init__(self, job: Job, poll_interval: float = 1.0, log_lines: int = 200):
        self.job = job
        self.poll_interval = poll_interval
        self.header = w.HTML()
        self.pause_button = _button("Pause", "pause", "warning")
        self.resume_button = _button("Resume", "play", "success")
        self.cancel_button = _button("Cancel", "stop", "danger")
        self.progress = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="50%"))
        self.progress_label = w.HTML()
        self.chart = w.HTML()
        self.log_view = w.HTML()
        self.message = w.HTML()
        self.pause_button.on_click(lambda _: self._act("pause"))
        self.resume_button.on_click(lambda _: self._act("resume"))
        self.cancel_button.on_click(lambda _: self._act("cancel"))
        super().__init__(
            [
                self.header,
                w.HBox([self.pause_button, self.resume_button, self.cancel_button, self.message]),
                w.HBox([self.progress, self.progress_label]),
                self.chart,
                self.log_view,
            ],
            layout=w.Layout(border="1px solid #ddd", padding="6px"),
        )
        self.record: dict[str, Any] = dict(job._record)
        self._lines: deque[str] = deque(maxlen=log_lines)
        self._assembler = LineAssembler()
        self._partial = ""
        self._log_offset = 0
        self._metrics_next = 0
        # One point per step, the newest run's: a resume runs the steps after
        # its checkpoint again, and the chart must not draw them twice.
        self._metrics = StepMerger(max_steps=_MAX_POINTS, keep_unplaced=False)
        self._refresh_lock = threading.Lock()
        self.refresh()
        if self.record.get("state") not in TERMINAL:
            POLLER.add(self)

    # -- data ------------------------------------------------------------------

    @property
    def state(self) -> str:
        return str(self.record.get("state"))

    @property
    def log_text(self) -> str:
        """The log tail as shown (progress bars collapsed to their last drawing)."""
        return "\n".join([*self._lines, self._partial] if self._partial else self._lines)

    def refresh(self) -> None:
        """Fetch the job's record, new output and new metrics, and redraw."""
        with self._refresh_lock:
            client = self.job.client
            record = self.job.info()
            self._read_log(client)
            page = client._json(
                "GET", f"jobs/{_quote(self.job.id)}/metrics", params={"since": self._metrics_next}
            )
            self._metrics_next = page["next"]
            self._metrics.extend(page["metrics"])
            self._draw(record)

    def poll(self) -> bool:
        try:
            self.refresh()
        except CumulusError as e:
            self.message.value = _error_html(e)
        except OSError as e:
            self.message.value = _error_html(e)
        # Paused jobs change only when someone resumes them: look less often.
        slow = self.state in LEGAL["resume"]
        self._next_poll = time.monotonic() + self.poll_interval * (5 if slow else 1)
        return self.state not in TERMINAL

    def _read_log(self, client: Any) -> None:
        for _ in range(4):
            part = client.get_logs(self.job.id, self._log_offset)
            if part["size"] - self._log_offset > _MAX_LOG_BYTES and self._log_offset == 0:
                # Attaching to a long log: start near its end, like `tail`.
                self._log_offset = part["size"] - _MAX_LOG_BYTES // 4
                self._lines.append("…")
                continue
            if not part["data"]:
                return
            done, self._partial = self._assembler.feed(part["data"])
            self._lines.extend(done)
            self._log_offset = part["next_offset"]
            if self._log_offset >= part["size"]:
                return

    @property
    def series(self) -> dict[str, list[tuple[float, float]]]:
        """The chart's points: for each plotted metric, ``(step, value)`` in step order,
        one per step (the newest run's value)."""
        out: dict[str, list[tuple[float, float]]] = {}
        for m in self._metrics.records():
            x = m["step"]  # records() holds only records with a numeric step here
            for key, value in m.items():
                if key not in _NOT_PLOTTED and isinstance(value, int | float):
                    out.setdefault(key, []).append((float(x), float(value)))
        return out

    # -- drawing ---------------------------------------------------------------

    def _draw(self, r: dict[str, Any]) -> None:
        state = str(r.get("state"))
        color = STATE_COLORS.get(state, "#555")
        elapsed = r.get("elapsed")
        elapsed_text = format_duration(elapsed) if elapsed is not None else "-"
        self.header.value = (
            f'<div style="font-family:var(--jp-ui-font-family, sans-serif)">'
            f"<b>{html.escape(str(r.get('name')))}</b> "
            f'<code style="color:#777">{html.escape(self.job.id)}</code> '
            f'<span style="background:{color};color:white;border-radius:3px;padding:1px 6px">'
            f"{state}</span> &nbsp; elapsed {elapsed_text} / {format_duration(r.get('duration'))}"
            f" &nbsp; GPU share {r.get('gpu_memory')}"
            + _device_text(r.get("device"))
            + (
                f'<br><span style="color:#555">{html.escape(str(r["message"]))}</span>'
                if r.get("message") and r.get("message") != state
                else ""
            )
            + "</div>"
        )
        self.pause_button.disabled = state not in LEGAL["pause"] or bool(r.get("cancel_requested"))
        self.resume_button.disabled = state not in LEGAL["resume"]
        self.cancel_button.disabled = state not in LEGAL["cancel"] or bool(
            r.get("cancel_requested")
        )
        # The newest run's latest step, not the highest step any run reached:
        # right after a resume, the steps past its checkpoint are to do again.
        latest = self._metrics.latest()
        step, total = latest.get("step"), latest.get("total")
        if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
            self.progress.value = min(1.0, (step + 1) / total)
            self.progress_label.value = f"step {int(step) + 1} / {int(total)}"
        if state == "completed":
            self.progress.value = 1.0
        self.progress.bar_style = {"completed": "success", "failed": "danger"}.get(state, "info")
        self.chart.value = _svg_chart(self.series)
        text = html.escape(self.log_text) or "<i>no output yet</i>"
        self.log_view.value = (
            '<pre style="max-height:14em;overflow:auto;background:#f7f7f7;margin:0;'
            f'padding:4px;font-size:12px;display:flex;flex-direction:column-reverse">'
            f"<span>{text}</span></pre>"
        )
        # Last: whoever reads .state sees a widget already drawn for it.
        self.record = r

    def _act(self, action: str) -> None:
        try:
            getattr(self.job, action)()
            self.message.value = ""
        except CumulusError as e:
            self.message.value = _error_html(e)
        with contextlib.suppress(CumulusError, OSError):
            self.refresh()
        if self.state not in TERMINAL:
            self._next_poll = 0.0
            POLLER.add(self)

    def close(self) -> None:
        POLLER.remove(self)
        super().close()

    def __repr__(self) -> str:
        # The text/plain form, for frontends without widgets.
        r = self.record
        elapsed = r.get("elapsed")
        return (
            f"Job {self.job.id} {r.get('name')!r}: {self.state}"
            f" | elapsed {format_duration(elapsed) if elapsed is not None else '-'}"
            f" of {format_duration(r.get('duration'))} | GPU share {r.get('gpu_memory')}"
        )


class CheckpointBrowser(w.VBox):
    """A job's checkpoints, newest first: select one, then resume from it or delete it."""

    def __init__(self, job: Job):
        self.job = job
        self.title = w.HTML()
        self.select = w.Select(options=[], rows=8, layout=w.Layout(width="100%"))
        self.select.add_class("cumulus-checkpoints")
        self.resume_button = _button("Resume from here", "play", "success")
        self.delete_button = _button("Delete", "trash", "danger")
        self.refresh_button = _button("Refresh", "refresh", "")
        self.message = w.HTML()
        self.resume_button.on_click(lambda _: self._resume())
        self.delete_button.on_click(lambda _: self._delete())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.select.observe(lambda _: self._enable(), names="value")
        self.checkpoints: list[dict[str, Any]] = []
        self.state = ""
        super().__init__(
            [
                w.HTML("<style>.cumulus-checkpoints select{font-family:monospace}</style>"),
                self.title,
                self.select,
                w.HBox([self.resume_button, self.delete_button, self.refresh_button]),
                self.message,
            ],
            layout=w.Layout(border="1px solid #ddd", padding="6px"),
        )
        self.refresh()

    def refresh(self) -> None:
        """Reload the checkpoints, the job's state and its metrics."""
        self.state = self.job.status()
        self.checkpoints = self.job.get_checkpoints()
        metrics = self.job.metrics()
        latest = self.checkpoints[-1]["name"] if self.checkpoints else None
        options = []
        for c in reversed(self.checkpoints):
            options.append(
                (_checkpoint_row(c, _metrics_at(metrics, c), c["name"] == latest), c["name"])
            )
        keep = self.select.value
        self.select.rows = min(8, max(2, len(options)))
        self.select.options = options
        names = [name for _, name in options]
        self.select.value = keep if keep in names else (names[0] if names else None)
        self.title.value = (
            f"<b>Checkpoints of {html.escape(self.job.name)}</b> "
            f"<code>{html.escape(self.job.id)}</code> ({self.state}, {len(options)} saved)"
            "<br><code style='white-space:pre'>"
            + html.escape(
                f"{'name':<28} {'epoch':>5} {'step':>7}  {'saved':<8} {'size':>9}  metrics"
            )
            + "</code>"
        )
        self._enable()

    def __repr__(self) -> str:
        rows = [label for label, _ in self.select.options] or ["(no checkpoints)"]
        return f"Checkpoints of job {self.job.id} ({self.state}):\n" + "\n".join(rows)

    @property
    def selected(self) -> str | None:
        return self.select.value

    def _enable(self) -> None:
        none = self.selected is None
        self.resume_button.disabled = none or self.state not in LEGAL["resume"]
        # The server refuses to delete what a stopped job resumes from: say so
        # by disabling the button rather than by an error after the click.
        latest = self.checkpoints[-1]["name"] if self.checkpoints else None
        needed = self.state in LEGAL["resume"] and self.selected == latest
        self.delete_button.disabled = none or needed
        self.delete_button.tooltip = (
            "The job resumes from this checkpoint; resume or cancel the job first"
            if needed
            else "Delete this checkpoint"
        )

    def _resume(self) -> None:
        name = self.selected
        try:
            self.job.resume(checkpoint=name)
            self.message.value = f"Resuming from <code>{html.escape(str(name))}</code>."
        except CumulusError as e:
            self.message.value = _error_html(e)
        self.refresh()

    def _delete(self) -> None:
        name = self.selected
        try:
            self.job.client.delete_checkpoint(self.job.id, str(name))
            self.message.value = f"Deleted <code>{html.escape(str(name))}</code>."
        except CumulusError as e:
            self.message.value = _error_html(e)
        self.refresh()


def _device_text(device: Any) -> str:
    if not device:
        return ""
    if device == "cpu":
        return " (CPU-only host)"
    return f" of GPU {html.escape(str(device))}"


def _metrics_at(metrics: list[dict[str, Any]], checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The last metrics reported before the checkpoint was saved."""
    found: dict[str, Any] = {}
    for m in metrics:
        if m.get("time", 0) <= checkpoint.get("time", 0):
            found = m
    return {k: v for k, v in found.items() if k not in _NOT_PLOTTED}


def _checkpoint_row(c: dict[str, Any], metrics: dict[str, Any], latest: bool) -> str:
    saved = time.strftime("%H:%M:%S", time.localtime(c.get("time", 0)))
    shown = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
    row = (
        f"{c['name']:<28} {c.get('epoch', ''):>5} {c.get('step', ''):>7}  {saved:<8} "
        f"{_size(c.get('size', 0)):>9}  {shown}"
    )
    return row + ("  ← latest" if latest else "")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _error_html(e: BaseException) -> str:
    return f'<span style="color:#c62828">{html.escape(str(e))}</span>'


def _svg_chart(
    series: dict[str, list[tuple[float, float]]], width: int = 460, height: int = 120
) -> str:
    """A small line chart of each reported metric against step, as inline SVG."""
    if not series:
        return ""
    palette = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00"]
    parts = []
    pad = 4
    for i, (name, points) in enumerate(sorted(series.items())[: len(palette)]):
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        sx = (width - 2 * pad) / ((x1 - x0) or 1)
        sy = (height - 2 * pad) / ((y1 - y0) or 1)
        coords = " ".join(
            f"{pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}" for x, y in points
        )
        color = palette[i]
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


def _live_widgets() -> list[Any]:
    """Widgets the poller is refreshing (for tests and debugging)."""
    return list(POLLER._widgets)

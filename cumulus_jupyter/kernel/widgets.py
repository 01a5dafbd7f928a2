"""ipywidgets for jobs: ``JobWidget`` (state, controls, live log, progress, chart)
and ``CheckpointBrowser`` (browse, resume from and delete checkpoints).

Pause, Resume, Cancel and Resume-from-here are enabled exactly when their
action is in the job record's ``actions`` (what the server allows now, see
:func:`cumulus_jupyter.states.actions`); a checkpoint's Delete is, except on
the newest checkpoint of a job that can resume. What the widgets show is
drawn by :mod:`.display`.

Every ``JobWidget`` is refreshed by one shared background thread that talks
to the server, so the kernel is never blocked and a notebook full of widgets
costs one thread. A widget leaves the thread when it is closed or its job
ends; the thread exits when no widget is left. While its job runs, a widget
also follows the job's output with long-polls (``GET logs?wait=``) in a
thread of its own, so a printed line shows at once, not at the next refresh.
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
from ..metrics import POSITION_FIELDS, StepMerger
from ..states import ACTIVE, RESUMABLE, TERMINAL, Action, JobState
from .client import CumulusClient, Job
from .display import (
    CHECKPOINT_HEADER,
    checkpoint_rows,
    error_html,
    job_header_html,
    job_summary,
    svg_chart,
)
from .logstream import LineAssembler

#: Steps a chart holds at most; past it every other one is dropped (the shape stays).
_MAX_POINTS = 2000
_MAX_LOG_BYTES = 256 * 1024  # read per refresh at most; older output is skipped
#: How long one long-poll of the log may wait for output.
_FOLLOW_WAIT = 2.0
#: How long one long-poll of the event log may wait for a change.
_EVENT_WAIT = 20.0
#: A widget of a job that waits (queued, paused) is refreshed this much less
#: often than a running job's: the event log wakes it when it changes.
_WAITING_SLOWDOWN = 10
#: The least time between two log requests of one widget: a job that prints
#: all the time costs at most ten requests a second, one that prints now and
#: then one request per line (or per _FOLLOW_WAIT).
_FOLLOW_GAP = 0.1


class _Poller:
    """One daemon thread refreshing every registered widget when it is due.

    A second thread follows the server's event log (``GET events?wait=``):
    a widget whose job changed is refreshed at once, so widgets of jobs that
    wait (queued, paused) need no frequent polling at all.
    """

    def __init__(self) -> None:
        self._widgets: set[_Polled] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.thread: threading.Thread | None = None
        self._watchers: dict[str, threading.Thread] = {}  # per server URL

    def add(self, widget: _Polled) -> None:
        with self._lock:
            self._widgets.add(widget)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="cumulus-widgets", daemon=True
                )
                self.thread.start()
            client = widget.client_for_events()
            watcher = self._watchers.get(client.url) if client is not None else None
            if client is not None and (watcher is None or not watcher.is_alive()):
                watcher = threading.Thread(
                    target=self._follow_events, args=(client,), name="cumulus-events", daemon=True
                )
                self._watchers[client.url] = watcher
                watcher.start()
        self._wake.set()

    def _follow_events(self, client: CumulusClient) -> None:
        """Wake the widgets of every job that changed, until no widget of this server is left."""
        since: int | None = None
        while True:
            with self._lock:
                mine = [w for w in self._widgets if _server_of(w) == client.url]
                if not mine:
                    self._watchers.pop(client.url, None)
                    return
            try:
                if since is None:
                    answer = client.events(limit=1)  # where the log stands
                else:
                    answer = client.events(since=since, wait=_EVENT_WAIT)
            except (CumulusError, OSError):
                # The server is away (or too old for events): the periodic
                # refresh goes on and says so; look again a little later.
                time.sleep(_EVENT_WAIT / 4)
                continue
            # The first answer only says where the log stands: a change made
            # between a widget's own first look and that answer would be
            # missed, so every widget looks again once now.
            changed = {e.get("job") for e in answer["events"]} if since is not None else None
            woken = [w for w in mine if changed is None or w.job_id() in changed]
            for widget in woken:
                widget.wake()
            if woken:
                self._wake.set()
            since = answer["last"]

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


def _server_of(widget: _Polled) -> str | None:
    client = widget.client_for_events()
    return client.url if client is not None else None


class _Polled:
    """Mixin: refreshed by :data:`POLLER` every ``poll_interval`` seconds, and when woken."""

    poll_interval = 1.0
    _next_poll = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next_poll

    def wake(self) -> None:
        """Its job changed (an event said so): refresh at the poller's next pass."""
        self._next_poll = 0.0

    def client_for_events(self) -> CumulusClient | None:
        """The client whose server's events concern this widget (None: none)."""
        return None

    def job_id(self) -> str:
        return ""

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


def _allows(record: dict[str, Any], action: Action) -> bool:
    """Whether the record's ``actions`` (what the server allows now) hold ``action``."""
    return action.value in record.get("actions", ())


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
        self.pause_button.on_click(lambda _: self._act(Action.PAUSE))
        self.resume_button.on_click(lambda _: self._act(Action.RESUME))
        self.cancel_button.on_click(lambda _: self._act(Action.CANCEL))
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
        self.record: dict[str, Any] = dict(job.record)
        self._lines: deque[str] = deque(maxlen=log_lines)
        self._assembler = LineAssembler()
        self._partial = ""
        self._log_offset = 0
        self._metrics_next = 0
        # One point per step, the newest run's: a resume runs the steps after
        # its checkpoint again, and the chart must not draw them twice.
        self._metrics = StepMerger(max_steps=_MAX_POINTS, keep_unplaced=False)
        self._refresh_lock = threading.Lock()
        self._follower: threading.Thread | None = None
        self._closed = False
        self.refresh()
        if self.state not in TERMINAL:
            POLLER.add(self)

    # -- data ------------------------------------------------------------------

    @property
    def state(self) -> str:
        """The job's state as last drawn."""
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
            if not self._following():  # while it runs, the follower reads the log
                self._read_log(client)
            page = client.metrics_page(self.job.id, since=self._metrics_next)
            self._metrics_next = page["next"]
            self._metrics.extend(page["metrics"])
            self._draw(record)
            if record.get("state") in ACTIVE and not self._following() and not self._closed:
                self._follower = threading.Thread(
                    target=self._follow_log, name=f"cumulus-log-{self.job.id}", daemon=True
                )
                self._follower.start()

    def _following(self) -> bool:
        return self._follower is not None and self._follower.is_alive()

    def _follow_log(self) -> None:
        """Long-poll the job's output while it runs; draw each new piece at once."""
        client = self.job.client
        while not self._closed:
            started = time.monotonic()
            try:
                part = client.get_logs(self.job.id, self._log_offset, wait=_FOLLOW_WAIT)
            except (CumulusError, OSError):
                return  # the shared refresh reads the log again, and says what failed
            if part["data"]:
                with self._refresh_lock:
                    self._add_output(part)
                    self._draw_log()
            if not part["running"] and part["next_offset"] >= part["size"]:
                return
            time.sleep(max(0.0, _FOLLOW_GAP - (time.monotonic() - started)))

    def poll(self) -> bool:
        try:
            self.refresh()
        except (CumulusError, OSError) as e:
            self.message.value = error_html(e)
        # A job that waits changes when someone resumes it, or Ray places it:
        # the event log wakes the widget then; look rarely otherwise.
        slow = self.state in RESUMABLE or self.state == JobState.QUEUED.value
        self._next_poll = time.monotonic() + self.poll_interval * (_WAITING_SLOWDOWN if slow else 1)
        return self.state not in TERMINAL

    def client_for_events(self) -> CumulusClient | None:
        return self.job.client

    def job_id(self) -> str:
        return self.job.id

    def _read_log(self, client: CumulusClient) -> None:
        for _ in range(4):
            part = client.get_logs(self.job.id, self._log_offset)
            if part["size"] - self._log_offset > _MAX_LOG_BYTES and self._log_offset == 0:
                # Attaching to a long log: start near its end, like `tail`.
                self._log_offset = part["size"] - _MAX_LOG_BYTES // 4
                self._lines.append("…")
                continue
            if not part["data"]:
                return
            self._add_output(part)
            if self._log_offset >= part["size"]:
                return

    def _add_output(self, part: dict[str, Any]) -> None:
        """Take in one answer of ``GET logs``."""
        done, self._partial = self._assembler.feed(part["data"])
        self._lines.extend(done)
        self._log_offset = part["next_offset"]

    @property
    def series(self) -> dict[str, list[tuple[float, float]]]:
        """The chart's points: for each plotted metric, ``(step, value)`` in step order,
        one per step (the newest run's value)."""
        out: dict[str, list[tuple[float, float]]] = {}
        for m in self._metrics.records():
            x = m["step"]  # records() holds only records with a numeric step here
            for key, value in m.items():
                if key not in POSITION_FIELDS and isinstance(value, int | float):
                    out.setdefault(key, []).append((float(x), float(value)))
        return out

    # -- drawing ---------------------------------------------------------------

    def _draw(self, r: dict[str, Any]) -> None:
        state = str(r.get("state"))
        self.header.value = job_header_html(r)
        self.pause_button.disabled = not _allows(r, Action.PAUSE)
        self.resume_button.disabled = not _allows(r, Action.RESUME)
        self.cancel_button.disabled = not _allows(r, Action.CANCEL)
        # The newest run's latest step, not the highest step any run reached:
        # right after a resume, the steps past its checkpoint are to do again.
        latest = self._metrics.latest()
        step, total = latest.get("step"), latest.get("total")
        if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
            self.progress.value = min(1.0, (step + 1) / total)
            self.progress_label.value = f"step {int(step) + 1} / {int(total)}"
        if state == JobState.COMPLETED:
            self.progress.value = 1.0
        styles: dict[str, str] = {JobState.COMPLETED: "success", JobState.FAILED: "danger"}
        self.progress.bar_style = styles.get(state, "info")
        self.chart.value = svg_chart(self.series)
        self._draw_log()
        # Last: whoever reads .state sees a widget already drawn for it.
        self.record = r

    def _draw_log(self) -> None:
        text = html.escape(self.log_text) or "<i>no output yet</i>"
        self.log_view.value = (
            '<pre style="max-height:14em;overflow:auto;background:#f7f7f7;margin:0;'
            f'padding:4px;font-size:12px;display:flex;flex-direction:column-reverse">'
            f"<span>{text}</span></pre>"
        )

    def _act(self, action: Action) -> None:
        try:
            getattr(self.job, action.value)()
            self.message.value = ""
        except CumulusError as e:
            self.message.value = error_html(e)
        with contextlib.suppress(CumulusError, OSError):
            self.refresh()
        if self.state not in TERMINAL:
            self._next_poll = 0.0
            POLLER.add(self)

    def close(self) -> None:
        self._closed = True  # the follower stops after its current long-poll
        POLLER.remove(self)
        super().close()

    def __repr__(self) -> str:
        # The text/plain form, for frontends without widgets.
        return job_summary(self.record)


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
        self.record: dict[str, Any] = dict(job.record)
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

    @property
    def state(self) -> str:
        """The job's state at the last refresh."""
        return str(self.record.get("state"))

    def refresh(self) -> None:
        """Reload the job's record, its checkpoints and its metrics."""
        self.record = self.job.info()
        self.checkpoints = self.job.get_checkpoints()
        options = checkpoint_rows(self.checkpoints, self.job.metrics())
        keep = self.select.value
        self.select.rows = min(8, max(2, len(options)))
        self.select.options = options
        names = [name for _, name in options]
        self.select.value = keep if keep in names else (names[0] if names else None)
        self.title.value = (
            f"<b>Checkpoints of {html.escape(self.job.name)}</b> "
            f"<code>{html.escape(self.job.id)}</code> ({self.state}, {len(options)} saved)"
            f"<br><code style='white-space:pre'>{html.escape(CHECKPOINT_HEADER)}</code>"
        )
        self._enable()

    def __repr__(self) -> str:
        rows = [label for label, _ in self.select.options] or ["(no checkpoints)"]
        return f"Checkpoints of job {self.job.id} ({self.state}):\n" + "\n".join(rows)

    @property
    def selected(self) -> str | None:
        """The name of the selected checkpoint, if any."""
        return self.select.value

    def _enable(self) -> None:
        none = self.selected is None
        resumable = _allows(self.record, Action.RESUME)
        self.resume_button.disabled = none or not resumable
        # The server refuses to delete what a stopped job resumes from: say so
        # by disabling the button rather than by an error after the click.
        latest = self.checkpoints[-1]["name"] if self.checkpoints else None
        needed = resumable and self.selected == latest
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
            self.message.value = error_html(e)
        self.refresh()

    def _delete(self) -> None:
        name = self.selected
        try:
            self.job.client.delete_checkpoint(self.job.id, str(name))
            self.message.value = f"Deleted <code>{html.escape(str(name))}</code>."
        except CumulusError as e:
            self.message.value = error_html(e)
        self.refresh()


def _live_widgets() -> list[Any]:
    """Widgets the poller is refreshing (for tests and debugging)."""
    return list(POLLER._widgets)

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
ends; the thread exits when no widget is left. The widgets of running jobs
are followed together, per server, by one more thread: one long-poll
(``POST follow``) at a time brings every such job's record, new output and
new metrics, so a printed line shows at once, and twenty widgets cost the
server one request at a time, not twenty.
"""

from __future__ import annotations

import contextlib
import html
import threading
import time
from collections import deque
from typing import Any

import ipywidgets as w

from ..errors import CumulusError, JobNotFoundError
from ..metrics import POSITION_FIELDS, StepMerger
from ..states import ACTIVE, RESUMABLE, RUNNING_STATES, TERMINAL, Action, JobState
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
#: How long one long-poll of the running jobs may wait for output: a quiet
#: notebook asks once a second, and its widgets' elapsed times tick so.
_FOLLOW_WAIT = 1.0
#: How long one long-poll of the event log may wait for a change.
_EVENT_WAIT = 20.0
#: A widget of a job that waits (queued, paused) is refreshed this much less
#: often than a running job's: the event log wakes it when it changes.
_WAITING_SLOWDOWN = 10
#: The least time between two long-polls of one server's running jobs: jobs
#: that print all the time cost at most ten requests a second, together.
_FOLLOW_GAP = 0.1
#: The most jobs the server follows in one request; more take turns.
_MOST_FOLLOWED = 256
#: After a long-poll failed (the server is away), its widgets are refreshed
#: the usual way for this long before the stream tries again.
_FOLLOW_RETRY = 2.0


class _Poller:
    """One daemon thread refreshing every registered widget when it is due.

    Per server, a thread follows the event log (``GET events?wait=``): a
    widget whose job changed is refreshed at once, so widgets of jobs that
    wait (queued, paused) need no frequent polling at all. And a thread
    follows the running jobs (``POST follow``) for their widgets, which the
    first thread then leaves alone.

    "Per server" is per URL *and* token: each such thread asks with a client
    of its own holding that token, so a client whose token the server
    refuses (after a restart with a new one) has no say in how the widgets
    of other clients are followed, and none in theirs.
    """

    def __init__(self) -> None:
        self._widgets: set[_Polled] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.thread: threading.Thread | None = None
        self._watchers: dict[_Server, threading.Thread] = {}
        self._streams: dict[_Server, threading.Thread] = {}
        #: Servers that cannot follow jobs (older than ``POST follow``).
        self.unfollowable: set[str] = set()

    def add(self, widget: _Polled) -> None:
        with self._lock:
            self._widgets.add(widget)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="cumulus-widgets", daemon=True
                )
                self.thread.start()
        self._follow(widget)
        self._wake.set()

    def _follow(self, widget: _Polled) -> None:
        """Start the threads that follow the widget's server, where none runs."""
        client = widget.client_for_events()
        if client is None:
            return
        server = _server(client)
        with self._lock:
            for threads, target, name in [
                (self._watchers, self._follow_events, "cumulus-events"),
                (self._streams, self._follow_jobs, "cumulus-follow"),
            ]:
                if threads is self._streams and client.url in self.unfollowable:
                    continue
                thread = threads.get(server)
                if thread is None or not thread.is_alive():
                    own = CumulusClient(client.url, client.token, client.timeout)
                    thread = threading.Thread(target=target, args=(own,), name=name, daemon=True)
                    threads[server] = thread
                    thread.start()

    def following(self, client: CumulusClient) -> bool:
        """Whether a thread follows this client's running jobs now."""
        thread = self._streams.get(_server(client))
        return thread is not None and thread.is_alive()

    def _widgets_of(
        self, server: _Server, threads: dict[_Server, threading.Thread]
    ) -> list[_Polled]:
        """The widgets of this server; with none left, the calling thread leaves ``threads``."""
        with self._lock:
            mine = [w for w in self._widgets if _server_of(w) == server]
            if not mine:
                threads.pop(server, None)
            return mine

    def _follow_jobs(self, client: CumulusClient) -> None:
        """Bring news of this server's running jobs to their widgets, one long-poll at a time."""
        while True:
            mine = self._widgets_of(_server(client), self._streams)
            if not mine:
                return
            # Two widgets of one job have a position each: the one served
            # longer ago goes in this request, the other in the next.
            followed: dict[str, _Polled] = {}
            for widget in sorted(mine, key=lambda w: w.served_at):
                if widget.streamed() and len(followed) < _MOST_FOLLOWED:
                    followed.setdefault(widget.job_id(), widget)
            if not followed:
                time.sleep(_FOLLOW_GAP)  # until a job runs (a widget's refresh sees it)
                continue
            started = time.monotonic()
            try:
                answer = client.follow(
                    {job_id: w.position() for job_id, w in followed.items()}, wait=_FOLLOW_WAIT
                )
            except JobNotFoundError:
                # A server older than `POST follow`: its widgets are refreshed
                # every poll interval instead (record, output and metrics).
                with self._lock:
                    self.unfollowable.add(client.url)
                    self._streams.pop(_server(client), None)
                for widget in mine:
                    widget.wake()
                self._wake.set()
                return
            except (CumulusError, OSError) as e:
                for widget in followed.values():
                    widget.fail(e)  # it is refreshed as usual until it tries again
                self._wake.set()
                continue
            for job_id, news in answer.items():
                if job_id in followed:
                    followed[job_id].take(news)
            time.sleep(max(0.0, _FOLLOW_GAP - (time.monotonic() - started)))

    def _follow_events(self, client: CumulusClient) -> None:
        """Wake the widgets of every job that changed, until no widget of this server is left."""
        since: int | None = None
        while True:
            mine = self._widgets_of(_server(client), self._watchers)
            if not mine:
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
                # Its client's token may have changed since it was added, or
                # its server's threads were ending (no widget of that server
                # was left) just as it was added: start them again.
                self._follow(widget)
                if widget.due(now):
                    keep = widget.poll()
                    if not keep:
                        self.remove(widget)
            self._wake.wait(0.2)
            self._wake.clear()


POLLER = _Poller()


#: A server as a kernel's threads follow it: its URL, and the token they send.
_Server = tuple[str, str]


def _server(client: CumulusClient) -> _Server:
    return (client.url, client.token)


def _server_of(widget: _Polled) -> _Server | None:
    client = widget.client_for_events()
    return _server(client) if client is not None else None


class _Polled:
    """Mixin: refreshed by :data:`POLLER` every ``poll_interval`` seconds, and when woken."""

    poll_interval = 1.0
    _next_poll = 0.0
    #: When the stream last brought this widget news (``time.monotonic()``).
    served_at = 0.0

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

    def streamed(self) -> bool:
        """Whether the stream of its server's running jobs keeps it fresh now."""
        return False

    def position(self) -> dict[str, Any]:
        """How far it has read its job: ``{"offset": bytes, "metrics": records}``
        and ``"record"``, the version of the record it has, if any."""
        return {}

    def take(self, news: dict[str, Any]) -> None:
        """Draw one job's part of a ``POST follow`` answer."""

    def fail(self, error: Exception) -> None:
        """The stream could not reach the server: say so."""


def _unlike(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of a job differ in more than the time they were taken."""
    return {**a, "elapsed": None} != {**b, "elapsed": None}


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
        self._closed = False
        self._drawn_at = 0.0  # when the whole widget was last drawn (the log: more often)
        # The newest record received, when, and its version if the stream
        # brought it: the stream's answers leave out records the widget has.
        self._received: tuple[dict[str, Any], float] = (self.record, time.monotonic())
        self._version: str | None = None
        self._stream_error = False  # the message shows the stream's error
        self._retry_at = 0.0  # after the stream failed: when it may try again
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
            if _unlike(record, self._received[0]):
                self._version = None  # the stream's version is not of this record
            self._received = (record, time.monotonic())
            self._read_log(client)
            page = client.metrics_page(self.job.id, since=self._metrics_next)
            self._metrics_next = page["next"]
            self._metrics.extend(page["metrics"])
            self._draw(record)

    def poll(self) -> bool:
        try:
            self.refresh()
        except (CumulusError, OSError) as e:
            self.message.value = error_html(e)
        if self.streamed():
            # The stream keeps it fresh; an event or the job's stop wakes it.
            self._next_poll = float("inf")
        else:
            # A job that waits changes when someone resumes it, or Ray places it:
            # the event log wakes the widget then; look rarely otherwise.
            slow = self.state in RESUMABLE or self.state == JobState.QUEUED.value
            self._next_poll = time.monotonic() + self.poll_interval * (
                _WAITING_SLOWDOWN if slow else 1
            )
        return self.state not in TERMINAL

    def streamed(self) -> bool:
        return (
            self.state in ACTIVE
            and not self._closed
            and time.monotonic() >= self._retry_at
            and self.job.client.url not in POLLER.unfollowable
            and POLLER.following(self.job.client)
        )

    def position(self) -> dict[str, Any]:
        where: dict[str, Any] = {"offset": self._log_offset, "metrics": self._metrics_next}
        if self._version is not None:
            where["record"] = self._version
        return where

    def take(self, news: dict[str, Any]) -> None:
        now = self.served_at = time.monotonic()
        if self._closed:
            return
        if "version" not in news:  # the server no longer knows the job (deleted)
            self.fail(JobNotFoundError(news.get("message", "no such job")))
            return
        with self._refresh_lock:
            if self._stream_error:
                self.message.value, self._stream_error = "", False
            part, page = news["log"], news["metrics"]
            record = news.get("record")
            if record is not None:
                self._received, self._version = (record, now), news["version"]
            else:
                record = self._aged(now)
            # A refresh may have read past where the request started: then
            # this part is old, and the next request starts where it stopped.
            if part["offset"] == self._log_offset and part["data"]:
                self._add_output(part)
                self._draw_log()
            new_metrics = page["since"] == self._metrics_next and page["next"] > page["since"]
            if new_metrics:
                self._metrics.extend(page["metrics"])
                self._metrics_next = page["next"]
            # Redrawing everything (the chart) for every printed line would
            # cost the kernel; the state and the chart are drawn when they
            # change, and the elapsed time once per poll interval.
            changed = _unlike(record, self.record)
            if changed or new_metrics or now - self._drawn_at >= self.poll_interval:
                self._draw(record)
        if not self.streamed():
            self._next_poll = 0.0  # stopped: the poller takes it from here

    def _aged(self, now: float) -> dict[str, Any]:
        """The newest record received, its run's elapsed time counted on to ``now``."""
        record, at = self._received
        elapsed = record.get("elapsed")
        if record.get("state") in RUNNING_STATES and isinstance(elapsed, int | float):
            return {**record, "elapsed": round(elapsed + now - at, 3)}
        return record

    def fail(self, error: Exception) -> None:
        self.message.value, self._stream_error = error_html(error), True
        self._retry_at = time.monotonic() + _FOLLOW_RETRY
        self._next_poll = 0.0

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
        self._drawn_at = time.monotonic()
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
        self._closed = True  # the stream drops it from its next request
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

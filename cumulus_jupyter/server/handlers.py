"""REST handlers under ``{base_url}cumulus/api/`` (see docs/rest-api.md).

Every verb is ``@web.authenticated`` then ``@authorized``: submitting a job is
remote code execution by design, so the Jupyter credentials are the boundary.
Errors are JSON ``{"error": code, "message": text}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from http.client import responses
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..errors import CumulusError
from ..states import ACTIVE, JobState
from .manager import JobManager
from .requests import Position, parse_follow, parse_resume, parse_submission
from .store import LOG_CHUNK

AUTH_RESOURCE = "cumulus"
_ID = r"(?P<job_id>[^/]+)"
#: The longest a request may hold the connection waiting (result, logs).
MAX_WAIT = 60.0
#: How often a held request looks for new output: log growth is no event the server hears of.
LOG_POLL = 0.1
_STATUS_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "invalid_state",
    413: "payload_too_large",
}


class CumulusHandler(APIHandler):
    """Base handler: JSON errors, access to the job manager."""

    auth_resource = AUTH_RESOURCE

    def _request_summary(self) -> str:
        # tornado logs HTTP errors with the full URI, query included: a
        # `?token=...` would land in the server log. The path is enough.
        return f"{self.request.method} {self.request.path} ({self.request.remote_ip})"

    @property
    def manager(self) -> JobManager:
        return self.settings["cumulus_manager"]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        code = _STATUS_CODES.get(status_code, "error")
        message = responses.get(status_code, "error")
        if isinstance(exc, web.HTTPError):
            code = exc.reason or code
            if exc.log_message:
                message = exc.log_message % exc.args  # log_message is a %-format
        if status_code >= 500:
            code, message = "internal_error", "internal server error; see the server log"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": code, "message": message}))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn the manager's errors into HTTP answers with the same code."""
        try:
            yield
        except CumulusError as e:
            raise web.HTTPError(e.status, e.message.replace("%", "%%"), reason=e.code) from None

    def body(self) -> dict[str, Any]:
        """The JSON object body; an empty body is ``{}``."""
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPError(400, "the body is not valid JSON", reason="bad_request") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the body must be a JSON object", reason="bad_request")
        return data

    def number_arg(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not lo <= value <= hi:
            raise web.HTTPError(
                400, f"{name} must be a number from {lo:g} to {hi:g}", reason="bad_request"
            )
        return value

    def bool_arg(self, name: str, default: bool) -> bool:
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        value = {"true": True, "1": True, "false": False, "0": False}.get(raw.lower())
        if value is None:
            raise web.HTTPError(400, f"{name} must be true or false", reason="bad_request")
        return value

    def reply(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data, default=str))


class JobsHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"jobs": self.manager.list_jobs(), "gpus": self.manager.gpu_usage()})

    @web.authenticated
    @authorized("execute")
    async def post(self) -> None:
        with self.errors():
            user = self.current_user
            owner = getattr(user, "username", "") or ""
            submission = parse_submission(
                self.body(), self.manager.max_payload_bytes, self.manager.rank_limit
            )
            job = await self.manager.submit(submission, owner=owner)
        self.set_header("Location", self._job_url(job["id"]))
        self.reply(job, status=201)

    def _job_url(self, job_id: str) -> str:
        return f"{self.base_url.rstrip('/')}/cumulus/api/jobs/{job_id}"


class JobHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        with self.errors():
            self.reply(self.manager.public(job_id))

    @web.authenticated
    @authorized
    async def delete(self, job_id: str) -> None:
        with self.errors():
            self.manager.forget(job_id)
            await self.manager.settled(job_id)  # the directory is gone
        self.set_status(204)
        self.finish()


class PauseHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        with self.errors():
            self.body()  # an empty or JSON body; nothing in it is needed
            job = self.manager.pause(job_id)
            await self.manager.settled(job_id)
        self.reply(job)


class ResumeHandler(CumulusHandler):
    @web.authenticated
    @authorized("execute")
    async def post(self, job_id: str) -> None:
        with self.errors():
            request = parse_resume(self.body(), self.manager.rank_limit)
            job = self.manager.resume(job_id, request)
            await self.manager.settled(job_id)
        self.reply(job)


class CancelHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        with self.errors():
            self.body()
            job = self.manager.cancel(job_id)
            await self.manager.settled(job_id)
        self.reply(job)


class ResultHandler(CumulusHandler):
    """The pickled outcome of the last run, once the job stopped running.

    ``?wait=S`` holds the request up to S seconds for the job to stop. While
    it still runs the answer is 202 with the job record; a stopped job with
    no outcome (cancelled, killed, lost) is 409 ``no_result``.
    """

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        with self.errors():
            wait = self.number_arg("wait", 0.0, 0.0, MAX_WAIT)
            deadline = time.monotonic() + wait
            while self.manager.get(job_id).state in ACTIVE:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.reply(self.manager.public(job_id), status=202)
                    return
                await self.manager.wait_for_change(job_id, left)
            # The outcome is final: so is the record on disk when the caller hears of it.
            await self.manager.settled(job_id)
            job = self.manager.get(job_id)
            # A cancelled run's outcome is not a result, whatever it left behind.
            cancelled = job.state is JobState.CANCELLED
            data = None if cancelled else self.manager.store.dir(job_id).read_result()
            if data is None:
                raise web.HTTPError(
                    409,
                    f"job {job_id} is {job.state} and its last run returned nothing: "
                    f"{job.message}".replace("%", "%%"),
                    reason="no_result",
                )
        self.set_header("X-Cumulus-State", job.state.value)
        self.finish(data, set_content_type="application/octet-stream")


class LogsHandler(CumulusHandler):
    """``?offset=N`` bytes onward; ``?wait=S`` waits up to S seconds for new output."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        with self.errors():
            offset = int(self.number_arg("offset", 0, 0, 2**62))
            wait = self.number_arg("wait", 0.0, 0.0, MAX_WAIT)
            deadline = time.monotonic() + wait
            while True:
                part = log_part(self.manager, job_id, offset)
                if part["data"] or not part["running"] or time.monotonic() >= deadline:
                    break
                # Log growth is not an event the server hears about; a short
                # poll keeps the wait cheap and the latency low.
                await asyncio.sleep(LOG_POLL)
            self.reply(part)


class FollowHandler(CumulusHandler):
    """``POST follow``: what is new in several jobs, in one long-poll.

    For a notebook full of live widgets: one request at a time per notebook,
    not one per widget. The body names each job and how far the caller has
    read it; the answer has, for each, its output and its metrics from there
    (as ``.../logs`` and ``.../metrics`` give them), its record's version,
    and its record (as ``GET jobs/{id}`` gives it) unless the caller has that
    version. ``wait`` holds the request until one of the jobs has new output,
    or is no longer running, or changed state.
    """

    @web.authenticated
    @authorized("read")
    async def post(self) -> None:
        with self.errors():
            positions, wait = parse_follow(self.body(), MAX_WAIT)
        deadline = time.monotonic() + wait
        # An answer of many jobs holds no more output than one job's would.
        limit = max(LOG_CHUNK // len(positions), 64 * 1024)
        states = self._states(positions)
        while wait > 0 and time.monotonic() < deadline:
            if any(s is None or s not in ACTIVE for s in states.values()):
                break  # unknown, or stopped: the caller learns it now
            if self._states(positions) != states:
                break
            if any(self.manager.store.log_size(i) > p.offset for i, p in positions.items()):
                break
            await asyncio.sleep(LOG_POLL)
        self.reply({"jobs": {i: self._news(i, p, limit) for i, p in positions.items()}})

    def _states(self, positions: dict[str, Position]) -> dict[str, JobState | None]:
        jobs = self.manager.jobs
        return {i: jobs[i].state if i in jobs else None for i in positions}

    def _news(self, job_id: str, where: Position, limit: int) -> dict[str, Any]:
        try:
            self.manager.get(job_id)
        except CumulusError as e:
            return {"error": e.code, "message": e.message}
        metrics, next_index = self.manager.store.metrics(job_id, where.metrics)
        news: dict[str, Any] = {
            "version": self.manager.version(job_id),
            "log": log_part(self.manager, job_id, where.offset, limit),
            "metrics": {"metrics": metrics, "since": where.metrics, "next": next_index},
        }
        # Records are most of an answer: only the ones the caller lacks.
        if where.record != news["version"]:
            news["record"] = self.manager.public(job_id)
        return news


def log_part(
    manager: JobManager, job_id: str, offset: int, limit: int = LOG_CHUNK
) -> dict[str, Any]:
    """Output of a job from byte ``offset``, as ``GET jobs/{id}/logs`` answers it."""
    running = manager.get(job_id).state in ACTIVE
    data, size = manager.store.read_log(job_id, offset, limit)
    # Never split a UTF-8 character between two answers.
    data = _complete_utf8(data)
    return {
        "offset": offset,
        "next_offset": offset + len(data),
        "size": size,
        "data": data.decode("utf-8", errors="replace"),
        "running": running,
    }


def _complete_utf8(data: bytes) -> bytes:
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # found the start of the last character
            need = (
                1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            )
            return data if need <= back else data[:-back]
    return data


class MetricsHandler(CumulusHandler):
    """One record per step, the newest run's; ``?run=N``: run N's records as
    written; ``?all=true``: every record as written. ``?since=N`` pages all three."""

    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        with self.errors():
            since = int(self.number_arg("since", 0, 0, 2**62))
            run = None
            if self.get_query_argument("run", None) is not None:
                run = self.number_arg("run", 1, 1, 2**31)
                if not run.is_integer():
                    raise web.HTTPError(400, "run must be a whole number", reason="bad_request")
            every = self.bool_arg("all", False)
            self.manager.get(job_id)
            records, next_index = self.manager.store.metrics(
                job_id, since, run=None if run is None else int(run), every=every
            )
            self.reply({"metrics": records, "since": since, "next": next_index})


class CheckpointsHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def get(self, job_id: str) -> None:
        with self.errors():
            self.reply({"checkpoints": self.manager.checkpoints(job_id)})


class CheckpointHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def delete(self, job_id: str, name: str) -> None:
        with self.errors():
            self.manager.delete_checkpoint(job_id, name)
        self.set_status(204)
        self.finish()


class GpusHandler(CumulusHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        warm = getattr(self.manager.backend, "warm", None)
        self.reply({"gpus": self.manager.gpu_usage(), "warm": warm.usage() if warm else None})


class EventsHandler(CumulusHandler):
    """``GET events?since=N&wait=S``: the events after sequence number N, oldest first.

    With ``wait`` the request is held up to S seconds until there is one (a
    long-poll: it answers as soon as an event is added). ``first`` is the
    oldest event still kept: a client whose ``since`` is older missed some.
    """

    @web.authenticated
    @authorized
    async def get(self) -> None:
        since = int(self.number_arg("since", 0, 0, 2**53))
        wait = self.number_arg("wait", 0.0, 0.0, MAX_WAIT)
        limit = int(self.number_arg("limit", 1000, 1, 10_000))
        log = self.manager.events
        if since > log.last:
            # A sequence number from another job root, or a log that was lost:
            # answer now with where the log stands, the client starts again there.
            wait = 0.0
        if wait > 0:
            await log.wait(since, wait)
        events = log.since(since, limit)
        self.reply({"events": events, "last": log.last, "first": log.first})


def handlers() -> list[tuple[str, type[CumulusHandler]]]:
    """Routes relative to the server's base_url."""
    api = r"/cumulus/api"
    return [
        (rf"{api}/jobs/?", JobsHandler),
        (rf"{api}/gpus/?", GpusHandler),
        (rf"{api}/events/?", EventsHandler),
        (rf"{api}/follow/?", FollowHandler),
        (rf"{api}/jobs/{_ID}/?", JobHandler),
        (rf"{api}/jobs/{_ID}/pause/?", PauseHandler),
        (rf"{api}/jobs/{_ID}/resume/?", ResumeHandler),
        (rf"{api}/jobs/{_ID}/cancel/?", CancelHandler),
        (rf"{api}/jobs/{_ID}/result/?", ResultHandler),
        (rf"{api}/jobs/{_ID}/logs/?", LogsHandler),
        (rf"{api}/jobs/{_ID}/metrics/?", MetricsHandler),
        (rf"{api}/jobs/{_ID}/checkpoints/?", CheckpointsHandler),
        (rf"{api}/jobs/{_ID}/checkpoints/(?P<name>[^/]+)", CheckpointHandler),
    ]

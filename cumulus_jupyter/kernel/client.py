"""The client SDK: ``CumulusClient`` and ``Job``.

Works from any Python process that can reach the server: a notebook kernel
(no arguments needed there), a script, another machine. It speaks HTTP with
the standard library and pickles calls with cloudpickle (``payload``); it
imports neither IPython nor ipywidgets. In a notebook a ``Job`` shows as its
widget: ``cumulus_jupyter.kernel`` registers that display, not this module.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cloudpickle

from ..connection import TOKEN_ENV, URL_ENV
from ..errors import (
    BadRequestError,
    CumulusError,
    JobFailedError,
    JobNotFoundError,
    JobStoppedError,
    error_from_response,
)
from ..spec import python_version
from .display import format_age, job_summary
from .payload import ship_call
from .transport import Transport

_LONG_POLL = 30.0


class ServerUnavailableError(CumulusError, ConnectionError):
    """The cumulus server could not be reached."""

    code = "unavailable"


class CumulusClient:
    """Talks to the cumulus server extension of a Jupyter server.

    In a kernel started by a Jupyter server with cumulus-jupyter,
    ``CumulusClient()`` finds the server through ``CUMULUS_SERVER_URL`` and
    ``CUMULUS_TOKEN``. Elsewhere pass the server's URL (with its base_url)
    and token::

        client = CumulusClient("http://127.0.0.1:8081", token="...")
        result = client.run(train, gpu_memory=0.5, duration="2h")
    """

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        url = url or os.environ.get(URL_ENV)
        if not url:
            raise CumulusError(
                "no cumulus server given: pass CumulusClient('http://host:port', token=...), "
                f"or set {URL_ENV} (a kernel started by a Jupyter server with cumulus-jupyter "
                "has it already)"
            )
        self.url = url.rstrip("/") + "/"
        self.token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        self.timeout = timeout
        #: The Job of the last run() or run_async() call, to get back to it.
        self.last_job: Job | None = None
        self._api = urllib.parse.urljoin(self.url, "cumulus/api/")
        self._transport = Transport(self.url)  # refuses a URL that is not http(s)

    def __repr__(self) -> str:
        return f"CumulusClient({self.url!r})"

    # -- HTTP ------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        url = urllib.parse.urljoin(self._api, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None if body is None else json.dumps(body).encode()
        headers = {}
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            status, reply_headers, raw = self._transport.request(
                method, url, data, headers, timeout or self.timeout
            )
        except (OSError, http.client.HTTPException) as e:
            raise ServerUnavailableError(
                f"cannot reach the cumulus server at {self.url}: {e}"
            ) from None
        if status >= 400:
            raise error_from_response(status, raw)
        if 300 <= status < 400:
            # The API never redirects; a proxy or hub in front of it does, to a
            # login page, when the URL misses the base_url or the token is not
            # one it knows.
            raise CumulusError(
                f"the server at {self.url} answered {method} {url} with a redirect to"
                f" {reply_headers.get('Location', '?')}: check the URL (with its base_url)"
                " and the token"
            )
        return status, reply_headers, raw

    def close(self) -> None:
        """Close this thread's kept-alive connection to the server.

        Never needed: the next request opens a new one, and a client that is
        garbage-collected closes its connections.
        """
        self._transport.close()

    def _json(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        _, _, raw = self._request(method, path, body, **kw)
        return json.loads(raw) if raw else None

    # -- submitting ------------------------------------------------------------

    def run_async(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        gpu_memory: float = 1.0,
        duration: float | str | None = None,
        name: str | None = None,
        ship: Iterable[str] = (),
        *,
        nprocs: int = 1,
        max_restarts: int = 0,
        notify: bool = True,
    ) -> Job:
        """Start ``func(*args, **kwargs)`` as a job and return its :class:`Job` at once.

        ``gpu_memory`` is the share of one GPU (``0 < gpu_memory <= 1``) the
        job may use; ``duration`` a limit in seconds or as ``"30m"``/``"2h"``,
        after which the job is paused and ends ``timed_out``, resumable.

        ``nprocs`` runs the job as that many processes (ranks), each with
        ``gpu_memory`` of a GPU of its own (on a host without GPUs they share
        the CPU): ``func`` is called in every rank with ``torch.distributed``
        initialised; the result is rank 0's return value. The server refuses
        more ranks than it has GPUs (or, without GPUs, CPU cores).

        ``max_restarts`` restarts a run that dies without being asked (killed
        from outside, out of memory) from its newest checkpoint, up to that
        many times; the record's ``restarts`` lists each with its cause. A
        run whose function raised is not restarted: that is a bug to fix.

        ``notify=False`` keeps this job out of JupyterLab's notifications and
        the server's webhooks (``CumulusApp.notify_url``).

        Your own modules that the call uses (``model.py`` beside the notebook,
        a local package) travel with it as source files; ``ship`` names more
        modules to send even though they are installed here (an editable
        install the server's environment lacks). See "What travels with a
        job" in the README.
        """
        if not callable(func):
            raise BadRequestError(f"func must be callable, got {type(func).__name__}")
        args, kwargs = tuple(args), dict(kwargs or {})
        shipment = ship_call(func, args, kwargs, ship)
        body = {
            "payload": base64.b64encode(shipment.payload).decode("ascii"),
            "modules": shipment.body(),
            "name": name or getattr(func, "__name__", None) or "job",
            "gpu_memory": gpu_memory,
            "duration": duration,
            "python": sys.executable,
            "python_version": python_version(),
        }
        if not _is_one(nprocs):
            # Sent only when it says something: a server from before ranks
            # refuses fields it does not know. The server checks the value.
            body["nprocs"] = nprocs
        if max_restarts != 0:
            body["max_restarts"] = max_restarts
        if notify is not True:
            body["notify"] = notify  # the server says what is wrong with a non-bool
        record = self._json("POST", "jobs", body)
        self.last_job = Job(self, record)
        return self.last_job

    def run(
        self,
        func: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        gpu_memory: float = 1.0,
        duration: float | str | None = None,
        name: str | None = None,
        ship: Iterable[str] = (),
        *,
        nprocs: int = 1,
        max_restarts: int = 0,
        notify: bool = True,
    ) -> Any:
        """Run ``func`` as a job, wait until it stops, and return what it returned.

        The options are :meth:`run_async`'s. With ``nprocs`` > 1, ``func`` is
        called in every rank with ``torch.distributed`` initialised; the result
        is rank 0's return value.

        A function that raised raises :class:`JobFailedError` here, with the
        remote traceback.
        """
        job = self.run_async(
            func,
            args,
            kwargs,
            gpu_memory,
            duration,
            name,
            ship,
            nprocs=nprocs,
            max_restarts=max_restarts,
            notify=notify,
        )
        return job.result()

    # -- jobs ------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        """Every job the server knows, oldest first."""
        return [Job(self, r) for r in self._json("GET", "jobs")["jobs"]]

    def get_job(self, job_id: str) -> Job:
        """The :class:`Job` with this id (``JobNotFoundError`` if there is none)."""
        return Job(self, self._job_record(job_id))

    def _job_record(self, job_id: str) -> dict[str, Any]:
        if not job_id:
            raise JobNotFoundError("no job with an empty id; list jobs with client.jobs()")
        return self._json("GET", f"jobs/{_quote(job_id)}")

    def pause_job(self, job_id: str) -> dict[str, Any]:
        """Ask a running job to checkpoint and stop; returns its record (state ``pausing``)."""
        return self._json("POST", f"jobs/{_quote(job_id)}/pause", {})

    def resume_job(
        self,
        job_id: str,
        checkpoint: str | None = None,
        duration: float | str | None = None,
        nprocs: int | None = None,
    ) -> dict[str, Any]:
        """Resume a paused, timed-out or lost job, from ``checkpoint`` (a name) or the latest.

        ``duration`` sets a new time limit and ``nprocs`` a new number of ranks
        for the next runs; ``None`` keeps the job's.
        """
        body: dict[str, Any] = {}
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        if duration is not None:
            body["duration"] = duration
        if nprocs is not None:
            body["nprocs"] = nprocs
        return self._json("POST", f"jobs/{_quote(job_id)}/resume", body)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Stop a job for good, with every process it started."""
        return self._json("POST", f"jobs/{_quote(job_id)}/cancel", {})

    def forget_job(self, job_id: str) -> None:
        """Delete a job that is not running, and its directory."""
        self._request("DELETE", f"jobs/{_quote(job_id)}")

    def get_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's checkpoints, oldest first: name, epoch, step, time, size, hash."""
        return self._json("GET", f"jobs/{_quote(job_id)}/checkpoints")["checkpoints"]

    def delete_checkpoint(self, job_id: str, name: str) -> None:
        """Delete one checkpoint (refused for the one a paused job resumes from)."""
        self._request("DELETE", f"jobs/{_quote(job_id)}/checkpoints/{_quote(name)}")

    def get_metrics(
        self, job_id: str, since: int = 0, run: int | None = None, all_runs: bool = False
    ) -> list[dict[str, Any]]:
        """What the job recorded with ``report()``, from record number ``since`` on.

        One record per step, the newest run's (a step that a resumed run did
        again shows once). ``run=N`` gives that run's records as written;
        ``all_runs=True`` every record of every run, each with its ``run``.
        """
        return self.metrics_page(job_id, since, run, all_runs)["metrics"]

    def metrics_page(
        self, job_id: str, since: int = 0, run: int | None = None, all_runs: bool = False
    ) -> dict[str, Any]:
        """One page of :meth:`get_metrics`: ``{'metrics': [...], 'next': N, ...}``.

        Pass ``next`` as ``since`` to get only what was recorded after this page.
        """
        params: dict[str, Any] = {}
        if since:
            params["since"] = since
        if run is not None:
            params["run"] = run
        if all_runs:
            params["all"] = "true"
        path = f"jobs/{_quote(job_id)}/metrics"
        return self._json("GET", path, params=params or None)

    def get_logs(self, job_id: str, offset: int = 0, wait: float = 0.0) -> dict[str, Any]:
        """Log text from byte ``offset``: ``{'data', 'next_offset', 'running', ...}``."""
        return self._json(
            "GET",
            f"jobs/{_quote(job_id)}/logs",
            params={"offset": offset, "wait": wait},
            timeout=wait + self.timeout,
        )

    def follow(
        self, positions: Mapping[str, Mapping[str, int | str]], wait: float = 0.0
    ) -> dict[str, dict[str, Any]]:
        """What is new in several jobs, in one request (``POST follow``).

        ``positions`` maps each job's id to how far it was read:
        ``{"offset": bytes of output, "metrics": records of metrics}`` (both
        default to 0), and ``"record"``: the ``version`` of the job's record
        an earlier answer gave, if the caller has it. The answer maps each id
        to ``{"version", "log", "metrics"}`` and ``"record"`` unless the
        caller has that version, shaped as :meth:`get_logs`,
        :meth:`metrics_page` and :meth:`Job.info` answer; or to ``{"error",
        "message"}`` for a job the server does not know. ``wait`` holds the
        request up to that many seconds until one of the jobs prints, stops
        running or changes state.
        """
        body = {"jobs": {job_id: dict(where) for job_id, where in positions.items()}, "wait": wait}
        return self._json("POST", "follow", body, timeout=wait + self.timeout)["jobs"]

    def gpus(self) -> list[dict[str, Any]]:
        """Per device: the share taken and by which jobs."""
        return self._json("GET", "gpus")["gpus"]

    def events(self, since: int = 0, wait: float = 0.0, limit: int = 1000) -> dict[str, Any]:
        """Events after sequence number ``since``: ``{'events': [...], 'last', 'first'}``.

        ``wait`` holds the request up to that many seconds until there is one;
        at most ``limit`` events come back. Pass ``last`` as the next ``since``
        to follow every change of every job.
        """
        params = {"since": since, "wait": wait, "limit": limit}
        return self._json("GET", "events", params=params, timeout=wait + self.timeout)


class Job:
    """A job on the server.

    Its methods ask the server. The record last received (with this ``Job``,
    or by the last method that returned one) is kept as :attr:`record`:
    ``name``, the repr and a widget's first drawing read it without asking.
    """

    def __init__(self, client: CumulusClient, record: dict[str, Any]):
        self.client = client
        self.id: str = record["id"]
        self._receive(record)

    @property
    def record(self) -> dict[str, Any]:
        """The job's record as last received from the server (:meth:`info` fetches it anew)."""
        return self._record

    def _receive(self, record: dict[str, Any]) -> dict[str, Any]:
        """Keep ``record`` as the newest one received, and when it came (for the repr)."""
        self._record = record
        self._seen = time.monotonic()
        return record

    def __repr__(self) -> str:
        # A repr must not call the server (it is shown in tracebacks, also
        # when the server is down), so it says how old the state it shows is.
        r = self._record
        age = time.monotonic() - self._seen
        seen = f" as of {format_age(age)} ago; status() refreshes" if age >= 1 else ""
        return f"<Job {self.id} {r.get('name')!r} {r.get('state')}{seen}>"

    @property
    def name(self) -> str:
        """The job's name."""
        return self._record.get("name", "")

    def info(self) -> dict[str, Any]:
        """The job's full record from the server (state, times, device, runs, ...)."""
        return self._receive(self.client._job_record(self.id))

    def status(self) -> str:
        """The job's state: queued, running, pausing, paused, completed, failed, ..."""
        return self.info()["state"]

    def pause(self) -> dict[str, Any]:
        """Ask the job to checkpoint and stop at its next batch boundary."""
        return self._receive(self.client.pause_job(self.id))

    def resume(
        self,
        checkpoint: str | None = None,
        duration: float | str | None = None,
        nprocs: int | None = None,
    ) -> dict[str, Any]:
        """Continue the job from ``checkpoint`` (a name from get_checkpoints) or the latest.

        ``duration`` sets a new time limit, ``nprocs`` a new number of ranks;
        ``None`` keeps the job's.
        """
        return self._receive(self.client.resume_job(self.id, checkpoint, duration, nprocs))

    def cancel(self) -> dict[str, Any]:
        """Stop the job for good."""
        return self._receive(self.client.cancel_job(self.id))

    def get_checkpoints(self) -> list[dict[str, Any]]:
        """The job's checkpoints, oldest first."""
        return self.client.get_checkpoints(self.id)

    def metrics(self, run: int | None = None, all_runs: bool = False) -> list[dict[str, Any]]:
        """What the job recorded with ``report()``: one record per step, the newest run's.

        ``run=N`` gives that run's records; ``all_runs=True`` every record.
        """
        return self.client.get_metrics(self.id, run=run, all_runs=all_runs)

    def logs(self) -> str:
        """Everything the job printed so far, across all its runs."""
        chunks, offset = [], 0
        while True:
            part = self.client.get_logs(self.id, offset)
            chunks.append(part["data"])
            if part["next_offset"] == offset or part["next_offset"] >= part["size"]:
                return "".join(chunks)
            offset = part["next_offset"]

    def _await_outcome(self, timeout: float | None) -> bytes:
        """Long-poll until the job stops running; return its pickled outcome.

        Raises TimeoutError, or JobStoppedError when the run left no outcome.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = _LONG_POLL if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"job {self.id} is still {self._record.get('state')} after {timeout}s"
                )
            status, _, raw = self.client._request(
                "GET",
                f"jobs/{_quote(self.id)}/result",
                params={"wait": min(left, _LONG_POLL)},
                timeout=min(left, _LONG_POLL) + self.client.timeout,
            )
            if status != 202:
                return raw
            self._receive(json.loads(raw))

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job stops running (paused, finished, ...); return its state."""
        # A stopped run without an outcome is still stopped.
        with contextlib.suppress(JobStoppedError):
            self._await_outcome(timeout)
        return self.info()["state"]

    def result(self, timeout: float | None = None) -> Any:
        """Wait until the job stops running and return what its last run returned.

        A paused job returns what the function returned when it paused (the
        seed's ``{'status': 'paused', ...}``). Raises :class:`JobFailedError`
        with the remote traceback if the function raised, and
        :class:`JobStoppedError` if the run ended without returning (cancelled,
        killed, lost).
        """
        try:
            raw = self._await_outcome(timeout)
        except JobStoppedError as e:
            e.state = self.status()
            raise
        outcome = cloudpickle.loads(raw)
        if outcome.get("ok"):
            return outcome.get("value")
        raise JobFailedError(
            outcome.get("message", ""),
            exc_type=outcome.get("exc_type", ""),
            remote_traceback=outcome.get("traceback", ""),
            exception=outcome.get("exception"),
        )

    def _ipython_display_(self) -> None:
        """IPython shows a Job as its text summary; a notebook kernel shows its widget
        instead (``cumulus_jupyter.kernel`` registers it there, ahead of this method)."""
        print(self.summary())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.summary())

    def summary(self) -> str:
        """A one-line text description from the server's current record."""
        return job_summary(self.info())


def _is_one(nprocs: Any) -> bool:
    """Whether ``nprocs`` is exactly the default 1: ``True == 1``, but it is sent, and refused."""
    return type(nprocs) is int and nprocs == 1


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")

"""Webhooks: POST a job's event to URLs the server was given, for the states chosen.

``CumulusApp.notify_url`` (one or more) receive each event of a job reaching
one of ``CumulusApp.notify_states`` as JSON, or as a Slack incoming-webhook
message with ``notify_format = "slack"``. Each URL has its own queue and one
sender task on the server's event loop with a non-blocking HTTP client, so
events reach it in order, and a slow or dead endpoint delays nothing but its
own later events: never a request, never job control. A failed POST is tried
again with growing pauses for ``retry_for`` seconds, then dropped with an
error in the log. URLs are logged without their query string or user info
(where webhook secrets live).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.parse
from collections.abc import Iterable
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .events import STATE_CHANGE

#: States that notify unless configured otherwise.
DEFAULT_STATES = ("completed", "failed", "timed_out", "lost")
FORMATS = ("json", "slack")


def redact(url: str) -> str:
    """``url`` without what may be a secret: user info, query and fragment."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<an unparsable URL>"
    hidden = "?…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")) + hidden


def slack_message(event: dict[str, Any]) -> dict[str, Any]:
    """The event as a Slack incoming-webhook message."""
    metrics = event.get("metrics") or {}
    shown = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in metrics.items()
        if k not in ("time", "run") and isinstance(v, int | float | str)
    )
    text = f"cumulus: job *{event.get('name')}* (`{event.get('job')}`) is {event.get('new')}"
    if event.get("message") and event.get("message") != event.get("new"):
        text += f": {event['message']}"
    if shown:
        text += f"\nlast metrics: {shown}"
    return {"text": text}


class Webhooks:
    """Delivers chosen events to every configured URL, in order, off the request path."""

    def __init__(
        self,
        urls: Iterable[str],
        states: Iterable[str] = DEFAULT_STATES,
        fmt: str = "json",
        *,
        timeout: float = 10.0,
        retry_for: float = 300.0,
        first_retry: float = 1.0,
        log: logging.Logger | None = None,
    ) -> None:
        self.urls = list(urls)
        self.states = set(states)
        self.format = fmt
        self.timeout = timeout
        self.retry_for = retry_for
        self.first_retry = first_retry
        self.log = log or logging.getLogger("cumulus_jupyter")
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        """An event listener (:meth:`EventLog.subscribe`): queue it if it is one to send."""
        if event.get("kind") != STATE_CHANGE or event.get("new") not in self.states:
            return
        if not event.get("notify", True):
            return  # the job was submitted with notify=False
        for url in self.urls:
            self._queue(url).put_nowait(event)

    def _queue(self, url: str) -> asyncio.Queue[dict[str, Any]]:
        queue = self._queues.get(url)
        if queue is None:
            queue = self._queues[url] = asyncio.Queue()
            self._tasks.append(asyncio.get_running_loop().create_task(self._sender(url, queue)))
        return queue

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._queues.clear()

    async def _sender(self, url: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        client = AsyncHTTPClient()
        while True:
            event = await queue.get()
            await self._deliver(client, url, event)

    async def _deliver(self, client: AsyncHTTPClient, url: str, event: dict[str, Any]) -> None:
        body = slack_message(event) if self.format == "slack" else event
        request = HTTPRequest(
            url,
            method="POST",
            body=json.dumps(body, default=str),
            headers={"Content-Type": "application/json"},
            request_timeout=self.timeout,
            connect_timeout=self.timeout,
            follow_redirects=False,
        )
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_for
        pause = self.first_retry
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await client.fetch(request, raise_error=False)
                problem = None if 200 <= response.code < 300 else f"HTTP {response.code}"
                if response.code == 599:  # tornado's own: timeout, connection refused
                    problem = str(response.error)
            except Exception as e:  # DNS, TLS: anything is a failed attempt
                problem = f"{type(e).__name__}: {e}"
            if problem is None:
                return
            # The error text may quote the URL: say it in our own words only.
            problem = problem.replace(url, redact(url))
            if loop.time() + pause > give_up:
                self.log.error(
                    "cumulus: gave up posting event %s (job %s %s) to %s after %d attempts: %s",
                    event.get("seq"),
                    event.get("job"),
                    event.get("new"),
                    redact(url),
                    attempt,
                    problem,
                )
                return
            self.log.warning(
                "cumulus: posting event %s to %s failed (%s); trying again in %.0f s",
                event.get("seq"),
                redact(url),
                problem,
                pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 60.0)

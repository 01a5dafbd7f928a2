"""Concurrent asyncio clients driving the job lifecycle (used by the load test and benchmark)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from cumulus_jupyter.kernel.payload import pickle_call
from cumulus_jupyter.spec import python_version

ACTIVE = {"queued", "running", "pausing"}


class Recorder:
    def __init__(self) -> None:
        self.status_latencies: list[float] = []
        self.codes: dict[int, int] = {}
        self.states: dict[str, list[str]] = {}
        #: job id -> [(action, state the job was in, response code)]
        self.actions: dict[str, list[tuple[str, str, int]]] = {}
        #: job id -> the state its last accepted action implies
        self.implied: dict[str, str] = {}


class StreamClient:
    """HTTP/1.1 over asyncio streams, each connection kept for the next request.

    Browsers and the SDK keep their connection to the server alive and send
    back its login cookie, so the load does too (``keep_alive=False``: a new
    connection for every request and no cookie, as the SDK did before). Written on the
    streams, not on a client library: the load shares this machine's CPU
    with the server it measures, and tornado's client spent about 1 ms of
    CPU per request where this one spends about 0.1 ms (0.3 ms connecting
    anew each time).
    """

    def __init__(self, base: str, keep_alive: bool = True) -> None:
        parts = urlsplit(base)
        self.host, self.port = parts.hostname, parts.port
        self.keep_alive = keep_alive
        #: The server's login cookie, sent back as a browser (and the SDK) does.
        self.cookies: dict[str, str] = {}
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def request(self, method: str, url: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        reader, writer = (
            self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        )
        head = [f"{method} {urlsplit(url).path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if self.cookies:
            head.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        head.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        status = await reader.readline()
        code, length, close = int(status.split()[1]), 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"set-cookie" and self.keep_alive:
                pair = value.decode().strip().split(";", 1)[0]
                self.cookies[pair.split("=", 1)[0]] = pair.split("=", 1)[1]
            elif name == b"connection":
                close = value.strip().lower() == b"close"
            elif name == b"transfer-encoding":
                raise AssertionError("the server's answers carry a Content-Length")
        data = await reader.readexactly(length)
        if close or not self.keep_alive:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return code, data

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def call(http, base, token, rec, method, path, body=None):
    t = time.perf_counter()
    code, data = await asyncio.wait_for(
        http.request(
            method,
            base + path,
            b"" if body is None else json.dumps(body).encode(),
            {"Authorization": f"token {token}"},
        ),
        120,
    )
    elapsed = time.perf_counter() - t
    rec.codes[code] = rec.codes.get(code, 0) + 1
    if method == "GET" and path.count("/") == 1:  # GET jobs/{id}: a status request
        rec.status_latencies.append(elapsed)
    return code, (json.loads(data) if data and data[:1] == b"{" else None)


async def lifecycle(http, base, token, rec, payload, rng, deadline, share=0.02):
    """One client: submit, watch, pause, resume, maybe cancel, watch to the end."""
    code, job = await call(
        http, base, token, rec, "POST", "jobs", {**payload, "gpu_memory": share, "name": "load"}
    )
    assert code == 201, (code, job)
    job_id = job["id"]
    seen = rec.states.setdefault(job_id, [job["state"]])

    async def status():
        code, record = await call(http, base, token, rec, "GET", f"jobs/{job_id}")
        assert code == 200, code
        if record["state"] != seen[-1]:
            seen.append(record["state"])
        return record["state"]

    while await status() == "queued" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(rng.uniform(0, 0.5))
    await call(http, base, token, rec, "POST", f"jobs/{job_id}/pause", {})
    while await status() in ACTIVE and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await call(http, base, token, rec, "POST", f"jobs/{job_id}/resume", {})
    if rng.random() < 0.5:
        await asyncio.sleep(rng.uniform(0, 0.3))
        await call(http, base, token, rec, "POST", f"jobs/{job_id}/cancel", {})
    while await status() in ACTIVE and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return job_id, seen[-1]


async def run_clients(
    base: str,
    token: str,
    n: int,
    seconds: float,
    func: Any,
    args: tuple,
    share: float = 0.02,
    keep_alive: bool = True,
):
    http = StreamClient(base, keep_alive)
    rec = Recorder()
    payload = {
        "payload": base64.b64encode(pickle_call(func, args, {})).decode(),
        "python": sys.executable,
        "python_version": python_version(),
    }
    deadline = time.monotonic() + seconds
    rngs = [random.Random(i) for i in range(n)]
    finals = await asyncio.gather(
        *(lifecycle(http, base, token, rec, payload, rngs[i], deadline, share) for i in range(n))
    )
    http.close()
    return rec, finals


#: States a job cannot leave by itself while it holds (see ``pausable_hold``):
#: only a request of its own client moves it on, so a client that acts only in
#: these states knows the state its request meets.
STABLE = {"running", "paused", "completed", "cancelled", "failed", "timed_out", "lost"}
#: What an accepted request, or releasing the job, makes of it in the end.
OUTCOME = {"pause": "paused", "cancel": "cancelled", "release": "completed"}


def pausable_hold(release_path):
    """Runs until paused, cancelled or released (``release_path`` exists).

    ``<release_path>.run<N>`` appears once run N is inside this function, so
    a client can tell a job that checks ``should_pause()`` from one still
    starting (whose pause would wait for it, and escalate on a loaded machine).
    """
    import os
    import time

    from cumulus_jupyter.runtime import should_pause

    open(f"{release_path}.run{os.environ['CUMULUS_RUN']}", "w").close()
    while True:
        if should_pause():
            return "paused"
        if os.path.exists(release_path):
            return "released"
        time.sleep(0.02)


async def random_lifecycle(http, base, token, rec, python, rng, deadline, release_dir, share=0.02):
    """One client: a random walk of pause, resume, cancel and release, legal or not.

    It acts only when the job is in a stable state, so each request's
    expected answer follows from the state it observed; between requests it
    polls until the job is stable again.
    """
    name = f"walk-{rng.random():.12f}"
    release = f"{release_dir}/{name}"
    payload = {
        **python,
        "payload": base64.b64encode(pickle_call(pausable_hold, (release,), {})).decode(),
    }
    code, job = await call(
        http, base, token, rec, "POST", "jobs", {**payload, "gpu_memory": share, "name": name}
    )
    assert code == 201, (code, job)
    job_id = job["id"]
    seen = rec.states.setdefault(job_id, [job["state"]])
    actions = rec.actions.setdefault(job_id, [])

    def observe(state):
        if state != seen[-1]:
            seen.append(state)

    async def settle(leaving=None):
        while True:
            code, record = await call(http, base, token, rec, "GET", f"jobs/{job_id}")
            assert code == 200, code
            observe(record["state"])
            stopping = record["state"] == "running" and record.get("cancel_requested")
            starting = record["state"] == "running" and not os.path.exists(
                f"{release}.run{record['run']}"
            )
            if record["state"] in STABLE and not (
                stopping or starting or record["state"] == leaving
            ):
                return record["state"]
            assert time.monotonic() < deadline, f"{job_id} never settled: {seen}"
            await asyncio.sleep(0.05)

    async def request(action, state):
        code, record = await call(http, base, token, rec, "POST", f"jobs/{job_id}/{action}", {})
        actions.append((action, state, code))
        if code == 200:
            observe(record["state"])  # what the request made of it, however brief
            if action in OUTCOME:
                rec.implied[job_id] = OUTCOME[action]
            else:
                rec.implied.pop(job_id, None)  # running again: decided later

    async def release_and_settle():
        open(release, "w").close()
        rec.implied[job_id] = "completed"
        return await settle(leaving="running")  # running is not stable once released

    state = await settle()
    for _ in range(rng.randint(2, 6)):
        action = rng.choice(["pause", "resume", "cancel"] + (["release"] * (state == "running")))
        await asyncio.sleep(rng.uniform(0, 0.2))
        if action == "release":
            state = await release_and_settle()
        else:
            await request(action, state)
            state = await settle()
        if state not in ("running", "paused"):
            break
    if state == "running":  # every walk ends
        state = await release_and_settle()
    if state in ("completed", "cancelled"):  # nothing moves an ended job
        await request(rng.choice(["pause", "resume", "cancel"]), state)
    return job_id, await settle()


async def run_random_clients(base: str, token: str, n: int, seconds: float, release_dir: str):
    """``n`` clients, each walking one job at random; returns the recorder and final states."""
    http = StreamClient(base)
    rec = Recorder()
    python = {"python": sys.executable, "python_version": python_version()}
    deadline = time.monotonic() + seconds
    finals = await asyncio.gather(
        *(
            random_lifecycle(
                http, base, token, rec, python, random.Random(i), deadline, release_dir
            )
            for i in range(n)
        )
    )
    http.close()
    return rec, finals

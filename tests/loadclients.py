"""Concurrent asyncio clients driving the job lifecycle (used by the load test and benchmark)."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys
import time
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from cumulus_jupyter.client import _pickle_call
from cumulus_jupyter.spec import python_version

ACTIVE = {"queued", "running", "pausing"}


class Recorder:
    def __init__(self) -> None:
        self.status_latencies: list[float] = []
        self.codes: dict[int, int] = {}
        self.states: dict[str, list[str]] = {}


async def call(http, base, token, rec, method, path, body=None):
    t = time.perf_counter()
    try:
        resp = await http.fetch(
            base + path,
            method=method,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"token {token}"},
            request_timeout=120,
        )
        code, data = resp.code, resp.body
    except HTTPClientError as e:
        code, data = e.code, e.response.body if e.response else b""
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
    base: str, token: str, n: int, seconds: float, func: Any, args: tuple, share: float = 0.02
):
    AsyncHTTPClient.configure(None, max_clients=n + 8)
    http = AsyncHTTPClient()
    rec = Recorder()
    payload = {
        "payload": base64.b64encode(_pickle_call(func, args, {})).decode(),
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

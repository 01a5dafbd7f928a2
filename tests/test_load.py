"""50 concurrent clients drive the lifecycle of 50 jobs against a live server."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request

import jobfuncs
from loadclients import run_clients

from cumulus_jupyter.states import TRANSITIONS, JobState


def reachable() -> dict[str, set[str]]:
    """State -> every state reachable by legal transitions (polling can skip some)."""
    out = {}
    for start in JobState:
        seen, todo = set(), [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        out[start.value] = {s.value for s in seen}
    return out


def test_fifty_concurrent_clients_keep_every_job_legal(server):
    rec, finals = asyncio.run(
        run_clients(
            server.url + "cumulus/api/", server.token, 50, 120, jobfuncs.pausable_sleep, (1.0,)
        )
    )
    ids = [job_id for job_id, _ in finals]
    assert len(set(ids)) == 50  # unique ids
    assert set(rec.codes) <= {200, 201, 409}, rec.codes  # no 5xx, no 4xx but conflicts
    legal = reachable()
    for job_id, states in rec.states.items():
        for a, b in itertools.pairwise(states):
            assert b in legal[a], f"{job_id}: {a} -> {b} in {states}"
    req = urllib.request.Request(
        server.url + "cumulus/api/jobs", headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(req) as resp:
        records = {j["id"]: j for j in json.loads(resp.read())["jobs"]}
    for job_id, last_seen in finals:
        # What each client saw last is what the server kept: no lost update.
        assert records[job_id]["state"] == last_seen, (job_id, last_seen)
        assert last_seen in {"completed", "cancelled", "paused"}, (job_id, last_seen)

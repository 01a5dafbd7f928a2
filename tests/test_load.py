"""50 concurrent clients walk 50 jobs through their lifecycle at random against a live server."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from collections import Counter

from loadclients import run_random_clients

from cumulus_jupyter.states import JobState, can_transition

#: The state an accepted request moves a job to (a cancel of a running job
#: first asks its process to stop; the state machine's edge is the same).
TARGET = {"pause": JobState.PAUSING, "resume": JobState.QUEUED, "cancel": JobState.CANCELLED}


def test_fifty_concurrent_clients_keep_every_job_legal(server, tmp_path):
    rec, finals = asyncio.run(
        run_random_clients(server.url + "cumulus/api/", server.token, 50, 240, str(tmp_path))
    )
    ids = [job_id for job_id, _ in finals]
    assert len(set(ids)) == 50  # unique ids
    assert set(rec.codes) <= {200, 201, 409}, rec.codes  # no 5xx, no 4xx but conflicts

    # Every state change a client saw is one edge of the state machine.
    for job_id, states in rec.states.items():
        for a, b in itertools.pairwise(states):
            assert can_transition(JobState(a), JobState(b)), f"{job_id}: {a} -> {b} in {states}"

    # Each request was accepted exactly when the state it met allowed it.
    accepted = Counter()
    refused = 0
    for job_id, actions in rec.actions.items():
        for action, before, code in actions:
            allowed = can_transition(JobState(before), TARGET[action])
            assert code == (200 if allowed else 409), (job_id, action, before, code, actions)
            accepted[action] += code == 200
            refused += code == 409
    # The walk really paused, resumed and cancelled jobs, and was refused too.
    assert all(accepted[a] > 0 for a in TARGET), accepted
    assert refused > 0

    req = urllib.request.Request(
        server.url + "cumulus/api/jobs", headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(req) as resp:
        records = {j["id"]: j for j in json.loads(resp.read())["jobs"]}
    for job_id, last_seen in finals:
        # What each client saw last is what the server kept (no lost update),
        # and it is what the job's last accepted request implies.
        assert records[job_id]["state"] == last_seen, (job_id, last_seen)
        assert last_seen == rec.implied.get(job_id), (job_id, last_seen, rec.actions[job_id])

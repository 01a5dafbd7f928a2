"""Jobs of several ranks on a host with (configured) GPUs, against an in-process server.

Only queueing and refusals are checked here: the configured devices need not
exist, since no job of several ranks is started (running ranks is the job
process's part; tests/gpu covers it on real GPUs).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time

import cloudpickle
import jobfuncs
import pytest
from conftest import cumulus_server_config
from tornado.httpclient import HTTPClientError

cloudpickle.register_pickle_by_value(jobfuncs)

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
GPUS = ["0", "1", "2"]
KILL_GRACE = 7.5


@pytest.fixture
def jp_server_config(tmp_path):
    config = cumulus_server_config(tmp_path)
    config["CumulusApp"].update(gpus=GPUS, kill_grace=KILL_GRACE)
    return config


@pytest.fixture(autouse=True)
def started(jp_serverapp, jp_asyncio_loop):
    """pytest-jupyter does not run the server's post-start hook; a real server does."""
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())


def submit_body(func, args=(), **fields):
    payload = base64.b64encode(cloudpickle.dumps((func, args, {}))).decode()
    return json.dumps({"payload": payload, "python_version": VERSION, **fields})


async def submit(jp_fetch, func, args=(), **fields):
    body = submit_body(func, args, **fields)
    return json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)


async def record(jp_fetch, job_id):
    return json.loads((await jp_fetch("cumulus", "api", "jobs", job_id)).body)


async def wait_state(jp_fetch, job_id, state, timeout=60):
    deadline = time.monotonic() + timeout
    while (got := await record(jp_fetch, job_id))["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} is {got['state']}, not {state}"
        await asyncio.sleep(0.05)
    return got


async def test_more_ranks_than_gpus_is_refused(jp_fetch):
    body = submit_body(jobfuncs.add, (1,), nprocs=len(GPUS) + 1)
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)
    err = json.loads(info.value.response.body)
    assert info.value.code == 400 and err["error"] == "bad_request"
    assert "nprocs=4 is more ranks than this server can run" in err["message"]
    assert "3 GPU(s) and each rank needs one of its own; ask for at most 3" in err["message"]
    listed = json.loads((await jp_fetch("cumulus", "api", "jobs")).body)
    assert listed["jobs"] == []


async def test_a_job_of_two_ranks_waits_for_two_devices_and_nothing_overtakes_it(
    jp_fetch, tmp_path
):
    release = tmp_path / "release"
    try:
        # Two whole devices taken: one is left, with room for anything of one rank.
        holders = [
            await submit(jp_fetch, jobfuncs.hold_until, (str(release),), gpu_memory=1.0)
            for _ in range(2)
        ]
        for holder in holders:
            await wait_state(jp_fetch, holder["id"], "running")
        pair = await submit(jp_fetch, jobfuncs.add, (1,), gpu_memory=0.5, nprocs=2)
        single = await submit(
            jp_fetch,
            jobfuncs.environment,
            ("CUDA_VISIBLE_DEVICES", "CUMULUS_NPROCS", "CUMULUS_KILL_GRACE"),
            gpu_memory=0.5,
        )
        assert (pair["state"], pair["nprocs"]) == ("queued", 2)
        # It would fit on the free device, but it came after the pair.
        assert single["state"] == "queued"
        gpus = json.loads((await jp_fetch("cumulus", "api", "gpus")).body)["gpus"]
        free = [g["device"] for g in gpus if g["used"] == 0]
        assert len(free) == 1

        # Cancelling the pair lets the job behind it start at once, on the free device.
        resp = await jp_fetch(
            "cumulus", "api", "jobs", pair["id"], "cancel", method="POST", body="{}"
        )
        assert json.loads(resp.body)["state"] == "cancelled"
        resp = await jp_fetch("cumulus", "api", "jobs", single["id"], "result", params={"wait": 60})
        assert cloudpickle.loads(resp.body) == {
            "ok": True,
            "value": {
                "CUDA_VISIBLE_DEVICES": free[0],
                "CUMULUS_NPROCS": None,  # one rank: as before ranks
                "CUMULUS_KILL_GRACE": repr(KILL_GRACE),
            },
        }
        done = await record(jp_fetch, single["id"])
        assert (done["device"], done["devices"], done["nprocs"]) == (free[0], free, 1)
    finally:
        release.touch()


async def test_a_queued_job_with_more_ranks_than_gpus_fails_and_does_not_block_the_queue(
    jp_fetch, jp_serverapp
):
    """A job queued on a server with more GPUs than this one (restarted with fewer)."""
    manager = jp_serverapp.web_app.settings["cumulus_manager"]
    job_id = manager.store.new_id()
    queued = {
        "id": job_id,
        "name": "wide",
        "state": "queued",
        "gpu_memory": 0.5,
        "python": sys.executable,
        "python_version": VERSION,
        "nprocs": len(GPUS) + 1,
        "run": 0,
        "runs": [],
        "queued_at": time.time(),
    }
    payload = cloudpickle.dumps((jobfuncs.add, (1,), {}))
    manager.store.create(job_id, queued, payload)
    manager.load()  # what a start does: read the job root, then admit
    wide = await record(jp_fetch, job_id)
    assert wide["state"] == "failed"
    assert "asks for 4 ranks, one GPU each, but the server has only 3 GPU(s)" in wide["message"]
    later = await submit(jp_fetch, jobfuncs.add, (2,), gpu_memory=0.5)
    resp = await jp_fetch("cumulus", "api", "jobs", later["id"], "result", params={"wait": 60})
    assert cloudpickle.loads(resp.body) == {"ok": True, "value": 2}

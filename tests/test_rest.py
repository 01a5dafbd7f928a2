"""REST API against an in-process Jupyter server (pytest-jupyter), auth enforced."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from pathlib import Path

import cloudpickle
import jobfuncs
import psutil
import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from cumulus_jupyter.jobdir import WORKER_MODULE

# Job functions travel by value, as the SDK sends a notebook's own code.
cloudpickle.register_pickle_by_value(jobfuncs)

VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(autouse=True)
def started(jp_serverapp, jp_asyncio_loop):
    """pytest-jupyter does not run the server's post-start hook; a real server does."""
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())


def payload(func=sum, args=([1, 2],), kwargs=None) -> str:
    return base64.b64encode(cloudpickle.dumps((func, args, kwargs or {}))).decode()


def submit_body(**overrides):
    body = {"payload": payload(), "python_version": VERSION, "gpu_memory": 0.5}
    body.update(overrides)
    return json.dumps(body)


async def error_of(jp_fetch, *parts, **kw):
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("cumulus", "api", *parts, **kw)
    body = json.loads(info.value.response.body)
    return info.value.code, body


def disk_snapshot(root):
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        out.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return out


async def test_submit_list_get_result(jp_fetch, jp_serverapp):
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body(name="sum"))
    assert resp.code == 201
    job = json.loads(resp.body)
    assert resp.headers["Location"].endswith(f"/cumulus/api/jobs/{job['id']}")
    assert job["name"] == "sum" and job["gpu_memory"] == 0.5

    listed = json.loads((await jp_fetch("cumulus", "api", "jobs")).body)
    assert [j["id"] for j in listed["jobs"]] == [job["id"]]
    assert listed["gpus"][0]["device"] == "cpu"

    resp = await jp_fetch("cumulus", "api", "jobs", job["id"], "result", params={"wait": 60})
    assert resp.code == 200
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["X-Cumulus-State"] == "completed"
    assert cloudpickle.loads(resp.body) == {"ok": True, "value": 3}
    one = json.loads((await jp_fetch("cumulus", "api", "jobs", job["id"])).body)
    assert one["state"] == "completed"

    # The job directory is private to the user.
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    assert os.stat(os.path.join(root, job["id"])).st_mode & 0o777 == 0o700
    assert os.stat(os.path.join(root, job["id"], "func.pkl")).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ("{not json", 400, "not valid JSON"),
        ("[1, 2]", 400, "JSON object"),
        (json.dumps({"python_version": VERSION}), 400, "payload is required"),
        (submit_body(payload="!!!"), 400, "base64"),
        (submit_body(payload=base64.b64encode(b"").decode() or "AA=="), 400, "pickle"),
        (submit_body(payload=payload()[:-8]), 400, "pickle"),
        (submit_body(gpu_memory=0), 400, "gpu_memory"),
        (submit_body(gpu_memory=1.5), 400, "gpu_memory"),
        (submit_body(gpu_memory="x"), 400, "gpu_memory"),
        (submit_body(duration="soon"), 400, "duration"),
        (submit_body(duration=-1), 400, "duration"),
        (submit_body(python_version=None), 400, "python_version"),
        (submit_body(python_version="2.7", python="/nonexistent/python"), 400, "Python 2.7"),
        (submit_body(gpu_mem=0.5), 400, "unknown field"),
        (submit_body(nprocs=0), 400, "nprocs must be 1 or more"),
        (submit_body(nprocs=-1), 400, "nprocs must be 1 or more"),
        (submit_body(nprocs="2"), 400, "nprocs must be a whole number"),
        (submit_body(nprocs=2.5), 400, "nprocs must be a whole number"),
        (submit_body(nprocs=2.0), 400, "nprocs must be a whole number"),
        (submit_body(nprocs=True), 400, "nprocs must be a whole number"),
        (submit_body(nprocs=None), 400, "nprocs must be a whole number"),
        # No GPUs configured: the ranks share the CPU, at most one per core.
        (submit_body(nprocs=(os.cpu_count() or 1) + 1), 400, "no GPUs and"),
    ],
)
async def test_submit_rejects_bad_input(jp_fetch, jp_serverapp, body, status, match):
    code, err = await error_of(jp_fetch, "jobs", method="POST", body=body)
    assert code == status
    assert err["error"] == "bad_request"
    assert match in err["message"]
    listed = json.loads((await jp_fetch("cumulus", "api", "jobs")).body)
    assert listed["jobs"] == []  # nothing was created


async def test_oversize_payload_is_413(jp_fetch):
    big = base64.b64encode(cloudpickle.dumps((sum, (list(range(40000)),), {}))).decode()
    code, err = await error_of(jp_fetch, "jobs", method="POST", body=submit_body(payload=big))
    assert code == 413 and err["error"] == "payload_too_large"


async def test_unknown_job_is_404(jp_fetch):
    for parts, method in [
        (("jobs", "nosuchjob"), "GET"),
        (("jobs", "nosuchjob", "pause"), "POST"),
        (("jobs", "nosuchjob", "checkpoints"), "GET"),
        (("jobs", "..%2F..%2Fetc"), "GET"),
    ]:
        kw = {"body": "{}"} if method == "POST" else {}
        code, err = await error_of(jp_fetch, *parts, method=method, **kw)
        assert code == 404 and err["error"] == "not_found", parts


async def test_wrong_state_is_409(jp_fetch):
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body())
    job_id = json.loads(resp.body)["id"]
    await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    for action in ("pause", "resume", "cancel"):
        code, err = await error_of(jp_fetch, "jobs", job_id, action, method="POST", body="{}")
        assert code == 409 and err["error"] == "invalid_state", action
    code, err = await error_of(jp_fetch, "jobs", job_id, "checkpoints", "nope.pt", method="DELETE")
    assert code == 404


def tripwire(marker):
    """An argument whose unpickling appends the unpickling process's pid to ``marker``."""

    class Tripwire:
        def __reduce__(self):
            code = f"import os; open({str(marker)!r}, 'a').write(f'{{os.getpid()}}\\n')"
            return (exec, (code,))

    return Tripwire()


def pids_in(marker):
    return [int(line) for line in marker.read_text().split()] if marker.exists() else []


async def test_server_never_unpickles_the_payload(jp_fetch, tmp_path):
    """Only the job process unpickles a payload: the server stores it as bytes."""
    server_pid = os.getpid()  # pytest-jupyter hosts the server in this process

    # A job that runs: its own process unpickles the payload (the tripwire works) ...
    ran = tmp_path / "ran"
    body = submit_body(payload=payload(print, (tripwire(ran),)))
    job_id = json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)[
        "id"
    ]
    await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    record = json.loads((await jp_fetch("cumulus", "api", "jobs", job_id)).body)
    assert record["state"] == "completed", record
    assert pids_in(ran) and server_pid not in pids_in(ran), pids_in(ran)

    # ... and a job that never starts (queued behind a full device, then
    # cancelled) is never unpickled by anyone.
    release = tmp_path / "release"
    blocker = submit_body(payload=payload(jobfuncs.hold_until, (str(release),)), gpu_memory=1.0)
    blocker_id = json.loads(
        (await jp_fetch("cumulus", "api", "jobs", method="POST", body=blocker)).body
    )["id"]
    queued = tmp_path / "queued"
    body = submit_body(payload=payload(print, (tripwire(queued),)), gpu_memory=0.5)
    queued_id = json.loads(
        (await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body
    )["id"]
    record = json.loads((await jp_fetch("cumulus", "api", "jobs", queued_id)).body)
    assert record["state"] == "queued", record  # the blocker holds the whole device
    await jp_fetch("cumulus", "api", "jobs", queued_id, "cancel", method="POST", body="{}")
    release.touch()
    await jp_fetch("cumulus", "api", "jobs", blocker_id, "result", params={"wait": 60})
    record = json.loads((await jp_fetch("cumulus", "api", "jobs", queued_id)).body)
    assert record["state"] == "cancelled", record
    assert pids_in(queued) == []


ROUTES = [
    ("GET", "jobs"),
    ("POST", "jobs"),
    ("GET", "gpus"),
    ("GET", "events"),
    ("POST", "follow"),
    ("GET", "jobs/JOB"),
    ("DELETE", "jobs/JOB"),
    ("POST", "jobs/JOB/pause"),
    ("POST", "jobs/JOB/resume"),
    ("POST", "jobs/JOB/cancel"),
    ("GET", "jobs/JOB/result"),
    ("GET", "jobs/JOB/logs"),
    ("GET", "jobs/JOB/metrics"),
    ("GET", "jobs/JOB/checkpoints"),
    ("DELETE", "jobs/JOB/checkpoints/ckpt.pt"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("credentials", ["none", "wrong-token", "cookie-without-xsrf"])
async def test_every_route_refuses_without_credentials(
    jp_fetch, jp_serverapp, jp_base_url, method, path, credentials
):
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body())
    job_id = json.loads(resp.body)["id"]
    await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    before = disk_snapshot(root)

    url = f"http://127.0.0.1:{jp_serverapp.port}{jp_base_url}cumulus/api/" + path.replace(
        "JOB", job_id
    )
    headers = {}
    if credentials == "wrong-token":
        headers["Authorization"] = "token not-the-token"
    elif credentials == "cookie-without-xsrf":
        # A browser's session cookie, but no XSRF token: a cross-site request.
        login = await AsyncHTTPClient().fetch(
            f"http://127.0.0.1:{jp_serverapp.port}{jp_base_url}login?token="
            f"{jp_serverapp.identity_provider.token}",
            follow_redirects=False,
            raise_error=False,
        )
        cookies = [c.split(";")[0] for c in login.headers.get_list("Set-Cookie")]
        headers["Cookie"] = "; ".join(cookies)
    body = submit_body() if method == "POST" else None
    resp = await AsyncHTTPClient().fetch(
        url, method=method, body=body, headers=headers, raise_error=False
    )
    if credentials == "cookie-without-xsrf" and method == "GET":
        # The cookie is a real session (reads work), so the 403s below are XSRF's doing.
        assert resp.code == 200, (resp.code, resp.body)
        return
    assert resp.code == 403, (resp.code, resp.body)
    assert json.loads(resp.body)["error"] == "forbidden"
    assert disk_snapshot(root) == before


async def finished_job(jp_fetch):
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body())
    job_id = json.loads(resp.body)["id"]
    await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    return job_id


@pytest.mark.parametrize(
    "bad_id",
    ["..", "%2e%2e", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", "abc%00def", ".hidden", "a" * 65],
)
async def test_traversal_in_job_ids_is_404(jp_fetch, jp_serverapp, bad_id):
    job_id = await finished_job(jp_fetch)
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    before = disk_snapshot(os.path.dirname(root))
    for parts, method in [
        ((bad_id,), "GET"),
        ((bad_id, "checkpoints"), "GET"),
        ((bad_id, "logs"), "GET"),
        ((bad_id,), "DELETE"),
        ((bad_id, "resume"), "POST"),
    ]:
        kw = {"body": "{}"} if method == "POST" else {}
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("cumulus", "api", "jobs", *parts, method=method, **kw)
        assert info.value.code in (400, 404), (parts, method)
    # A prefix of a real id is not that job either.
    with pytest.raises(HTTPClientError) as info:
        await jp_fetch("cumulus", "api", "jobs", job_id[:6])
    assert info.value.code == 404
    assert disk_snapshot(os.path.dirname(root)) == before


async def test_traversal_in_checkpoint_names_reads_and_deletes_nothing_outside(
    jp_fetch, jp_serverapp, tmp_path
):
    job_id = await finished_job(jp_fetch)
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    ckpt_dir = os.path.join(root, job_id, "checkpoints")
    os.makedirs(ckpt_dir, mode=0o700)
    outside = tmp_path / "precious.pt"
    outside.write_bytes(b"do not touch")
    os.symlink(outside, os.path.join(ckpt_dir, "evil.pt"))
    manifest = {"version": 1, "seq": 1, "checkpoints": [{"name": "evil.pt", "step": 1}]}
    with open(os.path.join(ckpt_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    listed = json.loads((await jp_fetch("cumulus", "api", "jobs", job_id, "checkpoints")).body)
    assert listed["checkpoints"] == []  # a link is not a checkpoint
    for name in ["evil.pt", "..%2Fjob.json", "%2E%2E%2Ffunc.pkl", "%2Fetc%2Fpasswd", ".lock"]:
        with pytest.raises(HTTPClientError) as info:
            await jp_fetch("cumulus", "api", "jobs", job_id, "checkpoints", name, method="DELETE")
        assert info.value.code in (400, 404), name
    body = json.dumps({"checkpoint": "../../job.json"})
    with pytest.raises(HTTPClientError):
        await jp_fetch("cumulus", "api", "jobs", job_id, "resume", method="POST", body=body)
    assert outside.read_bytes() == b"do not touch"
    assert os.path.exists(os.path.join(root, job_id, "job.json"))
    assert os.path.exists(os.path.join(root, job_id, "func.pkl"))


async def test_a_payload_that_is_not_a_call_fails_the_job_clearly(jp_fetch):
    raw = base64.b64encode(cloudpickle.dumps({"not": "a call"})).decode()
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body(payload=raw))
    job_id = json.loads(resp.body)["id"]
    resp = await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    outcome = cloudpickle.loads(resp.body)
    assert outcome["ok"] is False
    assert "(callable, args, kwargs)" in outcome["message"]


async def test_cancel_right_after_submit_leaves_no_process_and_frees_the_share(
    jp_fetch, jp_serverapp
):

    body = submit_body(payload=payload(__import__("time").sleep, (60,)), gpu_memory=1.0)
    job = json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)
    # The process may still be starting (it starts off the event loop) or be running.
    resp = await jp_fetch("cumulus", "api", "jobs", job["id"], "cancel", method="POST", body="{}")
    assert json.loads(resp.body)["state"] in ("cancelled", "running")
    job_dir = os.path.join(jp_serverapp.config["CumulusApp"]["job_root"], job["id"])

    def workers():
        found = []
        for proc in psutil.process_iter(["cmdline", "cwd"]):
            cmd = proc.info["cmdline"] or []
            # Started cold, it names the directory; forked warm, it works in it.
            if (WORKER_MODULE in cmd and job_dir in cmd) or proc.info["cwd"] == job_dir:
                found.append(proc)
        return found

    async def settled():
        record = json.loads((await jp_fetch("cumulus", "api", "jobs", job["id"])).body)
        gpus = json.loads((await jp_fetch("cumulus", "api", "gpus")).body)["gpus"]
        return record["state"] == "cancelled" and gpus[0]["used"] == 0 and not workers()

    deadline = time.monotonic() + 30
    while not await settled():  # poll with a deadline
        assert time.monotonic() < deadline, "the cancelled job did not settle"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("modules", "match"),
    [
        ({"files": {"../escape.py": ""}}, "relative path"),
        ({"files": {"/abs.py": ""}}, "relative path"),
        ({"files": {"notes.txt": ""}}, "relative path"),
        ({"files": {"model.py": "not base64!"}}, "base64"),
        ({"files": ["model.py"]}, "must be objects"),
        ({"other": {}}, "modules must be an object"),
    ],
)
async def test_malformed_modules_are_refused_and_nothing_is_written(
    jp_fetch, jp_serverapp, modules, match
):
    root = jp_serverapp.config["CumulusApp"]["job_root"]
    before = disk_snapshot(root)
    code, err = await error_of(jp_fetch, "jobs", method="POST", body=submit_body(modules=modules))
    assert code == 400 and match in err["message"], err
    assert disk_snapshot(root) == before


async def test_shipped_modules_land_privately_in_the_job_directory(jp_fetch, jp_serverapp):
    files = {"model.py": b"X = 1\n", "nets/__init__.py": b""}
    modules = {
        "files": {k: base64.b64encode(v).decode() for k, v in files.items()},
        "origins": {"model": "/home/me/project/model.py"},
    }
    resp = await jp_fetch(
        "cumulus", "api", "jobs", method="POST", body=submit_body(modules=modules)
    )
    job_dir = os.path.join(
        jp_serverapp.config["CumulusApp"]["job_root"], json.loads(resp.body)["id"]
    )
    for rel, data in files.items():
        path = os.path.join(job_dir, "modules", rel)
        assert Path(path).read_bytes() == data
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.join(job_dir, "modules", "nets")).st_mode & 0o777 == 0o700
    listed = json.loads(Path(job_dir, "modules.json").read_text())
    assert listed == {"files": sorted(files), "origins": modules["origins"]}


async def test_the_server_hears_a_run_end_from_the_process_itself(jp_fetch, jp_serverapp):
    """With the monitor's poll stopped, a run's end still reaches the record at once."""
    manager = jp_serverapp.web_app.settings["cumulus_manager"]
    await manager.monitor.stop()  # only the backend's watch on the process is left
    resp = await jp_fetch("cumulus", "api", "jobs", method="POST", body=submit_body())
    job_id = json.loads(resp.body)["id"]
    resp = await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    assert resp.code == 200 and resp.headers["X-Cumulus-State"] == "completed"
    gpus = json.loads((await jp_fetch("cumulus", "api", "gpus")).body)["gpus"]
    assert gpus[0]["used"] == 0  # the share is free again


async def test_a_stuck_filesystem_holds_up_only_the_request_that_wrote(
    jp_fetch, jp_serverapp, monkeypatch
):
    """A record write that hangs (a rename waiting for the journal) leaves the loop free."""
    import threading

    from cumulus_jupyter.server import store

    body = submit_body(payload=payload(jobfuncs.pausable_sleep, (120,)))
    job_id = json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)[
        "id"
    ]

    async def state():
        return json.loads((await jp_fetch("cumulus", "api", "jobs", job_id)).body)["state"]

    deadline = time.monotonic() + 60
    while await state() != "running":
        assert time.monotonic() < deadline, "the job did not start"
        await asyncio.sleep(0.05)

    entered, release = threading.Event(), threading.Event()
    real_write = store.atomic_write_bytes

    def stuck_write(*args, **kwargs):
        entered.set()
        release.wait(15)  # without a writer thread this holds the event loop itself
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store, "atomic_write_bytes", stuck_write)
    pause = asyncio.ensure_future(
        jp_fetch("cumulus", "api", "jobs", job_id, "pause", method="POST", body="{}")
    )
    deadline = time.monotonic() + 10
    while not entered.is_set():
        assert time.monotonic() < deadline, "the pause wrote no record"
        await asyncio.sleep(0.01)
    # The record is being written: other requests are answered meanwhile, and
    # they see the new state (or the next: the job may have stopped already);
    # the pause itself answers once its write is done.
    assert await state() in ("pausing", "paused")
    assert not pause.done()
    release.set()
    assert json.loads((await pause).body)["state"] == "pausing"
    record = json.loads(
        Path(jp_serverapp.config["CumulusApp"]["job_root"], job_id, "job.json").read_text()
    )
    assert record["state"] in ("pausing", "paused")
    deadline = time.monotonic() + 60
    while await state() != "paused":
        assert time.monotonic() < deadline, "the job did not pause"
        await asyncio.sleep(0.05)


async def job_record(jp_fetch, job_id):
    return json.loads((await jp_fetch("cumulus", "api", "jobs", job_id)).body)


async def test_a_job_has_one_rank_on_the_cpu_device_by_default(jp_fetch):
    job_id = await finished_job(jp_fetch)
    record = await job_record(jp_fetch, job_id)
    assert record["state"] == "completed", record
    assert (record["nprocs"], record["devices"], record["device"]) == (1, ["cpu"], "cpu")
    run = record["runs"][0]
    assert (run["nprocs"], run["devices"], run["device"]) == (1, ["cpu"], "cpu")


async def test_a_job_asking_for_one_rank_per_core_is_accepted(jp_fetch, jp_serverapp):
    # Queued behind a job holding the whole device, so only the record is
    # checked here: running several ranks is the job process's part.
    release = Path(jp_serverapp.config["CumulusApp"]["job_root"]).parent / "release"
    blocker = submit_body(payload=payload(jobfuncs.hold_until, (str(release),)), gpu_memory=1.0)
    blocker_id = json.loads(
        (await jp_fetch("cumulus", "api", "jobs", method="POST", body=blocker)).body
    )["id"]
    most = os.cpu_count() or 1
    body = submit_body(nprocs=most, gpu_memory=0.5)
    job = json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)
    assert (job["state"], job["nprocs"], job["devices"]) == ("queued", most, [])
    await jp_fetch("cumulus", "api", "jobs", job["id"], "cancel", method="POST", body="{}")
    release.touch()
    await jp_fetch("cumulus", "api", "jobs", blocker_id, "result", params={"wait": 60})


async def test_resume_checks_nprocs_and_sets_it_for_the_next_run(jp_fetch, jp_serverapp):
    body = submit_body(payload=payload(jobfuncs.pausable_sleep, (120,)))
    job_id = json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)[
        "id"
    ]
    deadline = time.monotonic() + 60
    while (await job_record(jp_fetch, job_id))["state"] != "running":
        assert time.monotonic() < deadline, "the job did not start"
        await asyncio.sleep(0.05)
    await jp_fetch("cumulus", "api", "jobs", job_id, "pause", method="POST", body="{}")
    while (await job_record(jp_fetch, job_id))["state"] != "paused":
        assert time.monotonic() < deadline, "the job did not pause"
        await asyncio.sleep(0.05)

    too_many = (os.cpu_count() or 1) + 1
    for bad, match in [
        (0, "nprocs must be 1 or more"),
        (-1, "nprocs must be 1 or more"),
        ("2", "nprocs must be a whole number"),
        (2.5, "nprocs must be a whole number"),
        (True, "nprocs must be a whole number"),
        (too_many, f"nprocs={too_many} is more ranks than this server can run"),
    ]:
        body = json.dumps({"nprocs": bad})
        code, err = await error_of(jp_fetch, "jobs", job_id, "resume", method="POST", body=body)
        assert (code, err["error"]) == (400, "bad_request"), bad
        assert match in err["message"], err
    record = await job_record(jp_fetch, job_id)
    assert (record["state"], record["nprocs"]) == ("paused", 1)  # refused: nothing changed

    # A valid nprocs is the next run's; that run is held back behind a job
    # holding the whole device (running several ranks is the job process's part).
    release = Path(jp_serverapp.config["CumulusApp"]["job_root"]).parent / "release"
    blocker = submit_body(payload=payload(jobfuncs.hold_until, (str(release),)), gpu_memory=1.0)
    blocker_id = json.loads(
        (await jp_fetch("cumulus", "api", "jobs", method="POST", body=blocker)).body
    )["id"]
    nprocs = min(2, os.cpu_count() or 1)
    body = json.dumps({"nprocs": nprocs})
    resp = await jp_fetch("cumulus", "api", "jobs", job_id, "resume", method="POST", body=body)
    record = json.loads(resp.body)
    assert (record["state"], record["nprocs"]) == ("queued", nprocs)
    assert record["runs"][0]["nprocs"] == 1  # the first run's stays as it was
    await jp_fetch("cumulus", "api", "jobs", job_id, "cancel", method="POST", body="{}")
    release.touch()
    await jp_fetch("cumulus", "api", "jobs", blocker_id, "result", params={"wait": 60})


# -- POST follow: several jobs' news in one long-poll ------------------------------------


async def follow(jp_fetch, jobs, wait=0.0):
    body = json.dumps({"jobs": jobs, "wait": wait})
    resp = await jp_fetch("cumulus", "api", "follow", method="POST", body=body)
    return json.loads(resp.body)["jobs"]


async def submitted(jp_fetch, func, *args, **kwargs):
    body = submit_body(payload=payload(func, args, kwargs), gpu_memory=0.2)
    return json.loads((await jp_fetch("cumulus", "api", "jobs", method="POST", body=body)).body)[
        "id"
    ]


async def test_follow_answers_each_job_from_where_it_was_read(jp_fetch):
    train = {"epochs": 1, "steps": 6, "step_seconds": 0.0}
    a = await submitted(jp_fetch, jobfuncs.resumable_train, **train)
    b = await submitted(jp_fetch, jobfuncs.resumable_train, **train)
    for job_id in (a, b):
        await jp_fetch("cumulus", "api", "jobs", job_id, "result", params={"wait": 60})
    log = json.loads((await jp_fetch("cumulus", "api", "jobs", b, "logs")).body)
    metrics = json.loads((await jp_fetch("cumulus", "api", "jobs", b, "metrics")).body)
    assert log["data"].startswith("starting at epoch 0 step 0") and len(metrics["metrics"]) == 6

    # All of them stopped: the answer comes at once, whatever the wait.
    news = await follow(
        jp_fetch,
        {a: {"offset": 0, "metrics": 0}, b: {"offset": 9, "metrics": 4}, "nosuchjob": {}},
        wait=60,
    )
    assert news[a]["log"]["data"] == log["data"]  # the same output for the same job
    assert news[a]["record"]["state"] == "completed" and news[a]["log"]["running"] is False
    assert [m["step"] for m in news[a]["metrics"]["metrics"]] == list(range(6))
    assert news[b]["log"] == {
        "offset": 9,
        "next_offset": log["size"],
        "size": log["size"],
        "data": log["data"][9:],
        "running": False,
    }
    assert news[b]["metrics"] == {"metrics": metrics["metrics"][4:], "since": 4, "next": 6}
    record = json.loads((await jp_fetch("cumulus", "api", "jobs", b)).body)
    assert {**news[b]["record"], "elapsed": 0} == {**record, "elapsed": 0}
    # A caller that has a record's version gets it again only once it changed.
    again = await follow(jp_fetch, {b: {"offset": 9, "record": news[b]["version"]}})
    assert "record" not in again[b] and again[b]["version"] == news[b]["version"]
    assert again[b]["log"] == news[b]["log"]
    # A job the server does not know spoils nothing for the others.
    assert news["nosuchjob"]["error"] == "not_found"


async def test_follow_waits_for_output_or_a_change_of_state(jp_fetch, tmp_path):
    release, done = tmp_path / "release", tmp_path / "done"
    quiet = await submitted(jp_fetch, jobfuncs.hold_until, str(done))
    talker = await submitted(jp_fetch, jobfuncs.print_when_released, str(release), "hi", str(done))
    try:
        for job_id in (quiet, talker):
            while True:  # polled: the runs start in their own time
                job = json.loads((await jp_fetch("cumulus", "api", "jobs", job_id)).body)
                if job["state"] == "running":
                    break
                await asyncio.sleep(0.05)
        positions = {quiet: {}, talker: {}}
        # Nothing printed: the wait runs out, and says the jobs still run.
        news = await follow(jp_fetch, positions, wait=0.3)
        assert news[talker]["log"]["data"] == "" and news[talker]["log"]["running"] is True
        # A line from one of them answers a wait longer than the client's
        # timeout (20 s), so only an early answer passes.
        held = asyncio.ensure_future(follow(jp_fetch, positions, wait=50))
        release.touch()
        news = await held
        assert news[talker]["log"]["data"] == "hi\n"
        assert news[quiet]["log"]["data"] == ""
        # So does a change of state, and the changed record comes with it.
        positions[talker] = {"offset": news[talker]["log"]["next_offset"]}
        for job_id in (quiet, talker):
            positions[job_id]["record"] = news[job_id]["version"]
        held = asyncio.ensure_future(follow(jp_fetch, positions, wait=50))
        await jp_fetch("cumulus", "api", "jobs", quiet, "cancel", method="POST", body="{}")
        news = await held
        assert news[quiet]["record"]["state"] in ("cancelling", "cancelled")
        assert news[quiet]["version"] != positions[quiet]["record"]
        assert "record" not in news[talker]  # unchanged: the caller has it
    finally:
        done.touch()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("[]", "the body must be a JSON object"),
        ("{}", "jobs must be an object of job ids to positions"),
        ('{"jobs": {}}', "jobs must be an object of job ids to positions"),
        ('{"jobs": ["a"]}', "jobs must be an object of job ids to positions"),
        ('{"jobs": {"a": {}}, "since": 1}', "follow takes 'jobs' and 'wait'"),
        ('{"jobs": {"a": 3}}', "job 'a': its position must be an object"),
        ('{"jobs": {"a": {"line": 3}}}', "job 'a': give 'offset', 'metrics' and 'record'"),
        ('{"jobs": {"a": {"record": 3}}}', "job 'a': record must be the version of its record"),
        ('{"jobs": {"a": {"offset": -1}}}', "job 'a': offset must be a whole number"),
        ('{"jobs": {"a": {"metrics": 1.5}}}', "job 'a': metrics must be a whole number"),
        ('{"jobs": {"a": {"offset": true}}}', "job 'a': offset must be a whole number"),
        ('{"jobs": {"a": {}}, "wait": 61}', "wait must be a number of seconds from 0 to 60"),
        ('{"jobs": {"a": {}}, "wait": "1"}', "wait must be a number of seconds from 0 to 60"),
        ('{"jobs": {"a": {}}, "wait": NaN}', "wait must be a number of seconds from 0 to 60"),
        (
            json.dumps({"jobs": {f"j{i}": {} for i in range(257)}}),
            "follow at most 256 jobs per request (257 given)",
        ),
    ],
)
async def test_follow_refuses_bad_input(jp_fetch, body, match):
    code, err = await error_of(jp_fetch, "follow", method="POST", body=body)
    assert code == 400 and err["error"] == "bad_request"
    assert match in err["message"]

"""Faults: a crashed server, dead jobs, strangers' processes, damaged files, leaked tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import jobfuncs
import psutil
import pytest
from conftest import serving
from servers import ServerProcess, wait_until

from cumulus_jupyter.errors import InvalidStateError

LONG = {"epochs": 1, "steps": 3000, "step_seconds": 0.02, "every_steps": 5}


def alive(pid, create_time=None):
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.05
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def srv(tmp_path):
    with serving(ServerProcess(tmp_path, pause_timeout=5, kill_grace=2)) as server:
        yield server


def test_server_crash_running_paused_finished_and_dead_jobs(srv):
    client = srv.client()
    a = client.run_async(jobfuncs.resumable_train, kwargs=LONG, gpu_memory=0.3, name="a")
    b = client.run_async(jobfuncs.resumable_train, kwargs=LONG, gpu_memory=0.3, name="b")
    c = client.run_async(jobfuncs.resumable_train, kwargs=LONG, gpu_memory=0.1, name="c")
    d = client.run_async(jobfuncs.sleep_then, args=[3, "done while away"], gpu_memory=0.1)
    e = client.run_async(jobfuncs.resumable_train, kwargs=LONG, gpu_memory=0.2, name="e")
    for job in (a, b, c, e):
        wait_until(lambda j=job: len(j.get_checkpoints()) >= 1, timeout=90, what=f"{job} saving")
    c.pause()
    c.wait(timeout=60)
    assert c.status() == "paused"
    before = {j.id: j.info()["process"] for j in (a, b, e)}

    srv.stop(signal.SIGKILL)  # the server crashes
    os.kill(before[e.id]["pid"], signal.SIGKILL)  # and a job dies while it is down
    wait_until(
        lambda: '"completed"' in (srv.job_root / d.id / "state.json").read_text(),
        what="the short job to finish on its own",
    )
    srv.start()
    client = srv.client()
    a, b, c, d, e = (client.get_job(j.id) for j in (a, b, c, d, e))

    # Running jobs were re-adopted: same process, same start time.
    for job in (a, b):
        assert job.status() == "running"
        assert job.info()["process"] == before[job.id]
        assert alive(before[job.id]["pid"], before[job.id]["create_time"])
    # The job that finished while the server was down shows its result and log.
    assert d.status() == "completed"
    assert d.result(timeout=10) == "done while away"
    # The job whose process died is lost, not running forever.
    assert e.status() == "lost"
    assert "without recording an outcome" in e.info()["message"]

    # Re-adopted jobs can still be paused and cancelled.
    a.pause()
    assert a.result(timeout=60)["status"] == "paused"
    b.cancel()
    wait_until(lambda: b.status() == "cancelled", what="the cancel of an adopted job")
    wait_until(lambda: not alive(before[b.id]["pid"]), what="the adopted process to go")
    # The paused job and the lost one resume from their checkpoints.
    for job in (c, e):
        saved = job.get_checkpoints()[-1]["step"]
        job.resume()
        wait_until(
            lambda j=job, s=saved: f"starting at epoch 0 step {s + 1}" in j.logs(),
            timeout=90,
            what=f"{job} to resume after step {saved}",
        )
        job.cancel()
    a.cancel()
    for job in client.jobs():
        wait_until(lambda j=job: j.status() not in ("running", "pausing", "queued"), timeout=60)


def test_a_record_pointing_at_an_unrelated_process_is_neither_adopted_nor_killed(srv):
    client = srv.client()
    job = client.run_async(jobfuncs.add, args=[1], gpu_memory=0.1)
    job.wait(timeout=60)
    srv.stop()
    stranger = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        record_path = srv.job_root / job.id / "job.json"
        record = json.loads(record_path.read_text())
        # The record claims the stranger's pid, as a reused pid would.
        record.update(state="running", process={"pid": stranger.pid, "create_time": 1.0})
        record_path.write_text(json.dumps(record))
        (srv.job_root / job.id / "state.json").write_text(json.dumps({"run": 99}))
        srv.start()
        job = srv.client().get_job(job.id)
        assert job.status() == "lost"
        assert stranger.poll() is None  # not killed
        with pytest.raises(InvalidStateError):
            job.pause()
        job.cancel()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_damaged_job_files_are_reported_and_the_others_served(srv):
    client = srv.client()
    good = client.run_async(jobfuncs.add, args=[41], kwargs={"b": 1}, gpu_memory=0.1)
    assert good.result(timeout=60) == 42
    garbled = client.run_async(jobfuncs.add, args=[1], gpu_memory=0.1)
    garbled.wait(timeout=60)
    srv.stop()
    root = srv.job_root
    (root / garbled.id / "state.json").write_text("{not json")
    (root / garbled.id / "control.json").write_bytes(b"\x00\xff garbage")
    for name, content in [
        ("badjson", "{oops"),
        ("truncated", json.dumps({"id": "truncated", "name": "x", "state": "running"})[:30]),
        ("wrongtypes", json.dumps({"id": "wrongtypes", "name": 3, "state": "flying"})),
        ("missing", None),
    ]:
        (root / name).mkdir(mode=0o700)
        if content is not None:
            (root / name / "job.json").write_text(content)
    srv.start()
    client = srv.client()
    jobs = {j.id: j.info() for j in client.jobs()}
    for name in ("badjson", "truncated", "wrongtypes", "missing"):
        assert jobs[name]["damaged"] is True
        assert jobs[name]["state"] == "lost"
        assert "damaged" in jobs[name]["message"] and "delete the job" in jobs[name]["message"]
        with pytest.raises(InvalidStateError, match="damaged"):
            client.resume_job(name)
    assert jobs[good.id]["state"] == "completed"
    assert client.get_job(good.id).result() == 42
    # A finished job whose state/control files are garbage still shows its result.
    assert client.get_job(garbled.id).result() == 1
    # New work is served, and a damaged job can be deleted.
    assert client.run(jobfuncs.add, args=[2], gpu_memory=0.1) == 2
    client.forget_job("badjson")
    assert not (root / "badjson").exists()


def test_the_token_never_appears_in_logs_errors_or_job_records(srv):
    client = srv.client()
    assert client.run(jobfuncs.environment, args=["CUMULUS_TOKEN", "JUPYTER_TOKEN"]) == {
        "CUMULUS_TOKEN": None,
        "JUPYTER_TOKEN": None,
    }
    failing = client.run_async(jobfuncs.failing, args=[7], gpu_memory=0.1)
    failing.wait(timeout=60)
    bodies = []
    for path in ("jobs/nosuch", "jobs/nosuch/pause"):
        req = __import__("urllib.request").request.Request(
            srv.url + "cumulus/api/" + path + f"?token={srv.token}",
            method="POST" if path.endswith("pause") else "GET",
            data=b"{}" if path.endswith("pause") else None,
        )
        try:
            __import__("urllib.request").request.urlopen(req)
        except Exception as e:  # HTTPError carries the body
            bodies.append(e.read().decode())
    assert len(bodies) == 2 and all("not_found" in b for b in bodies)
    srv.stop()
    assert all(srv.token not in b for b in bodies)
    assert srv.token not in srv.log_path.read_text()
    files = [p for p in srv.job_root.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert srv.token.encode() not in path.read_bytes(), path
    srv.start()  # the fixture stops it


def test_job_files_are_private(srv):
    client = srv.client()
    job = client.run_async(jobfuncs.resumable_train, kwargs={"epochs": 1, "steps": 6})
    job.result(timeout=60)
    job_dir = srv.job_root / job.id
    assert job_dir.stat().st_mode & 0o777 == 0o700
    for path in job_dir.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem for the job root (tmpfs; needs the right to mount).

    Skipped where mounting is not allowed, except under CI=true: CI runs as
    root, so there a failed mount fails the test instead of hiding it.
    """
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
        )
        error = (done.stderr.strip() or f"exit status {done.returncode}") if done.returncode else ""
    except OSError as e:  # no mount command at all
        error = str(e)
    if error:
        reason = f"cannot mount a small filesystem here: {error}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the full-disk test must run in CI, as root)")
        pytest.skip(reason)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_reported_and_the_server_keeps_serving(tmp_path, small_disk):
    (tmp_path / "srv").mkdir()
    server = ServerProcess(tmp_path / "srv", job_root=small_disk / "jobs").start()
    try:
        client = server.client()
        hog = client.run_async(jobfuncs.fill_the_disk, gpu_memory=0.1)
        wait_until(lambda: hog.status() in ("lost", "failed"), timeout=60, what="the disk to fill")
        message = hog.info()["message"]
        assert "disk holding the job root is full" in message
        assert "could not save the job record: No space left on device" in message
        assert client.jobs()  # still serving
        client.forget_job(hog.id)  # frees the space
        assert client.run(jobfuncs.add, args=[5], gpu_memory=0.1) == 5
    finally:
        server.stop()

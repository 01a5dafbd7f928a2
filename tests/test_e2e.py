"""End to end: a real `jupyter server` subprocess, real job processes, real torch on CPU."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import jobfuncs
import psutil
import pytest
from servers import ServerProcess, wait_until

from cumulus_jupyter import CumulusClient
from cumulus_jupyter.errors import (
    BadRequestError,
    CumulusError,
    InvalidStateError,
    JobFailedError,
    JobNotFoundError,
    JobStoppedError,
)


def wait_state(job, *states, timeout=60):
    """Wait for a state the job cannot leave behind the test's back.

    A transient state (``running`` of a job that ends by itself) may be over
    before a poll sees it on a loaded machine: wait for those only with jobs
    that hold until the test releases or pauses them.
    """
    return wait_until(
        lambda: job.status() in states,
        timeout=timeout,
        what=lambda: f"{job.id} to be {' or '.join(states)}; it is {job.status()}",
    )


def test_seed_basic_checkpointed_training(client):
    result = client.run(func=jobfuncs.train_with_checkpoints, gpu_memory=0.8, duration=300)
    assert result == {"status": "completed"}


def test_pause_resume_continues_from_saved_step(client):
    job = client.run_async(
        func=jobfuncs.resumable_train,
        kwargs={"epochs": 2, "steps": 200, "step_seconds": 0.02},
        gpu_memory=0.8,
        duration=600,
    )
    # Pause only once training is under way (metrics are reported per step).
    wait_until(lambda: len(job.metrics()) >= 5, what="training steps")
    job.pause()
    paused = job.result(timeout=60)
    assert job.status() == "paused"
    assert paused["status"] == "paused"
    checkpoints = job.get_checkpoints()
    print(f"Available checkpoints: {len(checkpoints)}")
    assert len(checkpoints) >= 1
    latest = checkpoints[-1]
    assert (latest["epoch"], latest["step"]) == (paused["epoch"], paused["step"])

    with pytest.raises(InvalidStateError):
        job.pause()  # a paused job cannot pause again

    job.resume()
    result = job.result(timeout=120)
    assert result["status"] == "completed"
    # The resumed run started right after the saved step, not from 0.
    assert (result["start_epoch"], result["start_step"]) == (paused["epoch"], paused["step"] + 1)
    assert result["loaded"] == latest["name"]
    info = job.info()
    assert [r["state"] for r in info["runs"]] == ["paused", "completed"]
    assert info["runs"][0]["stop"] == "cooperative"
    log = job.logs()
    assert "starting at epoch 0 step 0" in log  # the log is kept across runs
    assert f"starting at epoch {paused['epoch']} step {paused['step'] + 1}" in log


def test_resume_from_named_earlier_checkpoint(client):
    job = client.run_async(
        jobfuncs.resumable_train,
        kwargs={"epochs": 1, "steps": 400, "step_seconds": 0.01, "every_steps": 10},
    )
    wait_until(lambda: len(job.get_checkpoints()) >= 3, what="three periodic checkpoints")
    job.pause()
    job.wait(timeout=60)
    checkpoints = job.get_checkpoints()
    earlier = checkpoints[0]
    assert earlier["name"] != checkpoints[-1]["name"]
    with pytest.raises(JobNotFoundError, match=r"no-such\.pt"):
        job.resume(checkpoint="no-such.pt")
    assert job.status() == "paused"  # a refused resume changes nothing
    job.resume(checkpoint=earlier["name"])
    result = job.result(timeout=120)
    assert result["loaded"] == earlier["name"]
    assert result["start_step"] == earlier["step"] + 1


def test_cancel_kills_the_whole_process_tree(client, tmp_path):
    pidfile = str(tmp_path / "pids")
    job = client.run_async(jobfuncs.spawn_tree, args=[pidfile], gpu_memory=0.3)
    wait_until(lambda: os.path.exists(pidfile), timeout=60, what="the job's process tree")
    pids = [int(p) for p in Path(pidfile).read_text().split()]
    assert len(pids) >= 5  # main, 2 DataLoader workers, sh, its sleep children
    job.cancel()
    wait_state(job, "cancelled")

    def all_gone():
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return not alive

    wait_until(all_gone, timeout=30, what="every process of the job to exit")
    with pytest.raises(JobStoppedError) as info:
        job.result(timeout=10)
    assert info.value.state == "cancelled"
    assert job.wait(timeout=10) == "cancelled"  # waiting on a stopped job returns at once


def test_duration_limit_times_out_with_checkpoint_and_resumes(client, tmp_path):
    # Trains until released, so it is still running whenever the test looks.
    job = client.run_async(
        jobfuncs.train_until_released, args=[str(tmp_path / "never")], duration=4
    )
    wait_state(job, "timed_out", timeout=90)
    assert len(job.get_checkpoints()) >= 1
    info = job.info()
    assert "duration" in info["message"]
    job.resume(duration="1h")
    wait_state(job, "running")
    job.cancel()
    wait_state(job, "cancelled")


def test_job_ignoring_pause_and_sigterm_is_killed_and_says_so(client, tmp_path):
    pidfile = str(tmp_path / "pid")
    job = client.run_async(jobfuncs.ignore_everything, args=[pidfile], gpu_memory=0.2)
    wait_until(lambda: os.path.exists(pidfile), what="the job to start")
    job.pause()
    wait_state(job, "paused", timeout=60)
    info = job.info()
    assert info["escalation"] == "sigkill"
    assert info["runs"][-1]["stop"] == "sigkill"
    assert "sigkill" in info["message"]
    pid = int(Path(pidfile).read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sigterm_escalation_saves_through_save_on_interrupt(client, tmp_path):
    ready = str(tmp_path / "ready")
    job = client.run_async(jobfuncs.guarded_train, args=[ready], gpu_memory=0.2)
    wait_until(lambda: os.path.exists(ready), what="the job to start")
    job.pause()
    result = job.result(timeout=60)
    assert job.status() == "paused"
    assert job.info()["escalation"] == "sigterm"
    assert result["status"] == "interrupted" and result["signal"] == "SIGTERM"
    assert [c["name"] for c in job.get_checkpoints()] == [os.path.basename(result["checkpoint"])]


@pytest.mark.parametrize("action", ["cancel", "pause"])
def test_a_run_that_fails_because_it_was_stopped_ends_as_asked(client, tmp_path, action):
    ready = str(tmp_path / "ready")
    job = client.run_async(jobfuncs.broken_by_sigterm, args=[ready], gpu_memory=0.2)
    wait_until(lambda: os.path.exists(ready), what="the job to start")
    getattr(job, action)()
    expected = "cancelled" if action == "cancel" else "paused"
    wait_state(job, expected, timeout=60)
    info = job.info()
    assert info["escalation"] == "sigterm"
    assert "while stopping on sigterm, it raised builtins.RecursionError" in info["message"]
    if action == "pause":
        job.cancel()  # a paused job can still be resumed or cancelled
        wait_state(job, "cancelled")


def test_a_run_that_fails_on_its_own_still_fails(client):
    job = client.run_async(jobfuncs.failing, args=[7], gpu_memory=0.1)
    wait_state(job, "failed", timeout=60)
    assert job.info()["escalation"] is None


def test_shares_over_one_device_queue(client, tmp_path):
    release = tmp_path / "release"
    first = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.6)
    second = client.run_async(jobfuncs.sleep_then, args=[0, "second"], gpu_memory=0.6)
    wait_state(first, "running")
    assert second.status() == "queued"
    release.touch()
    assert first.result(timeout=60) == "released"
    assert second.result(timeout=60) == "second"
    assert second.info()["started"] >= first.info()["ended"]


def test_remote_exception_raises_with_traceback(client):
    with pytest.raises(JobFailedError) as info:
        client.run(jobfuncs.failing, args=[42], gpu_memory=0.1)
    err = info.value
    assert err.exc_type == "builtins.ValueError"
    assert "bad value 42" in str(err)
    assert "in inner" in err.remote_traceback
    assert isinstance(err.exception, ValueError)


def test_unpicklable_argument_fails_before_sending(client):
    before = len(client.jobs())
    lock = threading.Lock()
    with pytest.raises(BadRequestError, match=r"argument 0 \(lock\)"):
        client.run_async(jobfuncs.add, args=[lock])
    with pytest.raises(BadRequestError, match="keyword argument 'b'"):
        client.run_async(jobfuncs.add, args=[1], kwargs={"b": lock})
    assert len(client.jobs()) == before


def test_bad_parameters_raise_distinct_errors(client):
    with pytest.raises(BadRequestError, match="gpu_memory"):
        client.run_async(jobfuncs.add, args=[1], gpu_memory=1.5)
    with pytest.raises(BadRequestError, match="duration"):
        client.run_async(jobfuncs.add, args=[1], duration="soon")
    with pytest.raises(JobNotFoundError):
        client.get_job("nosuchjob")


def test_the_sdk_sends_nprocs_and_raises_the_servers_refusal(client, tmp_path):
    before = len(client.jobs())
    too_many = (os.cpu_count() or 1) + 1  # the server has no GPUs: one rank per core
    for bad, match in [
        (0, "nprocs must be 1 or more"),
        (True, "nprocs must be a whole number"),  # == 1, but not the number 1
        (2.5, "nprocs must be a whole number"),
        (too_many, f"nprocs={too_many} is more ranks than this server can run"),
    ]:
        with pytest.raises(BadRequestError, match=match):
            client.run_async(jobfuncs.add, args=[1], nprocs=bad)
    assert len(client.jobs()) == before

    # Valid: the record says so. The job waits behind one holding the whole
    # device, so no ranks start (running them is the job process's part).
    release = tmp_path / "release"
    holder = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=1.0)
    try:
        nprocs = min(2, os.cpu_count() or 1)
        job = client.run_async(jobfuncs.add, args=[1], gpu_memory=0.5, nprocs=nprocs)
        assert (job.record["state"], job.record["nprocs"]) == ("queued", nprocs)
        with pytest.raises(BadRequestError, match="nprocs must be 1 or more"):
            job.resume(nprocs=0)  # refused before the job's state is even looked at
        job.cancel()
    finally:
        release.touch()
    assert holder.result(timeout=60) == "released"


def test_client_needs_a_url(monkeypatch):
    monkeypatch.delenv("CUMULUS_SERVER_URL", raising=False)
    with pytest.raises(CumulusError, match="no cumulus server"):
        CumulusClient()


def test_wrong_token_is_refused(server):
    with pytest.raises(CumulusError) as info:
        CumulusClient(server.url, token="wrong").jobs()
    assert info.value.status == 403


def test_jobs_survive_a_server_restart(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        client = srv.client()
        job = client.run_async(
            jobfuncs.resumable_train,
            kwargs={"epochs": 1, "steps": 300, "step_seconds": 0.02},
            gpu_memory=0.5,
        )
        release = tmp_path / "release"
        short = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
        wait_until(lambda: len(job.metrics()) >= 3, what="training steps")
        wait_state(short, "running")  # it holds until released: nothing to miss
        pid = job.info()["process"]["pid"]
        srv.stop(signal.SIGKILL)  # a crash: nothing is shut down cleanly
        assert psutil.pid_exists(pid)  # the job did not die with the server
        # The short job finishes while no server is there and records it itself.
        release.touch()
        state_file = srv.job_root / short.id / "state.json"
        wait_until(lambda: '"completed"' in state_file.read_text(), what="the job to finish")
        srv.start()
        client = srv.client()
        short = client.get_job(short.id)
        assert short.status() == "completed"
        assert short.result(timeout=10) == "released"
        job = client.get_job(job.id)
        assert job.status() == "running"
        assert job.info()["process"]["pid"] == pid
        job.pause()  # a re-adopted job can still be controlled
        assert job.result(timeout=60)["status"] == "paused"
        job.resume()
        assert job.result(timeout=120)["status"] == "completed"
    finally:
        srv.stop()


def test_headless_jupyter_cumulus_runs_the_seed(tmp_path):
    srv = ServerProcess(tmp_path, command="cumulus").start()
    try:
        assert srv.client().run(jobfuncs.add, args=[40], kwargs={"b": 2}) == 42
    finally:
        srv.stop()


def test_kernel_started_by_the_server_needs_no_arguments(server):
    """A kernel launched by the server finds it: CumulusClient() with no arguments."""
    from jupyter_client import BlockingKernelClient

    client = server.client()
    _, _, raw = client._request("POST", "../../api/kernels", {"name": "python3"})
    import json

    kernel_id = json.loads(raw)["id"]
    conn = server.base / "runtime" / f"kernel-{kernel_id}.json"
    wait_until(conn.exists, what="the kernel's connection file")
    kc = BlockingKernelClient(connection_file=str(conn))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        code = (
            "from cumulus_jupyter import CumulusClient\n"
            "print('answer', CumulusClient().run(lambda: 6 * 7, gpu_memory=0.1))"
        )
        outputs = []
        reply = kc.execute_interactive(
            code, timeout=120, output_hook=lambda m: outputs.append(m["content"].get("text", ""))
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "answer 42" in "".join(outputs)
    finally:
        kc.stop_channels()
        client._request("DELETE", f"../../api/kernels/{kernel_id}")


def test_forget_removes_a_finished_job(client):
    job = client.run_async(jobfuncs.add, args=[1], gpu_memory=0.1)
    assert job.result(timeout=60) == 1
    client.forget_job(job.id)
    with pytest.raises(JobNotFoundError):
        job.status()


def test_elapsed_time_grows_while_a_job_runs(client, tmp_path):
    """Elapsed time is measured on the server, grows while a job runs and stops at its end."""
    release = tmp_path / "release"
    job = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
    wait_state(job, "running")
    first = job.info()["elapsed"]
    grown = wait_until(lambda: max(job.info()["elapsed"], 0) > first and job.info()["elapsed"])
    release.touch()
    job.wait(timeout=60)
    final = job.info()["elapsed"]
    assert final >= grown
    assert final == job.info()["elapsed"]  # frozen once the job ended


def test_seed_resume_from_a_checkpoint_path_in_a_new_job(client, tmp_path):
    # The seed's training is short and ends by itself: on a loaded machine it
    # can finish before a pause lands (409). Then it runs again, up to 3 times.
    for attempt in range(3):
        ready = tmp_path / f"ready-{attempt}"
        first = client.run_async(
            jobfuncs.train_with_checkpoints_after, args=[str(ready)], gpu_memory=0.5
        )
        wait_until(ready.exists, timeout=60, what="the job to import torch")
        try:
            first.pause()
            break
        except InvalidStateError:
            assert first.status() == "completed"
    paused = first.result(timeout=60)
    assert paused["status"] == "paused"
    checkpoint_path = paused["checkpoint"]
    latest = first.get_checkpoints()[-1]
    assert latest["path"] == checkpoint_path

    result = client.run(
        func=jobfuncs.resume_training, args=[checkpoint_path], gpu_memory=0.8, duration=300
    )
    assert (result["start_epoch"], result["start_step"]) == (latest["epoch"], latest["step"])
    assert result["source"] == checkpoint_path


def test_a_job_whose_process_dies_is_lost_and_resumable(client):
    job = client.run_async(
        jobfuncs.resumable_train,
        kwargs={"epochs": 1, "steps": 300, "step_seconds": 0.02, "every_steps": 5},
    )
    wait_until(lambda: len(job.get_checkpoints()) >= 2, what="periodic checkpoints")
    os.kill(job.info()["process"]["pid"], 9)  # e.g. the OOM killer
    wait_state(job, "lost")
    assert "without recording an outcome" in job.info()["message"]
    saved = job.get_checkpoints()[-1]
    job.resume()
    result = job.result(timeout=120)
    assert result["status"] == "completed"
    assert result["start_step"] == saved["step"] + 1


def test_logs_and_metrics_follow_the_job(client, tmp_path):
    release = tmp_path / "release"
    job = client.run_async(
        jobfuncs.resumable_train, kwargs={"epochs": 1, "steps": 30, "step_seconds": 0.01}
    )
    first = client.get_logs(job.id, 0, wait=30)
    assert first["data"].startswith("starting at epoch 0 step 0")
    later = client.get_logs(job.id, first["next_offset"], wait=0)
    assert later["offset"] == first["next_offset"]
    assert job.result(timeout=60)["status"] == "completed"
    metrics = job.metrics()
    assert [m["step"] for m in metrics] == list(range(30))
    assert all(m["total"] == 30 and isinstance(m["loss"], float) for m in metrics)

    # A log wait on a job that prints nothing returns when the wait is up.
    quiet = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
    wait_state(quiet, "running")
    part = client.get_logs(quiet.id, 0, wait=0.5)
    assert part["data"] == "" and part["running"] is True
    release.touch()
    assert quiet.result(timeout=60) == "released"


def test_checkpoint_delete_keeps_what_a_paused_job_needs(client):
    job = client.run_async(
        jobfuncs.resumable_train,
        kwargs={"epochs": 1, "steps": 400, "step_seconds": 0.01, "every_steps": 10},
    )
    wait_until(lambda: len(job.get_checkpoints()) >= 2, what="two checkpoints")
    job.pause()
    job.wait(timeout=60)
    names = [c["name"] for c in job.get_checkpoints()]
    with pytest.raises(InvalidStateError, match="resumes from"):
        job.client.delete_checkpoint(job.id, names[-1])
    job.client.delete_checkpoint(job.id, names[0])
    assert [c["name"] for c in job.get_checkpoints()] == names[1:]
    with pytest.raises(JobNotFoundError):
        job.client.delete_checkpoint(job.id, names[0])
    job.resume()
    with pytest.raises(InvalidStateError, match="cancel it"):
        job.client.forget_job(job.id)  # a job with a process is never deleted
    job.cancel()
    wait_state(job, "cancelled")


def test_python_version_mismatch_is_a_clear_failure(server):
    """The submitter's interpreter is used when it is on this host; a version mismatch
    between the pickle and that interpreter fails the job with a message, not a crash."""
    import base64
    import json
    import sys
    import urllib.request

    import cloudpickle

    body = {
        "payload": base64.b64encode(cloudpickle.dumps((sum, ([1],), {}))).decode(),
        "python": sys.executable,
        "python_version": "3.99",
        "gpu_memory": 0.1,
    }
    req = urllib.request.Request(
        server.url + "cumulus/api/jobs",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"token {server.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req) as resp:
        job_id = json.loads(resp.read())["id"]
    job = server.client().get_job(job_id)
    with pytest.raises(JobFailedError, match=r"pickled by Python 3\.99"):
        job.result(timeout=60)


def test_gpu_shares_pin_jobs_to_devices(tmp_path):
    """With two (configured) GPUs, 0.6 + 0.6 run side by side on different devices,
    a third 0.6 waits; each job sees only its device and its share. On a host
    without CUDA the memory cap degrades to nothing and the job still runs."""
    srv = ServerProcess(tmp_path, gpus='["0", "1"]').start()
    try:
        client = srv.client()
        release = tmp_path / "release"
        holders = [
            client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.6)
            for _ in range(2)
        ]
        for job in holders:
            wait_state(job, "running")
        third = client.run_async(
            jobfuncs.environment,
            args=[
                "CUDA_VISIBLE_DEVICES",
                "CUDA_DEVICE_ORDER",
                "CUMULUS_GPU_FRACTION",
                "CUMULUS_JOB_ID",
            ],
            gpu_memory=0.6,
        )
        assert sorted(job.info()["device"] for job in holders) == ["0", "1"]
        usage = {g["device"]: g for g in client.gpus()}
        assert usage["0"]["used"] == 0.6 and usage["1"]["used"] == 0.6
        assert third.status() == "queued"
        release.touch()
        env = third.result(timeout=60)
        assert env["CUDA_VISIBLE_DEVICES"] in ("0", "1")
        assert env["CUDA_VISIBLE_DEVICES"] == third.info()["device"]
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the numbering nvidia-smi shows
        assert float(env["CUMULUS_GPU_FRACTION"]) == 0.6
        assert env["CUMULUS_JOB_ID"] == third.id
        # It started after a holder ended; the other may still be stopping (ended None).
        ended = [e for e in (j.info()["ended"] for j in holders) if e is not None]
        assert ended and third.info()["started"] >= min(ended)
    finally:
        srv.stop()


def test_one_pause_or_resume_at_a_time(client):
    """Concurrent pauses (then resumes) of one job: exactly one is accepted, the rest 409."""
    from concurrent.futures import ThreadPoolExecutor

    job = client.run_async(
        jobfuncs.resumable_train, kwargs={"epochs": 1, "steps": 1000, "step_seconds": 0.01}
    )
    wait_until(lambda: len(job.metrics()) >= 3, what="training steps")

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: _try(lambda: client.pause_job(job.id)), range(8)))
    assert sorted(outcomes) == ["409"] * 7 + ["ok"]
    assert job.result(timeout=60)["status"] == "paused"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: _try(lambda: client.resume_job(job.id)), range(8)))
    assert sorted(outcomes) == ["409"] * 7 + ["ok"]
    job.cancel()
    wait_state(job, "cancelled")


def _try(call):
    try:
        call()
    except InvalidStateError:
        return "409"
    return "ok"


def test_pip_install_enables_the_server_extension():
    import subprocess
    import sys

    out = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter"), "server", "extension", "list"],
        capture_output=True,
        text=True,
        check=True,
    )
    text = out.stdout + out.stderr
    assert "cumulus_jupyter" in text and "enabled" in text
    assert "cumulus_jupyter 0" in text and "OK" in text.split("cumulus_jupyter 0", 1)[1][:40]


def test_a_job_repr_says_how_old_the_state_it_shows_is(client, monkeypatch):
    job = client.run_async(jobfuncs.add, args=[1], gpu_memory=0.1)
    assert job.result(timeout=60) == 1
    submitted = job._record["state"]
    assert repr(job) == f"<Job {job.id} 'add' {submitted}>"  # just received: no age
    import cumulus_jupyter.kernel.client as client_module

    later = client_module.time.monotonic() + 90
    monkeypatch.setattr(client_module.time, "monotonic", lambda: later)
    assert repr(job) == f"<Job {job.id} 'add' {submitted} as of 1m30s ago; status() refreshes>"
    assert job.status() == "completed"
    assert repr(job) == f"<Job {job.id} 'add' completed>"


def test_a_record_says_what_may_be_done_and_the_server_agrees(client, tmp_path):
    """``actions`` lists exactly the requests the server accepts in each state."""
    job = client.run_async(jobfuncs.pausable_sleep, args=[300], gpu_memory=0.1)
    wait_state(job, "running")  # it runs until paused
    assert job.info()["actions"] == ["pause", "cancel"]
    with pytest.raises(InvalidStateError, match="only a paused, timed-out or lost job"):
        job.resume()
    with pytest.raises(InvalidStateError, match="cancel it before deleting it"):
        client.forget_job(job.id)

    job.pause()
    wait_state(job, "paused")
    assert job.info()["actions"] == ["resume", "cancel", "delete"]
    with pytest.raises(InvalidStateError, match="only a running job can pause"):
        job.pause()

    # Cancelling is a phase of a running job: nothing is left to ask for.
    pidfile = str(tmp_path / "pid")
    stubborn = client.run_async(jobfuncs.ignore_everything, args=[pidfile], gpu_memory=0.1)
    wait_until(lambda: os.path.exists(pidfile), what="the stubborn job to start")
    record = stubborn.cancel()
    assert (record["state"], record["message"], record["actions"]) == ("running", "cancelling", [])
    with pytest.raises(InvalidStateError):
        stubborn.pause()
    wait_state(stubborn, "cancelled")
    assert stubborn.info()["actions"] == ["delete"]

    job.cancel()
    assert job.info()["actions"] == ["delete"]
    client.forget_job(job.id)
    client.forget_job(stubborn.id)
    assert {j.id for j in client.jobs()}.isdisjoint({job.id, stubborn.id})


@pytest.mark.parametrize("non_daemon_seconds", [0.0, 0.5])
def test_a_run_still_runs_its_atexit_handlers(client, tmp_path, non_daemon_seconds):
    """The worker skips interpreter teardown, not what user code registered to run at exit."""
    marker = tmp_path / "at_exit"
    job = client.run_async(
        jobfuncs.register_at_exit, args=[str(marker), non_daemon_seconds], gpu_memory=0.1
    )
    assert job.result(timeout=60) == "registered"
    wait_state(job, "completed")
    wait_until(marker.exists, what="the atexit handler's file")
    assert marker.read_text() == "ran at exit"

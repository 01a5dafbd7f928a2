"""Lost runs restart by themselves (``max_restarts``), through a real server: a run
SIGKILLed from outside continues from its newest checkpoint and ends as if never
killed; what was asked to stop, or raised, is not restarted."""

from __future__ import annotations

import os
import signal

import jobfuncs
import psutil
import pytest
from conftest import serving
from servers import ServerProcess, wait_until
from test_exact_resume import STEPS, assert_same_state, losses

from cumulus_jupyter.errors import BadRequestError, JobFailedError
from cumulus_jupyter.kernel.display import job_header_html


def kill_the_run_after_a_save(job, epoch, step):
    """SIGKILL the job's current run from outside once it has saved at ``(epoch, step)``
    or later (``step`` counts batches within the epoch)."""
    wait_until(
        lambda: any((c["epoch"], c["step"]) >= (epoch, step) for c in job.get_checkpoints()),
        timeout=120,
        what=f"a checkpoint at epoch {epoch}, step {step} or later",
    )
    run = job.info()["run"]
    os.kill(job.info()["process"]["pid"], signal.SIGKILL)
    return run


def test_a_run_killed_from_outside_restarts_from_its_checkpoint_and_ends_exactly(client):
    reference = client.run_async(jobfuncs.exact_train)
    expected, expected_losses = reference.result(timeout=180), losses(reference)
    job = client.run_async(
        jobfuncs.exact_train,
        kwargs={"step_seconds": 0.05, "every_steps": 2},
        max_restarts=2,
    )
    assert job.info()["max_restarts"] == 2
    first = kill_the_run_after_a_save(job, 0, 6)
    wait_until(lambda: len(job.info()["restarts"]) == 1, what="the restart")
    second = kill_the_run_after_a_save(job, 1, 6)
    result = job.result(timeout=300)
    info = job.info()
    assert result["status"] == "completed"
    # Nobody resumed it: the server did, twice, from the newest checkpoint each time.
    assert [r["run"] for r in info["restarts"]] == [first, second] == [1, 2]
    for restart in info["restarts"]:
        assert "SIGKILL" in restart["cause"] and restart["time"] > 0
    assert [r["state"] for r in info["runs"]] == ["lost", "lost", "completed"]
    assert_same_state(result, expected)
    got = losses(job)
    assert list(got) == list(expected_losses) and len(got) == STEPS
    assert list(got.values()) == list(expected_losses.values())
    assert "restarted 2 of 2 times" in job_header_html(info)


def test_restarts_stop_when_they_are_used_up(client):
    job = client.run_async(
        jobfuncs.exact_train, kwargs={"step_seconds": 0.05, "every_steps": 2}, max_restarts=1
    )
    kill_the_run_after_a_save(job, 0, 4)
    wait_until(lambda: job.info()["run"] == 2 and job.status() == "running", what="the restart")
    kill_the_run_after_a_save(job, 0, 10)
    wait_until(lambda: job.status() == "lost", timeout=60, what="the job to stay lost")
    info = job.info()
    assert len(info["restarts"]) == 1 and info["run"] == 2
    assert "SIGKILL" in info["message"]
    job.resume()  # the user still can
    assert job.result(timeout=300)["status"] == "completed"


def test_a_run_that_raised_or_was_stopped_is_not_restarted(client, tmp_path):
    failing = client.run_async(jobfuncs.failing, args=[3], max_restarts=3)
    with pytest.raises(JobFailedError):
        failing.result(timeout=120)
    assert failing.info()["restarts"] == [] and failing.info()["run"] == 1

    paused = client.run_async(jobfuncs.pausable_sleep, args=[60], max_restarts=3)
    wait_until(lambda: paused.status() == "running", timeout=60, what="the job to run")
    paused.pause()
    paused.wait(timeout=60)
    cancelled = client.run_async(jobfuncs.pausable_sleep, args=[60], max_restarts=3)
    wait_until(lambda: cancelled.status() == "running", timeout=60, what="the job to run")
    cancelled.cancel()
    cancelled.wait(timeout=60)
    # Killed by the server because it ignored the pause: asked to stop, not lost.
    pidfile = tmp_path / "pid"
    stubborn = client.run_async(jobfuncs.ignore_everything, args=[str(pidfile)], max_restarts=3)
    wait_until(pidfile.exists, timeout=60, what="the job to start")
    stubborn.pause()
    stubborn.wait(timeout=60)
    assert stubborn.info()["escalation"] == "sigkill"
    for job, state in ((paused, "paused"), (cancelled, "cancelled"), (stubborn, "paused")):
        assert job.status() == state and job.info()["restarts"] == []
        assert job.info()["run"] == 1


@pytest.mark.parametrize("value", [-1, 101, 1.5, "2", True])
def test_max_restarts_must_be_a_small_whole_number(client, value):
    before = len(client.jobs())
    with pytest.raises(BadRequestError, match="max_restarts must be a whole number from 0 to 100"):
        client.run_async(jobfuncs.add, args=[1], max_restarts=value)
    assert len(client.jobs()) == before


def test_a_run_that_died_while_the_server_was_down_restarts_when_it_comes_back(tmp_path):
    srv = ServerProcess(tmp_path, kill_grace=2)
    with serving(srv):
        client = srv.client()
        reference = client.run(jobfuncs.exact_train)
        job = client.run_async(
            jobfuncs.exact_train, kwargs={"step_seconds": 0.05, "every_steps": 2}, max_restarts=1
        )
        wait_until(lambda: job.get_checkpoints(), timeout=120, what="a checkpoint")
        pid = job.info()["process"]["pid"]
        srv.stop(signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)  # the run dies while nobody watches
        wait_until(lambda: not psutil.pid_exists(pid) or is_zombie(pid), what="the run to die")
        srv.start()
        job = srv.client().get_job(job.id)
        result = job.result(timeout=300)
        assert result["status"] == "completed"
        (restart,) = job.info()["restarts"]
        assert restart["run"] == 1 and "lost" not in job.status()
        assert_same_state(result, reference)


def is_zombie(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True

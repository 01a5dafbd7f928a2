"""Jobs of several ranks (nprocs > 1) through a real server: 2 gloo ranks on the CPU."""

from __future__ import annotations

import os
import signal

import jobfuncs
import psutil
import pytest
from conftest import serving
from servers import ServerProcess, wait_until


def processes_of(job) -> list[psutil.Process]:
    """Every live process of the job: its run's process and the ranks it started."""
    found = []
    for proc in psutil.process_iter(["environ"]):
        try:
            env = proc.info["environ"] or {}
            if env.get("CUMULUS_JOB_ID") == job.id and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_every_rank_runs_with_torch_distributed_initialised(server):
    client = server.client()
    job = client.run_async(jobfuncs.rank_facts, gpu_memory=0.1, nprocs=2)
    facts = job.result(timeout=120)
    assert [f["rank"] for f in facts] == [0, 1]
    for rank, f in enumerate(facts):
        assert f["world_size"] == 2
        assert f["dist"] == [rank, 2, "gloo"]
        assert f["env"] == {
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
        }
        assert f["sum"] == 3.0  # 1 + 2: the all-reduce went through both
    assert facts[0]["pid"] != facts[1]["pid"]
    info = job.info()
    assert info["state"] == "completed" and info["nprocs"] == 2
    log = job.logs()
    assert "[rank 0] rank 0 here" in log and "[rank 1] rank 1 here" in log
    # Only rank 0 reports: rank 1's report is dropped.
    assert [m.get("who") for m in job.metrics()] == [0.0]


def test_a_pause_stops_every_rank_after_the_same_step(server, tmp_path):
    client = server.client()
    job = client.run_async(jobfuncs.ranks_until_paused, args=[str(tmp_path)], nprocs=2)
    wait_until(
        lambda: all((tmp_path / f"running-{r}").exists() for r in (0, 1)),
        timeout=120,
        what="both ranks to step",
    )
    job.pause()
    wait_until(lambda: job.status() == "paused", timeout=60, what="the job to pause")
    steps = job.result(timeout=10)["steps"]
    assert len(steps) == 2 and steps[0] == steps[1] > 0, steps  # though rank 1 is slower
    assert not processes_of(job)


@pytest.mark.parametrize("rank0_waits", ["in a collective", "in its own code"])
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_one_failed_rank_fails_the_job_and_stops_the_others(server, tmp_path, how, rank0_waits):
    client = server.client()
    job = client.run_async(jobfuncs.a_rank_fails, args=[how, str(tmp_path), rank0_waits], nprocs=2)
    wait_until(
        lambda: all((tmp_path / f"pid-{r}").exists() for r in (0, 1)),
        timeout=120,
        what="both ranks to start",
    )
    if how == "kill":
        os.kill(int((tmp_path / "pid-1").read_text()), signal.SIGKILL)
    wait_until(lambda: job.status() == "failed", timeout=60, what="the job to fail")
    message = job.info()["message"]
    if how == "raise":
        assert "rank 1: bad batch on rank 1" in message
    else:
        assert "rank 1 of 2 was killed by SIGKILL" in message
    # Rank 0 was stopped, not left waiting for a rank that is gone.
    assert not processes_of(job)


def test_cancel_reaches_a_rank_blocked_in_a_collective(server, tmp_path):
    client = server.client()
    job = client.run_async(jobfuncs.a_rank_fails, args=["wait", str(tmp_path)], nprocs=2)
    wait_until(
        lambda: all((tmp_path / f"pid-{r}").exists() for r in (0, 1)),
        timeout=120,
        what="both ranks to start",
    )
    ranks = [psutil.Process(int((tmp_path / f"pid-{r}").read_text())) for r in (0, 1)]
    job.cancel()
    wait_until(lambda: job.status() == "cancelled", timeout=60, what="the job to be cancelled")
    wait_until(lambda: not processes_of(job), timeout=30, what="every rank to be gone")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_a_job_of_two_ranks_outlives_a_killed_server_then_pauses_and_resumes(tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    srv = ServerProcess(tmp_path, kill_grace=3)
    with serving(srv):
        job = srv.client().run_async(jobfuncs.ranks_until_paused, args=[str(flags)], nprocs=2)
        wait_until(
            lambda: all((flags / f"running-{r}").exists() for r in (0, 1)),
            timeout=120,
            what="both ranks to step",
        )
        pids = sorted(p.pid for p in processes_of(job))
        assert len(pids) == 3  # the run's process and its two ranks
        srv.stop(signal.SIGKILL)
        assert sorted(p.pid for p in processes_of(job)) == pids  # all still running
        srv.start()
        job = srv.client().get_job(job.id)
        assert job.status() == "running"  # re-adopted
        job.pause()
        wait_until(lambda: job.status() == "paused", timeout=60, what="the job to pause")
        steps = job.result(timeout=10)["steps"]
        assert steps[0] == steps[1] >= 20
        assert not processes_of(job)
        # And resumed: both ranks run again, under the restarted server.
        for r in (0, 1):
            (flags / f"running-{r}").unlink()
        job.resume()
        wait_until(
            lambda: all((flags / f"running-{r}").exists() for r in (0, 1)),
            timeout=120,
            what="both ranks to step after the resume",
        )
        assert job.info()["run"] == 2 and len(processes_of(job)) == 3
        job.cancel()
        wait_until(lambda: not processes_of(job), timeout=30, what="every rank to be gone")


def test_the_widget_pauses_and_resumes_a_job_of_two_ranks(server, tmp_path):
    from cumulus_jupyter.kernel.widgets import JobWidget

    client = server.client()
    job = client.run_async(jobfuncs.ranks_until_paused, args=[str(tmp_path)], nprocs=2)
    w = JobWidget(job, poll_interval=0.2)
    try:
        wait_until(
            lambda: all((tmp_path / f"running-{r}").exists() for r in (0, 1)),
            timeout=120,
            what="both ranks to step",
        )
        wait_until(lambda: w.state == "running", what="the widget to see the job run")
        w.pause_button.click()
        wait_until(lambda: w.state == "paused", timeout=60, what="the widget to see the pause")
        steps = job.result(timeout=10)["steps"]
        assert steps[0] == steps[1] >= 20
        for r in (0, 1):
            (tmp_path / f"running-{r}").unlink()
        w.resume_button.click()
        wait_until(
            lambda: all((tmp_path / f"running-{r}").exists() for r in (0, 1)),
            timeout=120,
            what="both ranks to step again",
        )
        wait_until(lambda: w.state == "running", what="the widget to see the resume")
        assert job.info()["run"] == 2 and job.info()["nprocs"] == 2
        w.cancel_button.click()
        wait_until(lambda: w.state == "cancelled", timeout=60, what="the widget to see the cancel")
        wait_until(lambda: not processes_of(job), timeout=30, what="every rank to be gone")
    finally:
        w.close()

"""Warm workers: runs forked from a template that imported torch are runs like any other."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
from pathlib import Path

import jobfuncs
import psutil
import pytest
from conftest import serving
from servers import ServerProcess, wait_until

from cumulus_jupyter.server.app import CumulusApp

TEMPLATE = "cumulus_jupyter.runtime.template"
JOB_NICE = CumulusApp.job_nice.default_value
#: Differ between any two jobs or servers, however a run starts.
PER_JOB = {"CUMULUS_JOB_DIR", "CUMULUS_JOB_ID", "CUMULUS_SERVER_URL"}


def run_environment(fingerprint: dict) -> dict:
    """The run's environment, its own directory written as <job>."""
    job_dir = fingerprint["env"]["CUMULUS_JOB_DIR"]
    return {
        k: v.replace(job_dir, "<job>") for k, v in fingerprint["env"].items() if k not in PER_JOB
    }


def templates(server: ServerProcess) -> list[psutil.Process]:
    assert server.proc is not None
    found = []
    for proc in psutil.Process(server.proc.pid).children():
        try:
            if TEMPLATE in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by the server
    except psutil.NoSuchProcess:
        return True


def warm_client(server: ServerProcess):
    """The server's client once its template is up, so the next run is forked."""
    wait_until(lambda: templates(server), timeout=60, what="the warm template")
    client = server.client()
    # A run that finds the template not ready yet starts cold: warm it up.
    wait_until(
        lambda: TEMPLATE in client.run(jobfuncs.fingerprint, gpu_memory=0.1)["parent"],
        timeout=60,
        what="a forked run",
    )
    return client


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory):
    base = tmp_path_factory.mktemp("warm")
    with serving(ServerProcess(base, warm_workers=True)) as srv:
        yield srv


def test_a_forked_run_is_a_cold_run_but_for_its_parent(tmp_path):
    """Environment, cwd, session, signals, descriptors, stdio, threads: all as a cold run's."""
    prints = {}
    for warm in (False, True):  # the same base directory, so the same server environment
        with serving(ServerProcess(tmp_path, warm_workers=warm)) as srv:
            client = warm_client(srv) if warm else srv.client()
            prints[warm] = client.run(jobfuncs.fingerprint, gpu_memory=0.1)
    cold, forked = prints[False], prints[True]
    assert TEMPLATE in forked.pop("parent") and TEMPLATE not in cold.pop("parent")
    del cold["random"], forked["random"]  # see the next test
    # Each runs in its own job's directory, in the same job root.
    assert Path(forked.pop("cwd")).parent == Path(cold.pop("cwd")).parent == tmp_path / "jobs"
    assert run_environment(forked) == run_environment(cold)
    for run in (cold, forked):  # stdout and stderr go to the run's own log
        assert run.pop("stdout") == str(Path(run.pop("env")["CUMULUS_JOB_DIR"]) / "output.log")
    assert forked == cold
    assert forked["own_session"] and forked["threads"] == 1
    # Below the server (CumulusApp.job_nice), also where the scheduler shares
    # the CPU between sessions first.
    assert forked["nice"] == JOB_NICE
    assert forked["autogroup_nice"] in (JOB_NICE, None)
    assert forked["stdin"] == "/dev/null"


def test_forked_runs_draw_their_own_random_numbers(warm_server):
    client = warm_client(warm_server)
    draws = [client.run(jobfuncs.fingerprint, gpu_memory=0.1) for _ in range(2)]
    assert all(TEMPLATE in d["parent"] for d in draws)
    a, b = (d["random"] for d in draws)
    assert all(x != y for x, y in zip(a, b, strict=True)), (a, b)  # random, numpy, torch


def test_a_run_leaves_nothing_behind_in_the_template(warm_server):
    client = warm_client(warm_server)
    assert client.run(jobfuncs.leave_a_global, gpu_memory=0.1) == "left"
    assert client.run(jobfuncs.find_the_global, gpu_memory=0.1) == "not there"


def test_a_killed_template_falls_back_to_a_cold_start(warm_server):
    client = warm_client(warm_server)
    for template in templates(warm_server):
        template.send_signal(signal.SIGKILL)
        wait_until(lambda t=template: gone(t), what="the template to die")
    first = client.run(jobfuncs.fingerprint, gpu_memory=0.1)
    assert TEMPLATE not in first["parent"]  # started cold, and it ran
    warm_client(warm_server)  # a template is back, and forks runs again


def test_a_server_killed_with_forked_runs_re_adopts_them(tmp_path):
    srv = ServerProcess(tmp_path, warm_workers=True)
    with serving(srv):
        client = warm_client(srv)
        release = tmp_path / "release"
        job = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
        wait_until(lambda: job.status() == "running", what="the forked job to run")
        pid = job.info()["process"]["pid"]
        assert TEMPLATE in " ".join(psutil.Process(pid).parent().cmdline())
        srv.stop(signal.SIGKILL)
        assert psutil.pid_exists(pid)  # it outlives the server and its template
        srv.start()
        client = srv.client()
        job = client.get_job(job.id)
        assert job.status() == "running" and job.info()["process"]["pid"] == pid
        release.touch()
        assert job.result(timeout=60) == "released"
        assert job.status() == "completed"


def test_gpus_reports_the_template_and_its_memory(warm_server):
    warm_client(warm_server)
    template = templates(warm_server)[0]
    warm = warm_server.client()._json("GET", "gpus")["warm"]
    assert warm["pid"] == template.pid and warm["rss"] > 0
    assert "torch" in warm["preload"]
    # Its forks are CPU work in a burst of submits: it runs below the server too.
    assert template.nice() == JOB_NICE
    with contextlib.suppress(FileNotFoundError):
        assert Path(f"/proc/{template.pid}/autogroup").read_text().split()[-1] == str(JOB_NICE)


def test_an_upgraded_package_makes_the_template_stale(warm_server):
    """A file the template imported changed on disk: the next run starts cold, then a new
    template (which imported the new code) forks runs again."""
    client = warm_client(warm_server)
    old = templates(warm_server)[0].pid
    worker = Path(importlib.util.find_spec("cumulus_jupyter.runtime.worker").origin)
    before = worker.stat()
    try:
        os.utime(worker, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        run = client.run(jobfuncs.fingerprint, gpu_memory=0.1)
        assert TEMPLATE not in run["parent"]  # not forked by the stale template
        warm_client(warm_server)
        assert [t.pid for t in templates(warm_server)] != [old]
    finally:
        os.utime(worker, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_forked_run_skips_the_template_s_collection_and_exit_work(warm_server, tmp_path):
    """The template's objects are frozen (a collection in the run does not walk, and so
    copy, its pages) and torch's finalizers are not called as the run exits; the run's
    own cycles are collected and its own finalizers run."""
    client = warm_client(warm_server)
    state = client.run(jobfuncs.exit_and_collector_state, (str(tmp_path),), gpu_memory=0.1)
    assert state["frozen"] > 10_000, state  # torch alone makes far more objects
    assert state["collected"] >= 1, state
    assert state["torch_finalizers_at_exit"] == 0, state
    assert state["finalizers_at_exit"] == 1, state  # the run's own
    wait_until((tmp_path / "finalized").exists, what="the run's own finalizer")


def test_runs_cancelled_as_they_start_leave_no_process_or_zombie(warm_server, tmp_path):
    """A job cancelled while its run is being forked: the run is killed and reaped.

    The server kills such a run the moment it has its pid; a run with torch
    imported takes a while to die, so the template, its parent, reaps it once
    it has (it used to be left a zombie, its pid held, for the template's life).
    """
    client = warm_client(warm_server)
    template = templates(warm_server)[0]
    jobs = []
    for _ in range(10):
        job = client.run_async(jobfuncs.hold_until, args=[str(tmp_path / "never")], gpu_memory=0.01)
        job.cancel()  # most arrive while the fork is under way
        jobs.append(job)
    for job in jobs:
        wait_until(lambda j=job: j.status() == "cancelled", what="the job to be cancelled")

    def leftovers() -> list[tuple[int, str]]:
        found = []
        for proc in template.children():
            with contextlib.suppress(psutil.Error):
                found.append((proc.pid, proc.status()))
        return found

    wait_until(
        lambda: not leftovers(),
        timeout=30,
        what=lambda: f"no run left under the template: {leftovers()}",
    )


@pytest.mark.parametrize("warm", [True, False], ids=["forked", "cold"])
def test_the_kill_reaches_a_child_that_left_the_job_s_process_group(tmp_path, warm):
    """A run that ignores pause and SIGTERM is killed with all it started, even a child
    in a session of its own (found before the kill: then it is an orphan)."""
    # Pause, then SIGTERM, then SIGKILL, each after a short wait.
    with serving(ServerProcess(tmp_path, warm_workers=warm, pause_timeout=3, kill_grace=2)) as srv:
        client = warm_client(srv) if warm else srv.client()
        pidfile = tmp_path / "pids"
        job = client.run_async(jobfuncs.ignore_everything, args=[str(pidfile), True])
        wait_until(pidfile.exists, what="the job and its stray child to start")
        main, stray = (int(p) for p in pidfile.read_text().split())
        assert (TEMPLATE in " ".join(psutil.Process(main).parent().cmdline())) is warm
        assert os.getpgid(stray) != os.getpgid(main)
        # Looked up while alive: once killed, an orphan may be reaped at once.
        stray_proc = psutil.Process(stray)
        job.pause()
        wait_until(lambda: job.status() == "paused", timeout=60, what="the kill")
        assert job.info()["escalation"] == "sigkill"
        wait_until(lambda: gone(stray_proc), what="the stray child to be killed")

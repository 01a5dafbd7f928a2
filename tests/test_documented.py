"""Documented behaviour, run end to end: a real `jupyter server`, real job processes, torch on CPU.

Each test names the document that promises what it checks.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import jobfuncs
import pytest
from conftest import serving
from servers import ServerProcess, wait_until

from cumulus_jupyter.errors import JobFailedError
from cumulus_jupyter.runtime.persist import entry_hash, read_checkpoint

#: What a JupyterHub single-user server, or a user's shell, may hold.
HUB_SECRET = secrets.token_hex(16)
SECRET_NAMES = ("CUMULUS_TOKEN", "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")
STOPPED = ("paused", "timed_out", "lost", "completed", "failed", "cancelled")


class ServerWithSecrets(ServerProcess):
    """A server whose environment holds its own token and a hub's API token."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env.update(
            JUPYTER_TOKEN=self.token,
            JPY_API_TOKEN=HUB_SECRET,
            JUPYTERHUB_API_TOKEN=HUB_SECRET,
            CUMULUS_TOKEN=self.token,
        )
        return env


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with serving(ServerWithSecrets(tmp_path_factory.mktemp("documented"))) as server:
        yield server


@pytest.fixture
def client(srv):
    return srv.client()


def stopped(job, timeout=60):
    """Wait until the job's run is over; return its record."""
    job.wait(timeout=timeout)
    info = job.info()
    assert info["state"] in STOPPED, info
    return info


def verified_checkpoints(job) -> list[tuple[int, int]]:
    """(epoch, step) of every listed checkpoint, each read back against its hash."""
    out = []
    for entry in job.get_checkpoints():
        read_checkpoint(Path(entry["path"]), entry_hash(entry))
        out.append((entry["epoch"], entry["step"]))
    return out


def test_a_save_past_the_file_size_limit_fails_the_job_and_keeps_earlier_checkpoints(client, srv):
    """docs/checkpoints.md: the job process ignores SIGXFSZ, so a save past a
    file-size limit is an error, not a killed process."""
    job = client.run_async(jobfuncs.save_past_a_file_size_limit, gpu_memory=0.1)
    info = stopped(job)
    assert info["state"] == "failed", info["message"]
    assert "could not save checkpoint" in info["message"]
    assert "File too large" in info["message"]
    assert "previous checkpoints are unchanged" in info["message"]
    with pytest.raises(JobFailedError, match="File too large"):
        job.result(timeout=10)
    assert "SIGXFSZ handler: <Handlers.SIG_IGN: 1>" in job.logs()
    assert verified_checkpoints(job) == [(0, 1)]
    assert not list((srv.job_root / job.id / "checkpoints").glob(".*.tmp"))


def test_a_failed_last_async_save_fails_the_job(client):
    """docs/checkpoints.md: the job waits for its pending saves, and a failed
    last save fails the job rather than leaving it completed."""
    job = client.run_async(jobfuncs.async_save_fails_after_return, gpu_memory=0.1)
    info = stopped(job)
    assert info["state"] == "failed", info["message"]
    assert "the last checkpoint could not be saved" in info["message"]
    assert "File too large" in info["message"]
    with pytest.raises(JobFailedError, match="the last checkpoint could not be saved"):
        job.result(timeout=10)
    assert verified_checkpoints(job) == [(0, 1)]


def test_a_whole_gpu_job_is_not_overtaken_by_later_small_ones(client, tmp_path):
    """docs/architecture.md: admission is strictly first in, first out (one
    `cpu` device of share 1.0 on a host without GPUs)."""
    wait_until(lambda: client.gpus()[0]["used"] == 0, what="the device to be free")
    release = tmp_path / "release"
    holder = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.5)
    whole = client.run_async(jobfuncs.add, args=[1], gpu_memory=1.0)
    small = [client.run_async(jobfuncs.add, args=[i], gpu_memory=0.25) for i in (2, 3)]
    # Admission runs in each submit: two quarters would fit beside the half now.
    usage = client.gpus()
    assert usage == [{"device": "cpu", "used": 0.5, "jobs": {holder.id: 0.5}}]
    assert [j.status() for j in (whole, *small)] == ["queued"] * 3
    release.touch()
    assert holder.result(timeout=60) == "released"
    assert [j.result(timeout=60) for j in (whole, *small)] == [1, 2, 3]
    runs = {j.id: j.info()["runs"] for j in (holder, whole, *small)}
    assert all(len(r) == 1 for r in runs.values())
    assert runs[whole.id][0]["started"] >= runs[holder.id][0]["ended"]
    for job in small:
        assert runs[job.id][0]["started"] >= runs[whole.id][0]["ended"]


def test_no_token_reaches_the_job_environment(client, srv):
    """docs/architecture.md (Security): a job's environment holds neither the
    server's token nor the hub's, under any name."""
    env = client.run(jobfuncs.whole_environment, gpu_memory=0.1)
    assert env["CUMULUS_JOB_DIR"] == str(srv.job_root / client.last_job.id)
    assert [name for name in SECRET_NAMES if name in env] == []
    leaks = [k for k, v in env.items() if srv.token in v or HUB_SECRET in v]
    assert leaks == []


def test_a_duration_limit_pauses_with_its_own_checkpoint_and_a_resume_sets_a_new_one(client):
    """docs/architecture.md: a run past its duration is paused (reason
    "duration") and ends timed_out; a resume may set a new limit."""
    job = client.run_async(
        jobfuncs.save_only_when_paused, kwargs={"steps": 60}, gpu_memory=0.1, duration=1
    )
    info = stopped(job)
    assert info["state"] == "timed_out", info["message"]
    assert "duration limit reached" in info["message"]
    assert (info["pause_reason"], info["escalation"]) == ("duration", None)
    assert [(r["state"], r["stop"]) for r in info["runs"]] == [("timed_out", "cooperative")]
    paused = job.result(timeout=10)
    assert paused["status"] == "paused"
    # The only checkpoint is the one the pause made, at the step it paused.
    assert verified_checkpoints(job) == [(0, paused["step"])]

    # The rest takes longer than the old limit of 1 s: only the new one lets it finish.
    assert (60 - paused["step"]) * 0.05 > 1
    job.resume(duration=60)
    info = stopped(job)
    assert info["state"] == "completed", info["message"]
    assert info["duration"] == 60
    assert job.result(timeout=10) == {"status": "completed", "start": paused["step"] + 1}
    assert [(r["state"], r["stop"]) for r in info["runs"]] == [
        ("timed_out", "cooperative"),
        ("completed", None),
    ]
    assert info["runs"][1]["ended"] - info["runs"][1]["started"] > 1


def test_a_job_that_finished_while_the_server_was_down_shows_its_whole_log(srv, tmp_path):
    """docs/reliability.md (fault 1): after a restart, a job that finished
    meanwhile shows its result and whole log."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    job = srv.client().run_async(
        jobfuncs.print_lines_around, args=[str(ready), str(release)], gpu_memory=0.1
    )
    wait_until(ready.exists, timeout=60, what="the job's first lines")
    srv.stop()
    try:
        release.touch()
        state_file = srv.job_root / job.id / "state.json"
        wait_until(
            lambda: json.loads(state_file.read_text()).get("state") == "completed",
            timeout=60,
            what="the job to finish while the server is down",
        )
    finally:
        srv.start()  # on the same job root, for this and any later test
    job = srv.client().get_job(job.id)
    assert job.status() == "completed"
    assert job.result(timeout=10) == 15100
    log = job.logs()
    assert len(log.encode()) > 1 << 20  # more than one read of the log
    assert log == "".join(f"{i:06d} {'日' * 30}\n" for i in range(15100))

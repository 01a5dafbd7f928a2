"""Checkpoints of jobs of several ranks (torch.distributed.checkpoint), through a real
server with 2 gloo ranks on the CPU: exact resume, resharding, kills mid-save."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import jobfuncs
import pytest
import torch
from conftest import serving
from servers import ServerProcess, wait_until

from cumulus_jupyter.manifest import CheckpointIndex, content_hash, content_size
from cumulus_jupyter.runtime import verify_resume
from cumulus_jupyter.runtime.persist import CheckpointError, read_checkpoint
from cumulus_jupyter.runtime.sharded import read_whole

STEPS = 24  # 2 epochs of 12 batches on each of 2 ranks


def assert_equal_tensors(a, b, what):
    assert set(a) == set(b), what
    for key in a:
        if isinstance(a[key], dict):
            assert_equal_tensors(a[key], b[key], f"{what}[{key}]")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}[{key}]"
        else:
            assert a[key] == b[key], f"{what}[{key}]"


def assert_same_run(a, b):
    """Two results of jobfuncs.ddp_train: every rank's losses, model and optimizer equal."""
    assert len(a["ranks"]) == len(b["ranks"])
    for rank, (x, y) in enumerate(zip(a["ranks"], b["ranks"], strict=True)):
        assert [s[:2] for s in x["losses"]] == [s[:2] for s in y["losses"]], rank
        assert [s[2] for s in x["losses"]] == [s[2] for s in y["losses"]], rank  # bitwise
        assert_equal_tensors(x["model"], y["model"], f"rank {rank} model")
        assert_equal_tensors(x["optimizer"]["state"], y["optimizer"]["state"], f"rank {rank}")
        assert x["optimizer"]["param_groups"] == y["optimizer"]["param_groups"]


def sharded_entry(job, ranks=2):
    """The job's newest checkpoint, checked to be one sharded entry that verifies."""
    entry = job.get_checkpoints()[-1]
    path = Path(entry["path"])
    assert entry["format"] == "dcp" and entry["ranks"] == ranks and path.is_dir()
    names = sorted(p.name for p in path.iterdir())
    assert ".metadata" in names and [n for n in names if n.startswith("rank-")] == [
        f"rank-{r}.pt" for r in range(ranks)
    ]
    assert any(n.endswith(".distcp") for n in names)
    assert entry["size"] == content_size(path)
    assert entry["hash"] == content_hash(path, "xxh3_128")
    return entry


@pytest.fixture(scope="module")
def straight(server):
    """The uninterrupted 2-rank runs: DDP and FSDP."""
    client = server.client()
    out = {}
    for model in ("ddp", "fsdp"):
        job = client.run_async(jobfuncs.ddp_train, kwargs={"fsdp": model == "fsdp"}, nprocs=2)
        out[model] = job.result(timeout=180)
        assert len(out[model]["ranks"][1]["losses"]) == STEPS
    return out


@pytest.mark.parametrize(("model", "resumes"), [("ddp", 1), ("ddp", 3), ("fsdp", 1)])
def test_paused_and_resumed_ranks_end_bitwise_identical(server, straight, model, resumes):
    client = server.client()
    job = client.run_async(
        jobfuncs.ddp_train, kwargs={"fsdp": model == "fsdp", "step_seconds": 0.05}, nprocs=2
    )
    marks = sorted(random.Random(f"{model}-{resumes}").sample(range(3, STEPS - 4), resumes))
    seen = 0
    for mark in marks:
        target = max(mark, seen + 1)
        wait_until(lambda t=target: len(job.metrics()) >= t, timeout=120, what=f"step {mark}")
        job.pause()
        job.wait(timeout=120)
        assert job.status() == "paused"
        entry = sharded_entry(job)
        saved = read_whole(Path(entry["path"]), entry["hash"])
        assert [r["step"] for r in saved["ranks"]] == [entry["step"]] * 2
        # Each rank's own RNG states are kept: the ranks' Python generators differ.
        assert saved["ranks"][0]["rng"]["python"] != saved["ranks"][1]["rng"]["python"]
        seen = len(job.metrics())
        job.resume()
    result = job.result(timeout=300)
    assert result["status"] == "completed" and len(job.info()["runs"]) == resumes + 1
    assert_same_run(result, straight[model])


def loaded_matches(loaded, saved, entry):
    """What a rank loaded is the checkpoint's model and optimizer, at its position."""
    assert (loaded["name"], loaded["epoch"], loaded["step"]) == (
        entry["name"],
        entry["epoch"],
        entry["step"],
    )
    assert_equal_tensors(loaded["model"], saved["model"], "model")
    assert_equal_tensors(loaded["optimizer"]["state"], saved["optimizer"]["state"], "optimizer")


def test_a_checkpoint_of_two_ranks_resumes_on_four_then_on_one(tmp_path):
    # Four ranks need four devices (a CPU host runs at most one rank per core):
    # the server is told of four GPU ids. None exists here, so the ranks still
    # run gloo on the CPU; only placement believes in the GPUs.
    with serving(ServerProcess(tmp_path, gpus='["0", "1", "2", "3"]', kill_grace=2)) as srv:
        reshard_two_four_one(srv.client())


def reshard_two_four_one(client):
    job = client.run_async(
        jobfuncs.ddp_train, kwargs={"step_seconds": 0.05}, nprocs=2, gpu_memory=0.5
    )
    for ranks_now, ranks_next in ((2, 4), (4, 1)):
        before = len(job.metrics())
        wait_until(lambda b=before: len(job.metrics()) >= b + 4, timeout=120, what="steps")
        job.pause()
        job.wait(timeout=120)
        entry = sharded_entry(job, ranks_now)
        saved = read_whole(Path(entry["path"]), entry["hash"])
        job.resume(nprocs=ranks_next)
        if ranks_next == 4:
            wait_until(lambda: job.status() == "running", timeout=60, what="the resume")
            assert job.info()["nprocs"] == 4
            assert len(job.info()["devices"]) == 4
    result = job.result(timeout=300)
    assert result["status"] == "completed" and job.info()["nprocs"] == 1
    (only,) = result["ranks"]
    assert only["world_size"] == 1
    loaded_matches(only["loaded"], saved, entry)
    # Its losses go on from those rank 0 saved (in extra) without a gap.
    assert only["losses"][: len(saved["extra"]["losses"])] == saved["extra"]["losses"]
    assert only["losses"][len(saved["extra"]["losses"])][:2] == [entry["epoch"], entry["step"] + 1]


@pytest.mark.parametrize("model", ["ddp", "fsdp"])
def test_a_checkpoint_of_one_process_resumes_on_two_ranks(server, model):
    client = server.client()
    kwargs = {"step_seconds": 0.05, "fsdp": model == "fsdp"}  # one process: a plain model
    job = client.run_async(jobfuncs.ddp_train, kwargs=kwargs)
    wait_until(lambda: len(job.metrics()) >= 4, timeout=120, what="steps")
    job.pause()
    job.wait(timeout=120)
    entry = job.get_checkpoints()[-1]
    assert entry.get("format") is None and entry["name"].endswith(".pt")
    saved = read_checkpoint(Path(entry["path"]), entry["hash"])
    job.resume(nprocs=2)
    result = job.result(timeout=300)
    assert job.info()["nprocs"] == 2
    # The file keys the optimizer by parameter index; the ranks load it by name.
    names = ["0.weight", "0.bias", "3.weight", "3.bias"]
    by_name = {
        "model": saved["model"],
        "optimizer": {"state": {names[i]: s for i, s in saved["optimizer"]["state"].items()}},
    }
    for rank in result["ranks"]:
        assert rank["world_size"] == 2
        loaded_matches(rank["loaded"], by_name, entry)


def test_verify_resume_checks_every_rank():
    report = verify_resume(jobfuncs.ddp_train, nprocs=2, steps=16, pause_at=7)
    assert report.exact, str(report)


def newest_seq(job):
    """The manifest sequence number of the job's newest checkpoint (0 when none):
    it grows with every save, while retention keeps the count of checkpoints flat."""
    entries = job.get_checkpoints()
    return entries[-1]["seq"] if entries else 0


def test_a_kill_mid_save_leaves_the_previous_checkpoint_listed_and_loadable(server):
    client = server.client()
    job = client.run_async(jobfuncs.sharded_save_forever, nprocs=2)
    rng = random.Random(11)
    directory = None
    left = set()  # what the killed saves left behind
    for _ in range(6):
        seq = newest_seq(job)
        wait_until(
            lambda s=seq: newest_seq(job) > s,
            timeout=120,
            what=lambda: f"a new checkpoint; the job is {job.status()}: {job.logs()[-3000:]}",
        )
        directory = Path(job.get_checkpoints()[-1]["path"]).parent
        # Not a synchronisation: the kill must land at a random moment of the saves.
        time.sleep(rng.uniform(0.0, 0.4))
        os.killpg(job.info()["process"]["pid"], signal.SIGKILL)
        wait_until(lambda: job.status() == "lost", timeout=60, what="the job to be lost")
        left |= set(directory.glob(".*.tmp"))
        entries = CheckpointIndex(directory).entries()
        assert entries
        for entry in entries:  # everything listed is whole and verifies
            read_whole(Path(entry["path"]), entry["hash"])
        job.resume()
    assert left, "the kills never landed inside a save"
    # The run after the last kill loaded the newest checkpoint, cleaned what the
    # killed saves left, and saves on.
    seq = newest_seq(job)
    wait_until(lambda: newest_seq(job) > seq, timeout=120, what="a new checkpoint")
    assert job.logs().count("[rank 1] loaded checkpoint") == 6
    assert not [p.name for p in left if p.exists()]
    job.cancel()
    job.wait(timeout=60)


def test_a_sharded_checkpoint_is_verified_rebuilt_and_deleted_like_a_file(server):
    client = server.client()
    job = client.run_async(jobfuncs.sharded_save_forever, nprocs=2)
    wait_until(lambda: len(job.get_checkpoints()) >= 3, timeout=120, what="three checkpoints")
    job.pause()
    job.wait(timeout=120)
    entries = job.get_checkpoints()
    directory = Path(entries[-1]["path"]).parent
    names = [e["name"] for e in entries]
    assert len(names) == 3  # keep_last=3 pruned older directories
    assert sorted(p.name for p in directory.glob("*.dcp")) == sorted(names)

    # A lost manifest is rebuilt from the sidecars of directories that verify.
    (directory / "manifest.json").unlink()
    assert [e["name"] for e in CheckpointIndex(directory).entries()] == names

    # One flipped byte in one shard: that checkpoint no longer verifies, and
    # the resumed ranks load the one before it, together.
    newest, previous = entries[-1], entries[-2]
    shard = next(Path(newest["path"]).glob("__1_*.distcp"), None) or next(
        Path(newest["path"]).glob("*.distcp")
    )
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_whole(Path(newest["path"]), newest["hash"])
    job.resume()
    wait_until(
        lambda: job.logs().count(f"loaded checkpoint at step {previous['step']}") == 2,
        timeout=120,
        what="both ranks to load the previous checkpoint",
    )
    assert f"Loaded the newest good checkpoint instead: {previous['name']}" in job.logs()
    job.pause()
    job.wait(timeout=120)

    # Deleting one (as the browser and the panel do) removes its whole directory.
    # (Not necessarily `previous`: the resumed run saved on, and keep_last=3 pruned.)
    oldest = job.get_checkpoints()[0]
    assert Path(oldest["path"]).is_dir()
    client.delete_checkpoint(job.id, oldest["name"])
    assert oldest["name"] not in [e["name"] for e in job.get_checkpoints()]
    assert not Path(oldest["path"]).exists()


def test_the_widgets_pause_two_ranks_and_resume_them_from_an_earlier_checkpoint(server):
    from cumulus_jupyter.kernel.widgets import CheckpointBrowser, JobWidget

    client = server.client()
    job = client.run_async(
        jobfuncs.ddp_train, kwargs={"step_seconds": 0.05, "every_steps": 3}, nprocs=2
    )
    w = JobWidget(job, poll_interval=0.2)
    try:
        wait_until(lambda: len(job.get_checkpoints()) >= 2, timeout=120, what="two saves")
        wait_until(lambda: w.state == "running", what="the widget to see the job run")
        w.pause_button.click()
        wait_until(lambda: w.state == "paused", timeout=60, what="the widget to see the pause")
        browser = CheckpointBrowser(job)
        assert len(browser.select.options) == len(job.get_checkpoints())
        assert all(".dcp" in label and "2 ranks" in label for label, _ in browser.select.options)
        earlier = job.get_checkpoints()[-2]  # not the newest: the one the resume asks for
        saved = read_whole(Path(earlier["path"]), earlier["hash"])
        browser.select.value = earlier["name"]
        browser.resume_button.click()
        assert "Resuming from" in browser.message.value, browser.message.value
        result = job.result(timeout=300)
        assert result["status"] == "completed" and job.info()["nprocs"] == 2
        for rank in result["ranks"]:
            loaded_matches(rank["loaded"], saved, earlier)
        wait_until(lambda: w.state == "completed", what="the widget to see the end")
    finally:
        w.close()

"""A checkpoint store that never loses the last good checkpoint."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jobfuncs
import psutil
import pytest
import torch
from servers import wait_until
from torch import nn

from cumulus_jupyter.manifest import CheckpointIndex
from cumulus_jupyter.runtime import Checkpointer, CheckpointError, list_checkpoints, report
from cumulus_jupyter.runtime import context as jobcontext
from cumulus_jupyter.runtime.persist import read_checkpoint, write_checkpoint


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULUS_JOB_DIR", str(tmp_path))
    monkeypatch.setattr(jobcontext, "_pause_requested", False)
    return tmp_path


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def files(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_sigkill_during_saves_never_loses_the_last_good_checkpoint(tmp_path):
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "cumulus_jupyter.runtime", "jobfuncs"])
    directory = tmp_path / "checkpoints"
    rng = random.Random(7)
    killed_mid_save = 0
    for _ in range(22):
        started = ctx.Event()
        proc = ctx.Process(target=jobfuncs.save_forever, args=(str(tmp_path), started))
        proc.start()
        assert started.wait(60), "the saver never saved"
        # Not a synchronisation: the kill must land at a random moment of the save loop.
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.join()
        partial = [p for p in directory.glob(".*.tmp")]
        killed_mid_save += bool(partial)
        entries = CheckpointIndex(directory).entries()
        assert entries, "a kill lost every checkpoint"
        for entry in entries:  # everything listed is complete and verifies
            assert not entry["name"].endswith(".tmp")
            read_checkpoint(Path(entry["path"]), entry["hash"])
    assert killed_mid_save >= 3, "the kills never landed inside a save"
    # The next run cleans what the killed saves left behind, and loads.
    os.environ["CUMULUS_JOB_DIR"] = str(tmp_path)
    try:
        ckpt = Checkpointer()
        assert not list(directory.glob(".*.tmp"))
        model = nn.Linear(1024, 2048)
        state = ckpt.load(model)
        assert state["name"] == CheckpointIndex(directory).latest()["name"]
    finally:
        del os.environ["CUMULUS_JOB_DIR"]


def test_saving_again_at_a_listed_step_never_overwrites_the_listed_file(job_dir):
    # A run resumed from an earlier checkpoint saves at the same epoch and step
    # again. A kill after its file is in place but before the manifest moves on
    # must leave the listed entry describing the bytes on disk.
    directory = job_dir / "checkpoints"
    model, optimizer = model_and_optimizer(seed=0)
    ckpt = Checkpointer()
    first = ckpt.save(model, optimizer, 0, 2)
    assert Path(first).name == "checkpoint-e0-s2.pt"

    other, _ = model_and_optimizer(seed=1)
    target = directory / ckpt.index.file_for("checkpoint-e0-s2.pt")
    assert target.name == "checkpoint-e0-s2.r1.pt"
    write_checkpoint({"format": "cumulus-checkpoint", "model": other.state_dict()}, target)
    # ...killed here: the new file exists, the manifest still lists the old one.
    [entry] = CheckpointIndex(directory).entries()
    read_checkpoint(Path(entry["path"]), entry["hash"])
    restored, _ = model_and_optimizer(seed=2)
    Checkpointer().load(restored)
    assert torch.equal(restored.weight, model.weight)

    second = Checkpointer().save(other, None, 0, 2)
    assert Path(second).name == "checkpoint-e0-s2.r1.pt"
    [entry] = CheckpointIndex(directory).entries()
    assert entry["name"] == "checkpoint-e0-s2.pt" and entry["path"] == second
    assert not (directory / "checkpoint-e0-s2.pt").exists()  # the replaced file is gone
    state = Checkpointer().load(restored, checkpoint="checkpoint-e0-s2.pt")
    assert torch.equal(restored.weight, other.weight)
    assert state["name"] == "checkpoint-e0-s2.pt"

    # The third save at the same step takes the plain name again.
    third = Checkpointer().save(model, None, 0, 2)
    assert Path(third).name == "checkpoint-e0-s2.pt"
    assert [p.name for p in directory.glob("checkpoint-*")] == ["checkpoint-e0-s2.pt"]
    # Deleting it by name removes its file.
    assert CheckpointIndex(directory).remove("checkpoint-e0-s2.pt")
    assert not list(directory.glob("checkpoint-*"))


def test_an_exception_inside_torch_save_leaves_nothing_behind(job_dir):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer()
    ckpt.save(model, optimizer, 0, 1)
    before = files(job_dir / "checkpoints")
    manifest = (job_dir / "checkpoints" / "manifest.json").read_bytes()
    with pytest.raises(Exception, match=r"lambda|pickle"):
        ckpt.save(model, optimizer, 0, 2, extra={"fn": lambda: 1})  # cannot be pickled
    assert files(job_dir / "checkpoints") == before
    assert (job_dir / "checkpoints" / "manifest.json").read_bytes() == manifest


def test_flipped_byte_and_truncation_are_detected_and_load_falls_back(job_dir, capfd):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer()
    paths = [ckpt.save(model, optimizer, 0, step) for step in (1, 2, 3)]
    # Truncate the newest, flip one byte of the one before.
    Path(paths[2]).write_bytes(Path(paths[2]).read_bytes()[:-100])
    data = bytearray(Path(paths[1]).read_bytes())
    data[len(data) // 3] ^= 0x01
    Path(paths[1]).write_bytes(bytes(data))

    state = Checkpointer().load(model, optimizer)
    assert state["step"] == 1  # the newest good one
    err = capfd.readouterr().err
    assert "checkpoint-e0-s3.pt is corrupt or truncated" in err
    assert "checkpoint-e0-s2.pt is corrupt or truncated" in err
    assert "Loaded the newest good checkpoint instead: checkpoint-e0-s1.pt" in err
    with pytest.raises(CheckpointError, match=r"checkpoint-e0-s3\.pt is corrupt"):
        Checkpointer().load(model, optimizer, checkpoint="checkpoint-e0-s3.pt")


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal, resource, json
        os.environ["CUMULUS_JOB_DIR"] = {str(tmp_path)!r}
        import torch
        from cumulus_jupyter.runtime import Checkpointer, CheckpointError
        small = torch.nn.Linear(8, 8)
        ckpt = Checkpointer()
        ckpt.save(small, None, 0, 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a 1 MiB disk
        try:
            ckpt.save(torch.nn.Linear(1024, 1024), None, 0, 2)
        except CheckpointError as e:
            print(json.dumps({{"error": str(e)}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    error = json.loads(out.stdout)["error"]
    assert "could not save checkpoint" in error and "File too large" in error
    assert "previous checkpoints are unchanged" in error
    directory = tmp_path / "checkpoints"
    assert [e["name"] for e in CheckpointIndex(directory).entries()] == ["checkpoint-e0-s1.pt"]
    assert not list(directory.glob(".*.tmp"))
    entry = CheckpointIndex(directory).latest()
    read_checkpoint(Path(entry["path"]), entry["hash"])


def test_checkpoints_load_with_weights_only(job_dir):
    model, optimizer = model_and_optimizer()
    path = Checkpointer().save(model, optimizer, 1, 2)
    state = torch.load(path, weights_only=True)
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert torch.equal(state["model"]["weight"], model.weight)


def names():
    return [c["name"] for c in list_checkpoints()]


class Schedule:
    """Not a tensor, number or container: only a full unpickling recreates it."""

    def __init__(self, warmup):
        self.warmup = warmup


def test_weights_only_refuses_arbitrary_objects_and_only_a_recorded_hash_lets_them_load(
    job_dir, tmp_path_factory
):
    model, optimizer = model_and_optimizer()
    path = Checkpointer().save(model, optimizer, 0, 1, extra={"schedule": Schedule(7)})
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what torch itself says
    # In its own job the manifest's hash vouches for the file: the fallback
    # unpickles it fully and the object comes back.
    restored, _ = model_and_optimizer(seed=1)
    state = Checkpointer().load(restored)
    assert state["extra"]["schedule"].warmup == 7
    assert torch.equal(restored.weight, model.weight)
    # A copy outside the job has no recorded hash: refused, with what to do.
    copy = tmp_path_factory.mktemp("elsewhere") / "copy.pt"
    copy.write_bytes(Path(path).read_bytes())
    with pytest.raises(CheckpointError, match=r"no recorded hash.*weights_only=False") as info:
        Checkpointer(copy).load(restored)
    assert str(copy) in str(info.value)
    # A changed file is caught by its hash before anything is unpickled.
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpointer().load(restored, checkpoint="checkpoint-e0-s1.pt")


def test_a_new_checkpointer_never_removes_another_writers_temporary_files(job_dir):
    # A second process saves in a loop while this one keeps making new
    # Checkpointers (as a restarted run or verify_resume does): the writer's
    # in-flight checkpoint and manifest temporaries must survive every one.
    saves = 40
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import torch
                from cumulus_jupyter.runtime import Checkpointer
                model = torch.nn.Linear(64, 64)
                ckpt = Checkpointer()
                for step in range({saves}):
                    ckpt.save(model, None, 0, step)
                """
            ),
        ],
        env={**os.environ, "CUMULUS_JOB_DIR": str(job_dir)},
        stderr=subprocess.PIPE,
        text=True,
    )
    made = 0
    while writer.poll() is None:
        Checkpointer()
        made += 1
    assert writer.returncode == 0, writer.stderr.read()
    assert made > saves  # the cleanups really ran beside the saves
    assert names() == [f"checkpoint-e0-s{step}.pt" for step in range(saves)]
    assert not list((job_dir / "checkpoints").glob(".*.tmp"))


def test_temporaries_of_killed_writers_are_removed(job_dir):
    directory = job_dir / "checkpoints"
    directory.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = [
        directory / f".checkpoint-e0-s1.pt.{dead.stdout.strip()}.0123abcd.tmp",
        directory / ".manifest.json.k2j4l5m6.tmp",
        directory / "..checkpoint-e0-s1.pt.json.q1w2e3r4.tmp",
    ]
    # A killed writer nobody has reaped yet (a zombie) exists, but writes no more.
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE)
    stale.append(directory / f".checkpoint-e0-s3.dcp.{zombie.pid}.0123abcd.tmp")
    alive = directory / f".checkpoint-e0-s2.pt.{os.getppid()}.0123abcd.tmp"
    for path in [*stale, alive]:
        path.write_bytes(b"partial")
    stale[-1].unlink()
    stale[-1].mkdir()  # the temporary directory of a sharded save
    (stale[-1] / "__0_0.distcp").write_bytes(b"partial")
    Checkpointer()
    assert sorted(p.name for p in directory.glob(".*.tmp")) == [alive.name]
    zombie.wait()


def save_three(model, optimizer):
    ckpt = Checkpointer()
    return [Path(ckpt.save(model, optimizer, 0, step)) for step in (1, 2, 3)]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "deleted"])
def test_a_damaged_manifest_is_rebuilt_from_the_files_that_verify(job_dir, damage):
    directory = job_dir / "checkpoints"
    model, optimizer = model_and_optimizer()
    paths = save_three(model, optimizer)
    manifest = directory / "manifest.json"
    original = manifest.read_bytes()
    damaged = {
        "truncated": original[: len(original) // 2],
        "garbage": os.urandom(300),
        "wrong shape": b"[1, 2, 3]",
        "deleted": None,
    }[damage]
    if damaged is None:
        manifest.unlink()
    else:
        manifest.write_bytes(damaged)
    # One file was damaged too: it verifies no more and is not listed again,
    # but it stays on disk.
    data = bytearray(paths[1].read_bytes())
    data[len(data) // 2] ^= 0x01
    paths[1].write_bytes(bytes(data))

    # The server lists them (without torch), and the job's next save keeps them.
    assert [e["name"] for e in CheckpointIndex(directory).entries()] == [
        "checkpoint-e0-s1.pt",
        "checkpoint-e0-s3.pt",
    ]
    Checkpointer().save(model, optimizer, 0, 4)
    assert names() == ["checkpoint-e0-s1.pt", "checkpoint-e0-s3.pt", "checkpoint-e0-s4.pt"]
    assert paths[1].exists()
    restored, _ = model_and_optimizer(seed=3)
    assert Checkpointer().load(restored, checkpoint="checkpoint-e0-s1.pt")["step"] == 1
    assert torch.equal(restored.weight, model.weight)
    if damaged is not None:  # what was damaged is kept for a look
        assert (directory / "manifest.json.damaged").read_bytes() == damaged


def test_a_damaged_manifest_is_rebuilt_when_the_server_deletes_a_checkpoint(job_dir):
    directory = job_dir / "checkpoints"
    save_three(*model_and_optimizer())
    (directory / "manifest.json").write_text("{")
    index = CheckpointIndex(directory)  # what the server's DELETE uses
    assert index.remove("checkpoint-e0-s2.pt")
    assert [e["name"] for e in index.entries()] == ["checkpoint-e0-s1.pt", "checkpoint-e0-s3.pt"]


def test_retention_keep_last(job_dir):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer(keep_last=2)
    for step in range(5):
        ckpt.save(model, optimizer, 0, step)
    assert names() == ["checkpoint-e0-s3.pt", "checkpoint-e0-s4.pt"]
    assert files(job_dir / "checkpoints") == [
        ".checkpoint-e0-s3.pt.json",  # each kept file's sidecar, and no other
        ".checkpoint-e0-s4.pt.json",
        ".lock",
        "checkpoint-e0-s3.pt",
        "checkpoint-e0-s4.pt",
        "manifest.json",
    ]


def test_retention_keep_every_and_best(job_dir):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer(keep_every=4, keep_best=2, best_metric="loss")
    losses = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 7.0, 8.0, 9.0]
    for step, loss in enumerate(losses):
        report(step=step, loss=loss)  # the metric comes from the last report
        ckpt.save(model, optimizer, 0, step)
    kept = {c["step"] for c in list_checkpoints()}
    assert kept == {0, 4, 8} | {1, 3} | {9}  # every 4th, best two, newest
    assert list_checkpoints()[0]["metrics"] == {"loss": 5.0}
    best_max = Checkpointer(fname="max.pt", keep_best=1, best_mode="max")
    for step, acc in enumerate([0.1, 0.9, 0.5]):
        best_max.save(model, optimizer, 1, step, metrics={"loss": acc})
    assert [c["step"] for c in list_checkpoints() if c["name"].startswith("max")] == [1, 2]


def test_retention_never_deletes_the_checkpoint_a_resume_asked_for(job_dir):
    model, optimizer = model_and_optimizer()
    Checkpointer().save(model, optimizer, 0, 0)
    (job_dir / "control.json").write_text(json.dumps({"resume_checkpoint": "checkpoint-e0-s0.pt"}))
    ckpt = Checkpointer(keep_last=1)
    assert ckpt.load(model, optimizer)["step"] == 0
    for step in range(1, 4):
        ckpt.save(model, optimizer, 0, step)
    assert names() == ["checkpoint-e0-s0.pt", "checkpoint-e0-s3.pt"]


def test_retention_rejects_nonsense():
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(keep_last=0)
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(best_mode="lowest")


def test_async_save_writes_the_state_of_the_moment_it_was_called(job_dir):
    model, optimizer = model_and_optimizer()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(blocking=False)
    path = ckpt.save(model, optimizer, 0, 5)
    with torch.no_grad():  # training goes on and changes the parameters in place
        for p in model.parameters():
            p.fill_(123.0)
    ckpt.wait()
    assert names() == ["checkpoint-e0-s5.pt"] and Path(path).exists()
    fresh = nn.Linear(8, 4)
    Checkpointer().load(fresh)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, expected[key])


def test_a_failed_async_save_is_raised_by_wait(job_dir):
    model, optimizer = model_and_optimizer()
    ckpt = Checkpointer(blocking=False)
    ckpt.save(model, optimizer, 0, 1, extra={"fn": lambda: 1})
    with pytest.raises(Exception, match=r"lambda|pickle"):
        ckpt.wait()
    assert names() == []
    ckpt.save(model, optimizer, 0, 2)  # the Checkpointer still works
    ckpt.wait()
    assert names() == ["checkpoint-e0-s2.pt"]


def test_a_job_exit_waits_for_its_async_save(client):
    job = client.run_async(jobfuncs.save_async_then_return, kwargs={"mb": 64}, gpu_memory=0.2)
    path = job.result(timeout=120)
    checkpoints = job.get_checkpoints()
    assert [c["path"] for c in checkpoints] == [path]
    assert checkpoints[0]["size"] > 64 << 20

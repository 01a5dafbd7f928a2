"""Placement of jobs of several ranks (ShareLedger) and records from before ranks (JobRecord).

Both are plain classes: they are tested directly, without a server.
"""

from __future__ import annotations

import pytest

from cumulus_jupyter.server.gpu import CPU_DEVICE, ShareLedger
from cumulus_jupyter.server.record import JobRecord


def test_a_job_of_two_ranks_takes_two_distinct_devices_and_frees_both():
    ledger = ShareLedger(["0", "1", "2"])
    first = ledger.place(0.6, 2)
    assert first is not None and len(set(first)) == 2
    ledger.take("a", first, 0.6)
    free = [d for d in ledger.devices if d not in first]
    assert len(free) == 1  # only one device has room for another 0.6

    # Another two-rank job waits: one device with room is not two.
    assert ledger.place(0.6, 2) is None
    # GET gpus shows the job on each device it holds.
    usage = {u["device"]: u for u in ledger.usage()}
    for device in first:
        assert usage[device] == {"device": device, "used": 0.6, "jobs": {"a": 0.6}}
    assert usage[free[0]]["used"] == 0

    ledger.release("a")
    assert all(u["used"] == 0 and u["jobs"] == {} for u in ledger.usage())
    second = ledger.place(0.6, 2)
    assert second is not None and len(set(second)) == 2


def test_ranks_go_to_the_devices_with_the_most_room():
    ledger = ShareLedger(["0", "1", "2"])
    ledger.take("small", ["1"], 0.3)
    assert ledger.place(0.5, 2) == ["0", "2"]
    assert ledger.place(0.7, 3) == ["0", "2", "1"]  # 0.7 still fits beside 0.3
    assert ledger.place(0.71, 3) is None


def test_a_job_cannot_have_more_ranks_than_there_are_devices():
    assert ShareLedger(["0", "1"]).place(0.1, 3) is None


def test_on_a_host_without_gpus_the_ranks_share_the_cpu_and_take_one_share():
    ledger = ShareLedger([])
    devices = ledger.place(0.5, 4)
    assert devices == [CPU_DEVICE]
    ledger.take("a", devices, 0.5)
    assert ledger.usage() == [{"device": CPU_DEVICE, "used": 0.5, "jobs": {"a": 0.5}}]
    assert ledger.place(0.5, 4) == [CPU_DEVICE]
    assert ledger.place(0.6, 1) is None


def old_record(**changes):
    """A job.json as written before jobs had ranks: no ``nprocs``, no ``devices``."""
    data = {
        "id": "3f9a1c0b7d2e",
        "name": "train",
        "state": "paused",
        "gpu_memory": 0.5,
        "python": "/usr/bin/python3",
        "run": 1,
        "runs": [{"run": 1, "started": 1.0, "pid": 42, "device": "1"}],
        "device": "1",
    }
    data.update(changes)
    return data


def test_a_record_from_before_ranks_has_one_rank_on_its_device():
    job = JobRecord.from_json(old_record())
    assert (job.nprocs, job.devices, job.device) == (1, ["1"], "1")
    public = job.public(now=2.0)
    assert (public["nprocs"], public["devices"], public["device"]) == (1, ["1"], "1")
    assert "extra" not in public and not job.extra  # known fields, not kept as unknown ones

    never_ran = JobRecord.from_json(old_record(state="queued", run=0, runs=[], device=None))
    assert (never_ran.nprocs, never_ran.devices) == (1, [])


def test_a_record_with_ranks_reads_back_as_written():
    job = JobRecord.from_json(old_record(nprocs=2, devices=["1", "0"]))
    assert JobRecord.from_json(job.to_json()) == job
    assert (job.nprocs, job.devices) == (2, ["1", "0"])


@pytest.mark.parametrize(
    "changes",
    [{"nprocs": 0}, {"nprocs": "2"}, {"nprocs": True}, {"devices": "0,1"}, {"devices": [0, 1]}],
)
def test_a_record_with_invalid_ranks_is_refused(changes):
    with pytest.raises(ValueError, match=r"job\.json has no valid"):
        JobRecord.from_json(old_record(**changes))

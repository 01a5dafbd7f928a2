"""Bitwise-exact continuation: paused or SIGKILLed jobs, resumed 1 and 3 times,
end exactly like the run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal

import jobfuncs
import pytest
import torch
from servers import wait_until

from cumulus_jupyter.runtime import verify_resume

STEPS = 40  # 2 epochs of 20 batches


def losses(job):
    """Per (epoch, step) loss; a step run twice (after a SIGKILL) keeps its last value."""
    return {(m["epoch"], m["step"]): m["loss"] for m in job.metrics()}


def assert_same_state(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pid, per_param in a["optimizer"]["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def straight(server):
    """The uninterrupted reference run, for each num_workers."""
    client = server.client()
    out = {}
    for workers in (0, 2):
        job = client.run_async(jobfuncs.exact_train, kwargs={"num_workers": workers})
        out[workers] = (job.result(timeout=180), losses(job))
        assert len(out[workers][1]) == STEPS
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resumes", [1, 3])
@pytest.mark.parametrize("how", ["pause", "sigkill"])
def test_interrupted_runs_end_bitwise_identical(client, straight, how, resumes, workers):
    rng = random.Random(f"{how}-{resumes}-{workers}")
    job = client.run_async(
        jobfuncs.exact_train,
        kwargs={"num_workers": workers, "step_seconds": 0.05, "every_steps": 2},
        gpu_memory=0.5,
    )
    # Interrupt at random, increasing points of the run.
    marks = sorted(rng.sample(range(3, STEPS - 4), resumes))
    seen = 0
    for mark in marks:
        # A new step of this run, not only steps an earlier run reported: right
        # after a resume the job may still be queued.
        target = max(mark, seen + 1)
        wait_until(lambda t=target: len(job.metrics()) >= t, timeout=120, what=f"step {mark}")
        if how == "pause":
            job.pause()
            job.wait(timeout=120)
            assert job.status() == "paused"
        else:
            saved = len(job.get_checkpoints())
            wait_until(lambda s=saved: len(job.get_checkpoints()) > s, what="a periodic save")
            os.kill(job.info()["process"]["pid"], signal.SIGKILL)
            wait_until(lambda: job.status() == "lost", what="the job to be lost")
        seen = len(job.metrics())
        job.resume()
    result = job.result(timeout=300)
    assert result["status"] == "completed"
    assert len(job.info()["runs"]) == resumes + 1
    reference, reference_losses = straight[workers]
    assert_same_state(result, reference)
    got = losses(job)
    assert list(got) == list(reference_losses)  # no batch skipped or repeated
    assert torch.equal(
        torch.tensor(list(got.values()), dtype=torch.float64),
        torch.tensor(list(reference_losses.values()), dtype=torch.float64),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_verify_resume_passes_on_an_exact_function(workers):
    report = verify_resume(
        jobfuncs.exact_train, kwargs={"num_workers": workers}, steps=30, pause_at=13
    )
    assert report.exact, str(report)
    assert str(report).startswith("exact:")


def test_verify_resume_names_what_differs_when_randomness_escapes_the_checkpoint():
    report = verify_resume(jobfuncs.exact_train, kwargs={"leak": True}, steps=30, pause_at=13)
    assert not report
    text = str(report)
    assert "model tensor '0.weight': values differ" in text
    assert "optimizer state 'exp_avg' of parameter 0" in text
    assert "state the checkpoint does not hold" in text
    assert "differ first at report 14" in text  # the first step after the resume


def test_verify_resume_says_when_the_function_cannot_be_checked():
    with pytest.raises(RuntimeError, match="before step 30"):
        verify_resume(jobfuncs.add, args=[1], steps=30)
    with pytest.raises(ValueError, match="pause_at"):
        verify_resume(jobfuncs.exact_train, steps=10, pause_at=10)


@pytest.mark.parametrize("schedule", ["global_step", "lambda"])
def test_a_paused_job_continues_its_lr_schedule_exactly(client, schedule):
    """Warmup + cosine, from the restored global step or a restored LambdaLR: paused in the
    warmup and after it, the job trains with the lr sequence of a run never paused."""
    reference = client.run_async(jobfuncs.scheduled_train, kwargs={"schedule": schedule})
    straight = reference.result(timeout=180)
    assert straight["status"] == "completed" and len(straight["lrs"]) == STEPS

    job = client.run_async(
        jobfuncs.scheduled_train, kwargs={"schedule": schedule, "step_seconds": 0.05}
    )
    lrs, paused_at = [], []
    for mark in (3, 24):  # the warmup lasts 20 steps
        wait_until(lambda m=mark: len(job.metrics()) >= m, timeout=120, what=f"step {mark}")
        job.pause()
        job.wait(timeout=120)
        assert job.status() == "paused"
        paused = job.result(timeout=10)
        lrs += paused["lrs"]
        paused_at.append(paused["global_step"])
        job.resume()
    result = job.result(timeout=180)
    assert result["status"] == "completed"
    assert result["resumed_at"] == paused_at[-1] + 1  # load() returned the next global step
    assert lrs + result["lrs"] == straight["lrs"]
    assert_same_state(result, straight)
    assert result["schedulers"] == straight["schedulers"]

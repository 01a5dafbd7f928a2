"""Counters beyond epoch and step: the global step and lr schedulers survive a resume.

In the test process, outside a job: checkpoints go to ./cumulus-local, and a
pause is asked for the way verify_resume does it (Checkpointer.loop pauses at
the global step in CUMULUS_PAUSE_AT_STEP).
"""

from __future__ import annotations

from pathlib import Path

import jobfuncs
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cumulus_jupyter.jobdir import PAUSE_AT_ENV
from cumulus_jupyter.runtime import Checkpointer, CheckpointError
from cumulus_jupyter.runtime import context as jobcontext
from cumulus_jupyter.runtime.persist import read_checkpoint, write_checkpoint

BATCHES = 5  # per epoch of the small loader below


@pytest.fixture(autouse=True)
def local_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUMULUS_JOB_DIR", raising=False)
    monkeypatch.delenv(PAUSE_AT_ENV, raising=False)
    monkeypatch.setattr(jobcontext, "_pause_requested", False)
    return tmp_path


def small_loader() -> DataLoader:
    return DataLoader(list(range(2 * BATCHES)), batch_size=2, shuffle=True)


def batches(items):
    """Batches as plain lists, to compare them."""
    return [(*head, batch.tolist()) for *head, batch in items]


def make():
    torch.manual_seed(1)
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_loop_yields_the_global_step_and_load_returns_where_it_goes_on():
    torch.manual_seed(0)
    straight = batches(Checkpointer("a.pt").loop(small_loader(), 3, with_global_step=True))
    assert [(e, s, g) for e, s, g, _ in straight] == [
        (g // BATCHES, g % BATCHES, g) for g in range(3 * BATCHES)
    ]
    torch.manual_seed(0)
    plain = batches(Checkpointer("b.pt").loop(small_loader(), 3))  # the 3-tuple by default
    assert plain == [(e, s, b) for e, s, _, b in straight]

    model, opt = make()
    torch.manual_seed(0)
    ckpt = Checkpointer()
    for epoch, step, global_step, _ in ckpt.loop(small_loader(), 3, with_global_step=True):
        if global_step == 7:
            ckpt.save(model, opt, epoch, step)
            break
    resumed = Checkpointer()
    state = resumed.load(model, opt)
    # Batches done, the current one included: the global step of the next batch.
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 8)
    rest = batches(resumed.loop(small_loader(), 3, with_global_step=True))
    assert rest == straight[8:]  # the counter goes on: no warmup starts again


def test_a_save_after_the_loop_records_every_batch():
    model, opt = make()
    ckpt = Checkpointer()
    for _ in ckpt.loop(small_loader(), 2):
        pass
    ckpt.save(model, opt, 1, BATCHES - 1)
    assert Checkpointer().load(model, opt)["global_step"] == 2 * BATCHES


def test_global_step_given_to_save_is_what_load_returns_and_the_loop_counts_batches():
    model, opt = make()
    ckpt = Checkpointer()
    for epoch, step, global_step, _ in ckpt.loop(small_loader(), 2, with_global_step=True):
        if global_step == 6:  # 7 batches, 3 optimizer steps at 2 accumulated batches each
            ckpt.save(model, opt, epoch, step, global_step=(global_step + 1) // 2)
            break
    resumed = Checkpointer()
    assert resumed.load(model, opt)["global_step"] == 3
    first = next(resumed.loop(small_loader(), 2, with_global_step=True))
    assert first[:3] == (1, 2, 7)
    with pytest.raises(ValueError, match="global_step"):
        ckpt.save(model, opt, 0, 1, global_step=-1)


def test_without_the_loop_load_returns_the_global_step_given_else_step_plus_one():
    model, opt = make()
    ckpt = Checkpointer()
    ckpt.save(model, opt, 2, 4, global_step=250)
    assert Checkpointer().load(model, opt)["global_step"] == 250
    # A manual loop over one range of steps: step + 1 batches are done.
    ckpt.save(model, opt, 0, 99)
    assert Checkpointer().load(model, opt)["global_step"] == 100


@pytest.mark.parametrize(
    ("kept", "expected"), [({}, 8), ({"loop": {"global_step": 31, "epoch_start": None}}, 31)]
)
def test_checkpoints_saved_before_the_global_step_was_recorded(kept, expected, tmp_path):
    """Older files have no top-level global_step; inside the loop it was in its own state."""
    model, opt = make()
    state = dict(read_checkpoint(Path(Checkpointer().save(model, opt, 1, 7))))
    state.pop("global_step")
    state.pop("loop", None)
    state.update(kept)
    old = tmp_path / "old" / "checkpoint-e1-s7.pt"
    old.parent.mkdir()
    write_checkpoint(state, old)
    assert Checkpointer(old).load(model, opt)["global_step"] == expected


def run(schedule, directory, monkeypatch, pause_at=None):
    """One run of jobfuncs.scheduled_train in ``directory``, paused at ``pause_at``."""
    directory.mkdir(exist_ok=True)
    monkeypatch.chdir(directory)
    monkeypatch.setattr(jobcontext, "_pause_requested", False)
    if pause_at is None:
        monkeypatch.delenv(PAUSE_AT_ENV, raising=False)
    else:
        monkeypatch.setenv(PAUSE_AT_ENV, str(pause_at))
    return jobfuncs.scheduled_train(schedule, n=80, warmup=8)


def assert_same_final_state(a, b):
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, per_param in a["optimizer"]["state"].items():
        for key, value in per_param.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][key]), (pid, key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["schedulers"] == b["schedulers"]


@pytest.mark.parametrize("schedule", ["global_step", "lambda", "chained"])
@pytest.mark.parametrize("pauses", [[3], [5, 9, 14]])  # in the warmup, and across it
def test_lr_schedules_continue_exactly_after_pauses(schedule, pauses, tmp_path, monkeypatch):
    straight = run(schedule, tmp_path / "straight", monkeypatch)
    assert straight["status"] == "completed" and len(straight["lrs"]) == 20
    assert len(set(straight["lrs"])) > 5  # the lr does change

    lrs = []
    for pause_at in pauses:
        paused = run(schedule, tmp_path / "resumed", monkeypatch, pause_at)
        assert paused["status"] == "paused" and paused["global_step"] == pause_at - 1
        lrs += paused["lrs"]
    final = run(schedule, tmp_path / "resumed", monkeypatch)
    assert final["status"] == "completed" and final["resumed_at"] == pauses[-1]
    assert lrs + final["lrs"] == straight["lrs"]
    assert_same_final_state(final, straight)


def lambda_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.5**it)


def test_a_scheduler_is_restored_with_the_optimizer_also_from_a_list():
    model, opt = make()
    first, second = lambda_lr(opt), torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.1)
    for _ in range(5):
        opt.step()
        first.step()
        second.step()
    Checkpointer().save(model, opt, 0, 4, scheduler=[first, second])
    saved_lr = opt.param_groups[0]["lr"]

    model2, opt2 = make()
    again = lambda_lr(opt2), torch.optim.lr_scheduler.StepLR(opt2, 2, gamma=0.1)
    Checkpointer().load(model2, opt2, scheduler=again)  # a tuple does as well as a list
    assert [s.state_dict() for s in again] == [first.state_dict(), second.state_dict()]
    assert opt2.param_groups[0]["lr"] == saved_lr
    opt.step(), first.step(), second.step()
    opt2.step(), again[0].step(), again[1].step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_loading_a_scheduler_from_a_checkpoint_without_one_says_what_to_do():
    model, opt = make()
    Checkpointer().save(model, opt, 0, 9)
    model2, opt2 = make()
    with torch.no_grad():
        model2.weight.add_(1.0)
    before = model2.weight.clone()
    scheduler = lambda_lr(opt2)
    with pytest.raises(CheckpointError) as info:
        Checkpointer().load(model2, opt2, scheduler=scheduler)
    message = str(info.value)
    assert "checkpoint-e0-s9.pt holds no scheduler state" in message
    assert "load it without scheduler=" in message and "scheduler.step() 10 times" in message
    assert torch.equal(model2.weight, before)  # a refused load restores nothing
    assert scheduler.last_epoch == 0
    # Without scheduler= the same checkpoint loads, and one saved with a scheduler too.
    Checkpointer().load(model2, opt2)
    Checkpointer().save(model, opt, 0, 10, scheduler=lambda_lr(opt))
    Checkpointer().load(model2, opt2)


def test_a_different_number_of_schedulers_or_a_non_scheduler_is_refused():
    model, opt = make()
    Checkpointer().save(model, opt, 0, 1, scheduler=[lambda_lr(opt), lambda_lr(opt)])
    with pytest.raises(CheckpointError, match=r"holds 2 scheduler state.*given 1"):
        Checkpointer().load(model, opt, scheduler=lambda_lr(opt))
    with pytest.raises(TypeError, match="as a scheduler"):
        Checkpointer().save(model, opt, 0, 2, scheduler=0.5)

"""The runtime API in the test process: outside a job it works against ./cumulus-local."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cumulus_jupyter.runtime import (
    Checkpointer,
    CheckpointError,
    JobInterrupted,
    job_dir,
    list_checkpoints,
    report,
    save_on_interrupt,
    should_pause,
)
from cumulus_jupyter.runtime import context as jobcontext
from cumulus_jupyter.spec import SpecError, format_duration, parse_duration, parse_gpu_memory


@pytest.fixture(autouse=True)
def local_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUMULUS_JOB_DIR", raising=False)
    monkeypatch.setattr(jobcontext, "_pause_requested", False)
    return tmp_path


def make():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    return model, opt


def test_outside_a_job_uses_a_local_directory(local_dir):
    assert job_dir() == local_dir / "cumulus-local"
    assert should_pause() is False


def test_save_load_round_trip_restores_model_optimizer_and_every_rng(local_dir):
    model, opt = make()
    ckpt = Checkpointer()
    assert not ckpt.exists()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    path = ckpt.save(model, opt, epoch=2, step=7, extra={"note": "hi"})
    assert path == ckpt.path and path.endswith("checkpoint-e2-s7.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))

    model2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.01)
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    fresh = Checkpointer()
    assert fresh.exists()
    state = fresh.load(model2, opt2)
    assert (state["epoch"], state["step"], state["extra"]) == (2, 7, {"note": "hi"})
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_checkpoints_are_listed_newest_last_and_load_picks_the_newest():
    model, opt = make()
    ckpt = Checkpointer()
    ckpt.save(model, opt, 0, 10)
    ckpt.save(model, opt, 0, 20)
    names = [c["name"] for c in list_checkpoints()]
    assert names == ["checkpoint-e0-s10.pt", "checkpoint-e0-s20.pt"]
    entry = list_checkpoints()[-1]
    assert entry["size"] == os.path.getsize(entry["path"]) and entry["hash"].startswith("xxh3_128:")
    assert Checkpointer().load(model, opt)["step"] == 20
    assert Checkpointer().load(model, opt, checkpoint="checkpoint-e0-s10.pt")["step"] == 10


def test_a_path_loads_that_file_but_saves_stay_in_the_own_directory(tmp_path):
    model, opt = make()
    other = Checkpointer().save(model, opt, 1, 5)
    ckpt = Checkpointer(other)
    assert ckpt.exists() and ckpt.load(model, opt)["step"] == 5
    before = Path(other).read_bytes()
    ckpt.save(model, opt, 1, 6)
    assert Path(other).read_bytes() == before  # never overwritten


def test_a_corrupt_checkpoint_is_named_in_the_error():
    model, opt = make()
    path = Checkpointer().save(model, opt, 0, 1)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as info:
        Checkpointer().load(model, opt)
    assert path in str(info.value)


def test_load_without_any_checkpoint_says_what_to_do():
    with pytest.raises(CheckpointError, match="exists"):
        Checkpointer().load(*make())


def test_time_to_checkpoint():
    ckpt = Checkpointer()
    assert [s for s in range(0, 301) if ckpt.time_to_checkpoint(s, every_steps=100)] == [
        100,
        200,
        300,
    ]
    assert ckpt.time_to_checkpoint(1, every_seconds=0.0001) or ckpt.time_to_checkpoint(
        1, every_seconds=1e-9
    )
    assert not ckpt.time_to_checkpoint(1, every_seconds=3600)
    with pytest.raises(ValueError):
        ckpt.time_to_checkpoint(1, every_steps=0)


def test_report_appends_json_lines(local_dir):
    report(step=1, total=10, loss=torch.tensor(0.5))
    report(step=2, total=10, loss=np.float32(0.25))
    lines = [json.loads(x) for x in (job_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 0.5), (2, 0.25)]
    with pytest.raises(TypeError, match="scalars"):
        report(loss=torch.ones(3))


@pytest.fixture
def own_handlers():
    """Distinct SIGTERM and SIGINT handlers, so a test can tell they came back."""

    def on_term(signum, frame):  # pragma: no cover - never delivered
        raise AssertionError("the guard let SIGTERM through to the previous handler")

    def on_int(signum, frame):  # pragma: no cover - never delivered
        raise AssertionError("the guard let SIGINT through to the previous handler")

    before = {
        sig: signal.signal(sig, h)
        for sig, h in ((signal.SIGTERM, on_term), (signal.SIGINT, on_int))
    }
    yield {signal.SIGTERM: on_term, signal.SIGINT: on_int}
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_save_on_interrupt_saves_then_stops(own_handlers):
    model, opt = make()
    ckpt = Checkpointer()
    step = 41
    guard = save_on_interrupt(ckpt, model, opt, lambda: 3, lambda: step)
    with pytest.raises(JobInterrupted) as info, guard:
        assert signal.getsignal(signal.SIGTERM) is not own_handlers[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is not own_handlers[signal.SIGINT]
        step += 1
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.checkpoint.endswith("checkpoint-e3-s42.pt")
    # Exactly the handlers installed before the block are back.
    for sig, handler in own_handlers.items():
        assert signal.getsignal(sig) is handler, signal.Signals(sig).name
    assert [c["step"] for c in list_checkpoints()] == [42]


def test_save_on_interrupt_saves_the_scheduler_too(own_handlers):
    model, opt = make()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step()
        scheduler.step()
    with (
        pytest.raises(JobInterrupted),
        save_on_interrupt(Checkpointer(), model, opt, lambda: 0, lambda: 5, scheduler=scheduler),
    ):
        os.kill(os.getpid(), signal.SIGTERM)
    fresh_model, fresh_opt = make()
    fresh = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=2, gamma=0.5)
    Checkpointer().load(fresh_model, fresh_opt, scheduler=fresh)
    assert fresh.state_dict() == scheduler.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.01 * 0.5**2


def test_save_on_interrupt_puts_the_handlers_back_when_nothing_arrives(own_handlers):
    model, opt = make()
    with save_on_interrupt(Checkpointer(), model, opt, lambda: 0, lambda: 0):
        pass
    for sig, handler in own_handlers.items():
        assert signal.getsignal(sig) is handler, signal.Signals(sig).name
    assert list_checkpoints() == []


def test_should_pause_reads_the_flag_in_a_job(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULUS_JOB_DIR", str(tmp_path))
    monkeypatch.setattr(jobcontext, "_next_control_check", 0.0)
    (tmp_path / "control.json").write_text(json.dumps({"pause": False}))
    assert should_pause() is False
    monkeypatch.setattr(jobcontext, "_next_control_check", 0.0)
    (tmp_path / "control.json").write_text(json.dumps({"pause": True, "reason": "user"}))
    os.utime(tmp_path / "control.json", (1, 1))  # a new mtime, as a rewrite gives
    assert should_pause() is True
    assert jobcontext.pause_observed()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(300, 300.0), ("300", 300.0), ("30m", 1800.0), ("2h", 7200.0), ("1.5h", 5400.0)],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "-5m", 0, -1, True, [1], "5 parsecs"])
def test_parse_duration_rejects(value):
    with pytest.raises(SpecError):
        parse_duration(value)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "x", None, True, float("nan")])
def test_parse_gpu_memory_rejects(value):
    with pytest.raises(SpecError, match="gpu_memory"):
        parse_gpu_memory(value)


def test_format_duration():
    assert format_duration(90) == "1m30s"
    assert format_duration(7200) == "2h"
    assert format_duration(None) == "no limit"

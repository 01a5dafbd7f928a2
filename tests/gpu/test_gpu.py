"""GPU checks: they run on a host with an NVIDIA GPU and a CUDA build of torch.

Elsewhere each test skips and says why; ``benchmarks/gpu_check.sh`` runs them
on a GPU host and fails if any of them is skipped. Only the parsing of
``nvidia-smi``'s output needs no GPU, so it runs everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import _kill_leftover_jobs
from servers import ServerProcess, wait_until

from cumulus_jupyter.errors import CumulusError
from cumulus_jupyter.runtime.checkpointer import Checkpointer
from cumulus_jupyter.runtime.persist import entry_hash, read_checkpoint
from cumulus_jupyter.runtime.rng import capture_rng_state, restore_rng_state
from cumulus_jupyter.server.gpu import detect_gpus

ON_A_GPU_HOST = "run benchmarks/gpu_check.sh on a GPU host"
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU (torch.cuda.is_available() is False): {ON_A_GPU_HOST}",
)
needs_nvidia_smi = pytest.mark.skipif(
    shutil.which("nvidia-smi") is None,
    reason=f"needs nvidia-smi (an NVIDIA driver) on PATH: {ON_A_GPU_HOST}",
)

FINAL = ("paused", "completed", "failed", "cancelled", "timed_out", "lost")


# -- jobs (shipped to the job process by value; they import what they use) -----


def hold_share(ready, go, fraction):
    """Hold ``fraction`` of the device's memory until ``go`` exists, then use the device again."""
    import os
    import time

    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    held = torch.full((int(fraction * total),), 7, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    open(ready, "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} never appeared")
        time.sleep(0.02)
    more = torch.ones(int(0.02 * total), dtype=torch.uint8, device="cuda")
    return {
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "held_intact": bool((held == 7).all().item()),
        "allocated_more": bool((more == 1).all().item()),
    }


def hold_until(path):
    """A job that only takes a share of a device (it never touches CUDA) until ``path`` exists."""
    import os
    import time

    deadline = time.monotonic() + 300
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)
    return "released"


def allocate_past_share(within, past):
    """Allocate ``within`` of the device (inside a 0.25 share), then ``past`` more (beyond it)."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    first = torch.ones(int(within * total), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print(f"allocated {first.numel()} bytes within the share", flush=True)
    free, _ = torch.cuda.mem_get_info()
    need = int(past * total)
    if free < need + (1 << 30):
        # Else an OOM would prove nothing about the share's cap.
        raise RuntimeError(
            f"test precondition: only {free} bytes of the GPU are free, too few to tell the "
            "share's cap from a full device"
        )
    second = torch.ones(need, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    return f"allocated {first.numel() + second.numel()} bytes: past the share"


def cuda_draws(steps=20, hold_at=None):
    """Draw from CUDA's generator each step and report a digest of the bits drawn.

    At step ``hold_at`` it waits for the test to pause it, then saves a
    checkpoint (no model: the RNG states are what matters) and stops. A
    resumed run loads it and goes on from the next step.
    """
    import hashlib
    import time

    import torch

    from cumulus_jupyter.runtime import Checkpointer, report, should_pause

    torch.manual_seed(0)  # seeds CUDA's generators too: a resume must override this
    ckpt = Checkpointer()
    start = ckpt.load()["step"] + 1 if ckpt.exists() else 0
    for step in range(start, steps):
        x = torch.randn(1000, device="cuda")
        u = torch.rand(100, device="cuda")
        kept = torch.nn.functional.dropout(torch.ones(1000, device="cuda"), 0.5)
        bits = torch.cat([t.view(torch.int32) for t in (x, u, kept)]).cpu().numpy().tobytes()
        report(step=step, total=steps, draws=hashlib.sha256(bits).hexdigest())
        if step == hold_at:
            deadline = time.monotonic() + 120
            while not should_pause():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not paused at step {step}")
                time.sleep(0.01)
        if should_pause():
            ckpt.save(None, None, 0, step)
            return {"status": "paused", "step": step}
    return {"status": "completed", "started_at": start}


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    """A real server subprocess that finds the GPUs itself (no CumulusApp.gpus given)."""
    srv = ServerProcess(tmp_path_factory.mktemp("gpu-server"))
    # ServerProcess passes gpus=[] (CPU only) unless told otherwise; unset, the
    # server uses CUDA_VISIBLE_DEVICES, else what nvidia-smi lists.
    del srv.cumulus_config["gpus"]
    srv.start()
    yield srv
    srv.stop()
    _kill_leftover_jobs(srv.job_root)


@pytest.fixture
def gpu_client(gpu_server):
    """The server's client; whatever a failed test left running is cancelled after it."""
    client = gpu_server.client()
    yield client
    for job in client.jobs():
        if job.status() not in FINAL:
            with contextlib.suppress(CumulusError):
                job.cancel()
    wait_until(
        lambda: all(j.status() in FINAL for j in client.jobs()),
        timeout=60,
        what="the test's jobs to stop",
    )


def final_state(job, timeout=120):
    """Wait until ``job`` stopped; return its state."""
    return wait_until(
        lambda: (state := job.status()) in FINAL and state, timeout=timeout, what=f"{job} to stop"
    )


def draws(job):
    """Step -> digest of the CUDA random numbers drawn at that step."""
    return {m["step"]: m["draws"] for m in job.metrics()}


# -- 1. a GPU share is a cap ----------------------------------------------------------


@needs_cuda
def test_a_job_past_its_share_fails_with_cuda_oom_while_its_neighbour_runs_on(gpu_client, tmp_path):
    devices = [d["device"] for d in gpu_client.gpus()]
    assert devices == detect_gpus(), "the server did not list the GPUs this host has"
    assert devices and devices != ["cpu"]

    ready, go = tmp_path / "ready", tmp_path / "go"
    neighbour = gpu_client.run_async(hold_share, args=[str(ready), str(go), 0.2], gpu_memory=0.5)
    wait_until(
        lambda: ready.exists() or neighbour.status() in FINAL,
        timeout=120,
        what="the neighbour to hold its memory",
    )
    assert neighbour.status() == "running", neighbour.logs()
    device = neighbour.info()["device"]
    # With several GPUs, fill every other one, so the greedy job has to share
    # the neighbour's device (placement picks the device with the most room).
    fillers = [
        gpu_client.run_async(hold_until, args=[str(go)], gpu_memory=1.0) for _ in devices[1:]
    ]

    greedy = gpu_client.run_async(allocate_past_share, args=[0.15, 0.15], gpu_memory=0.25)
    state = final_state(greedy)
    info = greedy.info()
    assert info["device"] == device
    assert state == "failed", f"{state}: {info['message']}\n{greedy.logs()}"
    assert "OutOfMemoryError" in info["message"]
    assert "CUDA out of memory" in info["message"]
    assert "within the share" in greedy.logs()  # the cap is the share, not zero

    assert neighbour.status() == "running"
    go.touch()
    result = neighbour.result(timeout=120)
    assert result == {"visible_devices": device, "held_intact": True, "allocated_more": True}
    assert neighbour.status() == "completed"
    for filler in fillers:
        assert filler.result(timeout=60) == "released"


# -- 2. CUDA's RNG continues bitwise after a resume -------------------------------------


@pytest.fixture(scope="module")
def straight_draws(gpu_server):
    """The uninterrupted run's draws."""
    job = gpu_server.client().run_async(cuda_draws, gpu_memory=0.25)
    assert job.result(timeout=120) == {"status": "completed", "started_at": 0}
    out = draws(job)
    assert sorted(out) == list(range(20))
    assert len(set(out.values())) == 20  # every step drew something new
    return out


# 0.25: the worker caps the share, which starts CUDA before the job's code runs;
# 1.0: no cap, so the restore happens before CUDA starts (torch defers it).
@needs_cuda
@pytest.mark.parametrize("share", [0.25, 1.0])
def test_cuda_random_numbers_continue_bitwise_after_pause_and_resume(
    gpu_client, straight_draws, share
):
    job = gpu_client.run_async(cuda_draws, kwargs={"hold_at": 7}, gpu_memory=share)
    wait_until(
        lambda: 7 in draws(job) or job.status() in FINAL, timeout=120, what="step 7 of the job"
    )
    assert job.status() == "running", job.logs()
    job.pause()
    assert job.result(timeout=120) == {"status": "paused", "step": 7}
    assert job.status() == "paused"
    saved = job.get_checkpoints()[-1]
    state = read_checkpoint(Path(saved["path"]), entry_hash(saved))
    assert len(state["rng"]["cuda"]) == 1  # the job sees its one device

    job.resume()
    assert job.result(timeout=120) == {"status": "completed", "started_at": 8}
    assert draws(job) == straight_draws


@needs_cuda
def test_cuda_rng_state_round_trips_through_a_checkpoint_file(tmp_path):
    torch.cuda.init()
    torch.cuda.manual_seed_all(1234)
    torch.randn(10, device="cuda")  # move the generator off its seed
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    torch.save(state, tmp_path / "rng.pt")
    expected = torch.randn(1000, device="cuda").cpu()
    torch.randn(1000, device="cuda")  # and on: the restore must rewind it
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.randn(1000, device="cuda").cpu(), expected)


def test_cuda_rng_restore_starts_cuda_before_setting_the_states(monkeypatch):
    """Without a GPU, the order of calls: set before CUDA starts, torch would queue
    the states and replay an earlier queued seed after them (the GPU test above
    with share 1.0 shows the effect)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "init", lambda: calls.append("init"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.append("set"))
    restore_rng_state({"cuda": [torch.zeros(16, dtype=torch.uint8)]})
    assert calls == ["init", "set"]


# -- 3. an asynchronous save of CUDA tensors writes what a blocking save writes ----------


def _flatten(obj, prefix=""):
    """(path, leaf) pairs of a nested checkpoint state."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _flatten(value, f"{prefix}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _flatten(value, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _raw(tensor):
    """A tensor's bytes, as a uint8 tensor on the CPU."""
    return tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8)


def assert_same_contents(blocking, background):
    """Equal leaf by leaf; tensors on the CPU and equal byte for byte. Only ``time`` may differ."""
    a = dict(_flatten({k: v for k, v in blocking.items() if k != "time"}))
    b = dict(_flatten({k: v for k, v in background.items() if k != "time"}))
    assert list(a) == list(b)
    for path, x in a.items():
        y = b[path]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor), path
            assert x.device.type == y.device.type == "cpu", path
            assert (x.dtype, x.shape) == (y.dtype, y.shape), path
            assert torch.equal(_raw(x), _raw(y)), f"{path}: different bytes"
        else:
            assert x == y, path


@needs_cuda
def test_async_save_of_cuda_tensors_matches_the_blocking_save(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    ).cuda()
    model.register_buffer("bf16", torch.randn(4096, device="cuda").to(torch.bfloat16))
    # 512 MB, first in the state dict: its copy off the GPU takes milliseconds,
    # and the copies of the weights wait behind it on the side stream while
    # the test changes those weights at once. Unless training's stream waits
    # for the copies, they see the change.
    model.register_buffer("big", torch.randn(2**27, device="cuda"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(64, 2048, device="cuda")

    def train_step():
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    checkpointers = {}
    for kind in ("blocking", "background"):
        monkeypatch.setenv("CUMULUS_JOB_DIR", str(tmp_path / kind))
        checkpointers[kind] = Checkpointer(blocking=kind == "blocking")

    # The second round reuses the first one's staging buffers.
    for step in (1, 2):
        train_step()
        at_save = {k: _raw(v).clone() for k, v in model.state_dict().items()}
        blocking = checkpointers["blocking"].save(model, optimizer, 0, step, metrics={})
        background = checkpointers["background"].save(model, optimizer, 0, step, metrics={})
        # Training goes on while the file is written: the file must not see it.
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-2.0).add_(1.0)
        train_step()
        checkpointers["background"].wait()
        assert not torch.equal(_raw(model[0].weight), at_save["0.weight"])

        states = {}
        for kind, path in (("blocking", blocking), ("background", background)):
            entry = checkpointers[kind].index.latest()
            assert entry is not None and entry["path"] == path, f"{kind} save not listed"
            states[kind] = read_checkpoint(Path(path), entry_hash(entry))
        assert "cuda" in states["blocking"]["rng"]
        assert_same_contents(states["blocking"], states["background"])
        for name, expected in at_save.items():
            assert torch.equal(_raw(states["background"]["model"][name]), expected), name


# -- 4. the devices nvidia-smi lists are the devices jobs get ----------------------------


def _nvidia_smi_devices():
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = [[field.strip() for field in line.split(",")] for line in out.splitlines() if line]
    return [(index, uuid, int(mib)) for index, uuid, mib in rows]


@needs_nvidia_smi
def test_detection_lists_the_devices_nvidia_smi_lists(monkeypatch):
    listed = _nvidia_smi_devices()
    assert listed, "nvidia-smi lists no GPU"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert detect_gpus() == [index for index, _, _ in listed]


@needs_nvidia_smi
@needs_cuda
def test_torch_sees_the_devices_nvidia_smi_lists():
    listed = _nvidia_smi_devices()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # torch, the server and its jobs see only those
        assert torch.cuda.device_count() == len(detect_gpus())
        return
    assert torch.cuda.device_count() == len(listed)
    # CUDA may number the devices in another order than nvidia-smi: match by UUID.
    by_uuid = {uuid.removeprefix("GPU-").lower(): mib for _, uuid, mib in listed}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uuid = str(props.uuid).removeprefix("GPU-").lower()
        assert uuid in by_uuid, f"torch's device {i} ({uuid}) is not in nvidia-smi's list"
        mib = by_uuid[uuid]
        # nvidia-smi also counts memory the driver keeps for itself; torch does not.
        assert abs(props.total_memory / 2**20 - mib) <= 0.03 * mib, (i, props.total_memory, mib)


# -- nvidia-smi's output parsed, with a stand-in nvidia-smi (no GPU needed) --------------

NVIDIA_SMI_L = """\
GPU 0: NVIDIA H200 (UUID: GPU-8b1c2f8e-0c51-4f4e-9a55-2b3c4d5e6f70)
GPU 1: NVIDIA H200 (UUID: GPU-1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9)
GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d)
"""


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` on PATH that prints ``tmp_path/out`` and exits with ``tmp_path/rc``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        f'#!/bin/sh\necho "$@" >> {tmp_path}/args\ncat {tmp_path}/out\nexit $(cat {tmp_path}/rc)\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def answer(out, rc=0):
        (tmp_path / "out").write_text(out)
        (tmp_path / "rc").write_text(str(rc))
        return tmp_path / "args"

    return answer


def test_detection_parses_nvidia_smi_list(fake_nvidia_smi):
    args = fake_nvidia_smi(NVIDIA_SMI_L)
    assert detect_gpus() == ["0", "1", "2"]
    assert args.read_text().split() == ["-L"]


def test_detection_without_usable_nvidia_smi_output_finds_no_gpu(fake_nvidia_smi):
    fake_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate with the driver\n", 9)
    assert detect_gpus() == []
    fake_nvidia_smi("No devices were found\n", 6)
    assert detect_gpus() == []


def test_cuda_visible_devices_wins_over_nvidia_smi(fake_nvidia_smi, monkeypatch):
    args = fake_nvidia_smi(NVIDIA_SMI_L)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 0")
    assert detect_gpus() == ["2", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == []
    assert not args.exists()  # nvidia-smi was never asked

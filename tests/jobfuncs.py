"""Functions the end-to-end tests run as jobs.

This module is not installed, so the client ships it by value: the job
process never imports it. The header is the seed document's, verbatim.
"""

from cumulus.sdk import CumulusClient  # noqa: F401 - the seed's import line
from runtime import Checkpointer, should_pause


def train_with_checkpoints():
    """The seed document's "Basic Checkpointed Training", unchanged."""
    import torch
    import torch.nn as nn
    import torch.optim as optim
    from torch.utils.data import DataLoader, TensorDataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Create model and optimizer
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)

    optimizer = optim.Adam(model.parameters(), lr=0.001)
    criterion = nn.CrossEntropyLoss()

    # Create data
    X = torch.randn(1000, 784).to(device)
    y = torch.randint(0, 10, (1000,)).to(device)
    dataloader = DataLoader(TensorDataset(X, y), batch_size=32)

    # Initialize checkpointing
    ckpt = Checkpointer()

    # Training loop
    for epoch in range(10):
        for step, (data, target) in enumerate(dataloader):
            optimizer.zero_grad()
            output = model(data)
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()

            # Check for pause signal
            if should_pause():
                ckpt.save(model, optimizer, epoch, step)
                return {"status": "paused", "checkpoint": ckpt.path}

            # Periodic checkpointing
            if ckpt.time_to_checkpoint(step, every_steps=100):
                ckpt.save(model, optimizer, epoch, step)

    return {"status": "completed"}


def train_with_checkpoints_after(ready_path):
    """The seed's training, once torch is imported and ``ready_path`` says so.

    A pause that lands while a job still imports torch waits for the job's
    first ``should_pause()``; on a loaded machine that can outlast a short
    pause deadline, which then escalates. Tests pause after this file appears.
    """
    import torch  # noqa: F401  (the slow part of a start)

    open(ready_path, "w").close()
    return train_with_checkpoints()


def resumable_train(epochs=3, steps=20, step_seconds=0.02, every_steps=5):
    """Seed-style manual resume: load if a checkpoint exists, continue after its step."""
    import time

    import torch
    from torch import nn

    from cumulus_jupyter.runtime import report

    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    ckpt = Checkpointer()
    start_epoch, start_step, loaded = 0, 0, None
    if ckpt.exists():
        state = ckpt.load(model, optimizer)
        start_epoch, start_step, loaded = state["epoch"], state["step"] + 1, state["name"]
        if start_step >= steps:
            start_epoch, start_step = start_epoch + 1, 0
    print(f"starting at epoch {start_epoch} step {start_step}", flush=True)
    for epoch in range(start_epoch, epochs):
        for step in range(start_step if epoch == start_epoch else 0, steps):
            x = torch.randn(4, 8)
            loss = model(x).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            time.sleep(step_seconds)
            report(step=epoch * steps + step, total=epochs * steps, loss=loss)
            if should_pause():
                ckpt.save(model, optimizer, epoch, step)
                return {"status": "paused", "epoch": epoch, "step": step}
            if ckpt.time_to_checkpoint(step, every_steps=every_steps):
                ckpt.save(model, optimizer, epoch, step)
    return {
        "status": "completed",
        "start_epoch": start_epoch,
        "start_step": start_step,
        "loaded": loaded,
    }


def ignore_everything(pidfile, stray=False):
    """Never checks should_pause and ignores SIGTERM: only SIGKILL stops it.

    Writes its pid to ``pidfile``; with ``stray``, also starts a child in a
    session of its own (out of the job's process group) and writes its pid after.
    """
    import os
    import signal
    import subprocess
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids = [os.getpid()]
    if stray:
        pids.append(subprocess.Popen(["sleep", "600"], start_new_session=True).pid)
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(pidfile + ".tmp", pidfile)
    while True:
        time.sleep(0.05)


def broken_by_sigterm(ready_file):
    """Ignores pause; SIGTERM leaves it broken, so it fails with another exception.

    Stands for code interrupted halfway (an import, a C extension's state):
    what the run ends with is not the interruption itself.
    """
    import time

    from cumulus_jupyter.runtime import JobInterrupted

    open(ready_file, "w").close()
    try:
        while True:
            time.sleep(0.02)
    except JobInterrupted:
        raise RecursionError("maximum recursion depth exceeded") from None


def guarded_train(ready_file):
    """Never checks should_pause, but saves a checkpoint when SIGTERM arrives."""
    import time

    import torch
    from torch import nn

    from cumulus_jupyter.runtime import save_on_interrupt

    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer()
    step = 0
    with save_on_interrupt(ckpt, model, optimizer, lambda: 0, lambda: step):
        open(ready_file, "w").close()
        while True:
            step += 1
            time.sleep(0.01)


def spawn_tree(pidfile):
    """A DataLoader with 2 workers, a subprocess and a grandchild, then wait forever."""
    import os
    import subprocess
    import time

    import psutil
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Slow(Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            time.sleep(0.01)
            return torch.tensor([i])

    subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600"])
    it = iter(DataLoader(Slow(), num_workers=2, batch_size=1))
    next(it)
    me = psutil.Process()
    pids = [me.pid] + [c.pid for c in me.children(recursive=True)]
    with open(pidfile + ".tmp", "w") as f:
        f.write(" ".join(map(str, pids)))
    os.replace(pidfile + ".tmp", pidfile)
    while True:
        next(it)


def failing(x):
    """Raises, so the client must raise with the remote traceback."""

    def inner():
        raise ValueError(f"bad value {x}")

    inner()


def add(a, b=0):
    return a + b


def sleep_then(seconds, value):
    import time

    time.sleep(seconds)
    return value


def resume_training(checkpoint_path):
    """The seed's "Resuming from Checkpoint": a new job continues from a given file."""
    import torch.nn as nn
    import torch.optim as optim

    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = optim.Adam(model.parameters(), lr=0.001)
    # Load checkpoint and resume training
    ckpt = Checkpointer(checkpoint_path)
    start_epoch, start_step = None, None
    if ckpt.exists():
        state = ckpt.load(model, optimizer)
        start_epoch = state["epoch"]
        start_step = state["step"]
    return {"start_epoch": start_epoch, "start_step": start_step, "source": ckpt.path}


def environment(*names):
    """What the job process sees of its environment."""
    import os

    return {name: os.environ.get(name) for name in names}


def hold_until(path):
    """Run until ``path`` exists (the test's signal that it may finish)."""
    import os
    import time

    while not os.path.exists(path):
        time.sleep(0.02)
    return "released"


def augmented(n):
    """``n`` samples of 6 features and a target; every read adds Python, NumPy and
    torch noise, so a resume that restores any of those RNGs wrongly shows."""
    import random

    import numpy as np
    import torch
    from torch.utils.data import Dataset

    class Augmented(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            self.x = torch.randn(n, 6, generator=g)
            self.y = torch.randn(n, 1, generator=g)

        def __len__(self):
            return n

        def __getitem__(self, i):
            jitter = torch.randn(6) * 0.01 + np.random.normal() * 0.01 + random.random() * 0.01
            return self.x[i] + jitter, self.y[i]

    return Augmented()


def exact_train(
    epochs=2, num_workers=0, n=160, batch_size=8, step_seconds=0.0, every_steps=None, leak=False
):
    """Shuffle, dropout, workers and Python/NumPy/torch randomness in augmentation:
    everything that makes an inexact resume show. Returns the final state."""
    import random
    import time

    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from cumulus_jupyter.runtime import report

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)

    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(augmented(n), batch_size=batch_size, shuffle=True, num_workers=num_workers)
    ckpt = Checkpointer()
    if ckpt.exists():
        ckpt.load(model, optimizer)
    private = random.Random(0) if leak else None  # a generator no checkpoint knows about
    for epoch, step, (x, y) in ckpt.loop(loader, epochs=epochs):
        out = model(x)
        if private is not None:
            out = out * (1 + private.random() * 1e-3)
        loss = (out - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        report(epoch=epoch, step=step, loss=loss.item())
        if step_seconds:
            time.sleep(step_seconds)
        if should_pause():
            ckpt.save(model, optimizer, epoch, step)
            return {"status": "paused", "epoch": epoch, "step": step}
        if every_steps and ckpt.time_to_checkpoint(step, every_steps=every_steps):
            ckpt.save(model, optimizer, epoch, step)
    return {"status": "completed", "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def save_forever(job_dir, started):
    """Save checkpoints of a changing 8 MB model until killed (run by the SIGKILL test)."""
    import os

    os.environ["CUMULUS_JOB_DIR"] = job_dir
    import torch

    from cumulus_jupyter.runtime import Checkpointer

    torch.set_num_threads(1)
    model = torch.nn.Linear(1024, 2048)
    ckpt = Checkpointer(keep_last=3)
    step = 0
    while True:
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(model, None, 0, step)
        step += 1
        started.set()


def save_async_then_return(mb=64):
    """Starts an asynchronous save of a big state and returns at once."""
    import torch

    model = torch.nn.Linear(1024, mb * 256)
    ckpt = Checkpointer(blocking=False)
    ckpt.save(model, None, 0, 1)
    return ckpt.path


def pausable_sleep(seconds, tag=None):
    """Sleeps in small steps, honouring pauses (no checkpoint: a resume starts over)."""
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_pause():
            return {"status": "paused", "tag": tag}
        time.sleep(0.02)
    return {"status": "completed", "tag": tag}


def fill_the_disk(chunk_kb=64):
    """Prints until the disk holding its log is full."""
    line = "x" * 1023 + "\n"
    while True:
        print(line * chunk_kb, end="", flush=True)


def train_until_released(release_path, every_steps=3, step_seconds=0.05):
    """Train, report progress and checkpoint every few steps until ``release_path`` exists.

    Pauses cooperatively; after a resume it continues from its checkpoint and
    finishes once released (at least one step after the resume). Returns the
    step it resumed at and the step it finished at.
    """
    import os
    import time

    import torch

    from cumulus_jupyter.runtime import report

    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ckpt = Checkpointer()
    start = ckpt.load(model, opt)["step"] + 1 if ckpt.exists() else 0
    step = start
    while True:
        loss = model(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        report(step=step, total=1000, loss=loss.item())
        print(f"step {step} loss {loss.item():.4f}", flush=True)
        if should_pause():
            ckpt.save(model, opt, 0, step)
            return {"status": "paused", "step": step}
        if step % every_steps == every_steps - 1:
            ckpt.save(model, opt, 0, step)
        if step > start and os.path.exists(release_path):
            return {"status": "completed", "resumed_at": start, "finished_at": step}
        step += 1
        time.sleep(step_seconds)


def save_past_a_file_size_limit(limit=1 << 20):
    """One small save, then a file-size limit on itself and a 4 MiB save past it.

    It leaves SIGXFSZ as the job process set it: only a job process that
    ignores SIGXFSZ gets an error from the second save instead of being killed.
    """
    import resource
    import signal

    import torch

    ckpt = Checkpointer()
    ckpt.save(torch.nn.Linear(8, 8), None, 0, 1)
    print(f"SIGXFSZ handler: {signal.getsignal(signal.SIGXFSZ)!r}", flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    ckpt.save(torch.nn.Linear(1024, 1024), None, 0, 2)
    return "the save past the limit did not fail"


def async_save_fails_after_return(limit=1 << 20):
    """A good save, then an asynchronous save that cannot succeed; returns without waiting."""
    import resource

    import torch

    ckpt = Checkpointer(blocking=False)
    ckpt.save(torch.nn.Linear(8, 8), None, 0, 1, blocking=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    ckpt.save(torch.nn.Linear(1024, 1024), None, 0, 2)  # 4 MiB, written in the background
    return "returned before its last save was durable"


def whole_environment():
    """Every environment variable the job process sees."""
    import os

    return dict(os.environ)


def save_only_when_paused(steps=60, step_seconds=0.05):
    """Steps without periodic checkpoints: the only save is the pause's own.

    After a resume it continues right after that checkpoint's step.
    """
    import time

    import torch

    model = torch.nn.Linear(4, 1)
    ckpt = Checkpointer()
    start = ckpt.load(model)["step"] + 1 if ckpt.exists() else 0
    for step in range(start, steps):
        time.sleep(step_seconds)
        if should_pause():
            ckpt.save(model, None, 0, step)
            return {"status": "paused", "step": step}
    return {"status": "completed", "start": start}


def print_lines_around(ready_path, release_path, before=100, after=15000):
    """Print ``before`` lines, say so in ``ready_path``, wait for ``release_path``, print more.

    Each line is 98 bytes, mostly three-byte characters (so a read that ends
    at 1 MiB ends inside a character).
    """
    import os
    import time

    def line(i):
        return f"{i:06d} " + "日" * 30

    for i in range(before):
        print(line(i))
    open(ready_path, "w").close()
    while not os.path.exists(release_path):
        time.sleep(0.02)
    for i in range(before, before + after):
        print(line(i))
    return before + after


def scheduled_train(
    schedule="global_step", epochs=2, n=160, batch_size=8, warmup=20, step_seconds=0.0
):
    """Warmup + cosine learning rate carried across pauses, nanoGPT-style or by torch.

    ``schedule``: ``"global_step"`` sets the lr from the global step ``loop``
    yields (nanoGPT's ``get_lr(iter_num)``); ``"lambda"`` gets the same lr
    from a ``LambdaLR``; ``"chained"`` steps an ``ExponentialLR`` and a
    ``StepLR`` (a list of schedulers). Returns the lr of each of this run's
    batches, and the final state when it completes.
    """
    import math
    import time

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cumulus_jupyter.runtime import report

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base_lr, min_lr = 1e-2, 1e-3
    total = epochs * math.ceil(n / batch_size)

    def get_lr(it):
        if it < warmup:
            return base_lr * (it + 1) / (warmup + 1)
        ratio = min(1.0, (it - warmup) / max(1, total - warmup))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - min_lr)

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=base_lr,
    )
    sched = torch.optim.lr_scheduler
    if schedule == "lambda":
        schedulers = [sched.LambdaLR(optimizer, lambda it: get_lr(it) / base_lr)]
    elif schedule == "chained":
        schedulers = [
            sched.ExponentialLR(optimizer, gamma=0.97),
            sched.StepLR(optimizer, step_size=7, gamma=0.5),
        ]
    else:
        schedulers = []
    ckpt = Checkpointer()
    resumed_at = None
    if ckpt.exists():
        resumed_at = ckpt.load(model, optimizer, scheduler=schedulers or None)["global_step"]
    lrs = []
    for epoch, step, it, (xb, yb) in ckpt.loop(loader, epochs, with_global_step=True):
        if schedule == "global_step":
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it)
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = (model(xb) - yb).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for s in schedulers:
            s.step()
        report(epoch=epoch, step=step, lr=lrs[-1], loss=loss.item())
        if step_seconds:
            time.sleep(step_seconds)
        if should_pause():
            ckpt.save(model, optimizer, epoch, step, scheduler=schedulers or None)
            return {"status": "paused", "global_step": it, "resumed_at": resumed_at, "lrs": lrs}
    return {
        "status": "completed",
        "resumed_at": resumed_at,
        "lrs": lrs,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
    }


def metrics_across_runs(steps=60, every_steps=10, hold=None, flag_dir=None):
    """Reports every step with ``value = 1000 * run + step`` (so a record tells
    which run wrote it, whatever the server says), saves every ``every_steps``
    steps and continues after the latest checkpoint.

    ``hold`` maps a run to a step: after reporting that step, the run touches
    ``{flag_dir}/held.{run}`` and waits for ``{flag_dir}/release.{run}`` (or
    its SIGKILL), so a test interrupts it at a known step.
    """
    import os
    import time
    from pathlib import Path

    import torch

    from cumulus_jupyter.runtime import report

    run = int(os.environ["CUMULUS_RUN"])
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer()
    start = ckpt.load(model, optimizer)["step"] + 1 if ckpt.exists() else 0
    for step in range(start, steps):
        report(step=step, total=steps, value=1000 * run + step)
        if hold and hold.get(run) == step:
            Path(flag_dir, f"held.{run}").touch()
            while not Path(flag_dir, f"release.{run}").exists():
                time.sleep(0.02)  # waiting for the test, not synchronising it
        if ckpt.time_to_checkpoint(step, every_steps=every_steps):
            ckpt.save(model, optimizer, 0, step)
    return {"start": start, "run": run}


def register_at_exit(path, non_daemon_seconds=0.0):
    """Registers an atexit handler that writes ``path``; maybe leaves a non-daemon thread."""
    import atexit
    import threading
    import time

    def write():
        with open(path, "w") as f:
            f.write("ran at exit")

    atexit.register(write)
    if non_daemon_seconds:
        threading.Thread(target=time.sleep, args=(non_daemon_seconds,)).start()
    return "registered"


def print_when_released(release_path, text, done_path):
    """Print ``text`` once ``release_path`` exists, then run until ``done_path`` exists."""
    import os
    import time

    while not os.path.exists(release_path):
        time.sleep(0.02)
    print(text, flush=True)
    while not os.path.exists(done_path):
        time.sleep(0.02)
    return "done"


def fingerprint():
    """What makes a run's process what it is, to compare a forked run with a cold one."""
    import os
    import random
    import signal
    import sys
    import threading

    import numpy
    import psutil
    import torch

    umask = os.umask(0)
    os.umask(umask)
    handlers = {}
    for s in signal.Signals:
        if s not in (signal.SIGKILL, signal.SIGSTOP):
            h = signal.getsignal(s)
            handlers[s.name] = getattr(h, "__qualname__", str(h))
    parent = psutil.Process(os.getppid())
    try:  # "/autogroup-123 nice 5" where the kernel groups sessions for the scheduler
        with open("/proc/self/autogroup") as f:
            autogroup_nice = int(f.read().split()[-1])
    except OSError:
        autogroup_nice = None
    return {
        "env": dict(os.environ),
        "autogroup_nice": autogroup_nice,
        "cwd": os.getcwd(),
        "own_session": os.getsid(0) == os.getpid() == os.getpgid(0),
        "umask": umask,
        "nice": os.nice(0),
        "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
        "stdout": os.readlink("/proc/self/fd/1"),
        "stdin": os.readlink("/proc/self/fd/0"),
        "threads": threading.active_count(),
        "handlers": handlers,
        "stdout_unbuffered": not sys.stdout.line_buffering and sys.stdout.write_through,
        "parent": " ".join(parent.cmdline()),
        "random": [random.random(), float(numpy.random.random()), float(torch.rand(1))],
    }


def leave_a_global():
    """Leaves a module and a builtin behind, as careless user code might."""
    import builtins
    import sys
    import types

    sys.modules["cumulus_left_behind"] = types.ModuleType("cumulus_left_behind")
    builtins.cumulus_left_behind = True
    return "left"


def find_the_global():
    import builtins
    import sys

    found = "cumulus_left_behind" in sys.modules or hasattr(builtins, "cumulus_left_behind")
    return "there" if found else "not there"


# -- jobs of several ranks (nprocs > 1) ----------------------------------------------


def rank_facts():
    """What a rank sees: its place, its environment, a collective's result."""
    import os

    import torch
    import torch.distributed as dist

    from cumulus_jupyter import runtime

    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    facts = {
        "rank": runtime.rank(),
        "world_size": runtime.world_size(),
        "dist": [dist.get_rank(), dist.get_world_size(), dist.get_backend()],
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
        "sum": float(total),
        "pid": os.getpid(),
    }
    print(f"rank {facts['rank']} here", flush=True)
    runtime.report(step=1, total=1, who=float(runtime.rank()))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, facts)
    return everyone


def ranks_until_paused(flag_dir, step_seconds=0.02):
    """Steps until should_pause(); rank 0 returns the step every rank stopped after."""
    import os
    import time

    import torch.distributed as dist

    from cumulus_jupyter.runtime import should_pause

    step = 0
    while not should_pause():
        step += 1
        if step == 20:  # well under way: a pause now finds the ranks far apart, unless agreed
            open(os.path.join(flag_dir, f"running-{dist.get_rank()}"), "w").close()
        time.sleep(step_seconds * (1 + dist.get_rank()))  # ranks at different speeds
    steps = [None] * dist.get_world_size()
    dist.all_gather_object(steps, step)
    return {"status": "paused", "steps": steps}


def a_rank_fails(how, flag_dir, rank0_waits="in a collective"):
    """Rank 1 raises (or waits to be killed) while rank 0 waits, in a collective or not."""
    import os
    import time

    import torch.distributed as dist

    rank = dist.get_rank()
    with open(os.path.join(flag_dir, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        if how == "raise":
            raise ValueError("bad batch on rank 1")
        time.sleep(600)  # killed, or cancelled, from outside
    if rank0_waits == "in a collective":
        dist.barrier()  # for a rank that never comes
    else:
        time.sleep(600)  # in its own code: it notices nothing by itself
    return "unreachable"


def ddp_train(
    epochs=2, n=96, batch_size=4, step_seconds=0.0, every_steps=None, blocking=False, fsdp=False
):
    """A DDP (or FSDP) model over a DistributedSampler, with dropout and augmentation
    randomness that differs by rank; on one rank, the plain model. Each rank keeps its
    per-step losses in the checkpoint's ``extra``. Rank 0 returns every rank's final
    state, losses, and the state it loaded, as ``get_state_dict`` gives them."""
    import random
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from cumulus_jupyter.runtime import rank, report, world_size

    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(rank())
    np.random.seed(rank())

    def whole(state):
        """A copy of get_state_dict's state, FSDP's shards gathered: comparable across runs."""
        if isinstance(state, dict):
            return {k: whole(v) for k, v in state.items()}
        if isinstance(state, list):
            return [whole(v) for v in state]
        if hasattr(state, "full_tensor"):
            return state.full_tensor()
        return state.clone() if isinstance(state, torch.Tensor) else state

    def current():
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optimizer_sd = get_state_dict(model, optimizer)
        return whole({"model": model_sd, "optimizer": optimizer_sd})

    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    model = net
    if world_size() > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(net)
    elif world_size() > 1:
        model = DistributedDataParallel(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = augmented(n)
    sampler = DistributedSampler(data, num_replicas=world_size(), rank=rank(), seed=3)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler)
    ckpt = Checkpointer(blocking=blocking)
    losses, loaded = [], None
    if ckpt.exists():
        info = ckpt.load(model, optimizer)
        losses = info["extra"]["losses"]
        loaded = {**current(), "epoch": info["epoch"], "step": info["step"], "name": info["name"]}
    for epoch, step, (x, y) in ckpt.loop(loader, epochs=epochs):
        loss = (model(x) - y).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append([epoch, step, loss.item()])
        report(epoch=epoch, step=step, loss=loss.item())
        if step_seconds:
            time.sleep(step_seconds)
        if should_pause():
            ckpt.save(model, optimizer, epoch, step, extra={"losses": losses})
            return {"status": "paused", "epoch": epoch, "step": step}
        if every_steps and ckpt.time_to_checkpoint(step, every_steps=every_steps):
            ckpt.save(model, optimizer, epoch, step, extra={"losses": losses})
    mine = {"losses": losses, "loaded": loaded, "world_size": world_size(), **current()}
    everyone = [mine]
    if world_size() > 1:
        everyone = [None] * world_size()
        dist.all_gather_object(everyone, mine)
    return {"status": "completed", "ranks": everyone}


def sharded_save_forever():
    """Every rank saves a changing 8 MB DDP model, sharded, until killed or paused;
    a run loads the newest checkpoint first."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    model = DistributedDataParallel(torch.nn.Linear(1024, 2048))
    ckpt = Checkpointer(keep_last=3)
    step = 0
    if ckpt.exists():
        step = ckpt.load(model)["step"] + 1
        print(f"loaded checkpoint at step {step - 1}", flush=True)
    while not should_pause():
        with torch.no_grad():
            model.module.weight.add_(1.0)
        ckpt.save(model, None, 0, step)
        step += 1
    return {"status": "paused"}


def exit_and_collector_state(marker_dir):
    """What a run's garbage collector and exit handlers hold; leaves a finalizer of its own.

    The finalizer (``atexit`` true, as by default) writes ``<marker_dir>/finalized``
    when the run exits.
    """
    import gc
    import weakref

    class Node:
        pass

    def write(path):
        with open(path, "w") as f:
            f.write("done")

    keep = Node()
    weakref.finalize(keep, write, f"{marker_dir}/finalized")
    globals()["_kept_until_exit"] = keep
    cycle = Node()
    cycle.me = cycle
    del cycle
    at_exit = [
        getattr(info.func, "__module__", "")
        for f, info in list(weakref.finalize._registry.items())
        if f.atexit
    ]
    return {
        "frozen": gc.get_freeze_count(),
        "collected": gc.collect(),  # the run's own cycles are still collected
        "torch_finalizers_at_exit": sum(m.startswith("torch") for m in at_exit),
        "finalizers_at_exit": len(at_exit),
    }

"""LocalBackend with real processes: what it says of a watched run, the signals it sends."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
from servers import wait_until

from cumulus_jupyter.server.backends import ProcessHandle, local
from cumulus_jupyter.server.backends.local import LocalBackend, descendants

#: Prints each signal it gets (SIGUSR1, SIGTERM), and exits when stdin closes.
LISTENER = """
import signal, sys
for s in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(s, lambda n, f: print(signal.Signals(n).name, flush=True))
print("ready", flush=True)
sys.stdin.read()
"""


def start_listener() -> tuple[subprocess.Popen[str], ProcessHandle]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, ProcessHandle(proc.pid, psutil.Process(proc.pid).create_time())


def test_a_watched_run_is_known_ended_before_the_loop_hears_of_it():
    """is_alive answers from the process (its pidfd), not from the watch's callback."""

    async def scenario() -> list[bool]:
        backend = LocalBackend()
        proc, handle = start_listener()
        heard: list[bool] = []
        backend.watch(handle, lambda: heard.append(backend.is_alive(handle)))
        assert backend.is_alive(handle)
        assert proc.stdin is not None
        proc.stdin.close()  # it exits
        # Not yielding to the loop: the watch's callback cannot run meanwhile.
        deadline = time.monotonic() + 30
        while backend.is_alive(handle):
            assert time.monotonic() < deadline, "still alive 30 s after it exited"
            time.sleep(0.01)
        assert heard == []
        await asyncio.wait_for(_until(lambda: heard), timeout=30)
        proc.wait()
        return heard

    assert asyncio.run(scenario()) == [False]


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def test_signals_reach_a_watched_run_and_not_a_stranger():
    async def scenario() -> None:
        backend = LocalBackend()
        proc, handle = start_listener()
        backend.watch(handle, lambda: None)
        assert proc.stdout is not None
        backend.notify_pause(handle)
        assert proc.stdout.readline().strip() == signal.SIGUSR1.name
        backend.terminate(handle)
        assert proc.stdout.readline().strip() == "SIGTERM"
        # A handle with the same pid but another start time is another process:
        # it gets nothing. (What the listener prints after this is all read at
        # its exit: two pending signals run their handlers in signal order.)
        stranger = ProcessHandle(handle.pid, (handle.create_time or 0) - 100)
        backend.terminate(stranger)
        backend.notify_pause(stranger)
        backend.notify_pause(handle)
        backend.unwatch_all()
        assert proc.stdin is not None
        proc.stdin.close()
        rest = proc.stdout.read()  # to its exit
        proc.wait(timeout=30)
        assert rest.split() == [signal.SIGUSR1.name]
        wait_until(lambda: not backend.is_alive(handle), timeout=10)

    asyncio.run(scenario())


#: A shell with a child, a grandchild and a child in a session of its own.
TREE = "sleep 600 & (sleep 600 & wait) & setsid sleep 600 & echo started; wait"


@pytest.fixture
def tree():
    proc = subprocess.Popen(["sh", "-c", TREE], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"started"
    root = psutil.Process(proc.pid)
    wait_until(lambda: len(root.children(recursive=True)) == 4, timeout=10)
    yield root
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()


def test_descendants_are_those_psutil_finds(tree):
    """Found from the kernel's lists of children, not from every process on the host."""
    expected = sorted(p.pid for p in tree.children(recursive=True))
    assert sorted(p.pid for p in descendants(tree)) == expected


def test_descendants_without_the_kernel_s_lists_of_children(tree, monkeypatch):
    expected = sorted(p.pid for p in tree.children(recursive=True))

    def no_children_lists(path, *args, **kwargs):
        if str(path).endswith("/children"):
            raise FileNotFoundError(path)
        return open(path, *args, **kwargs)

    monkeypatch.setattr(local, "open", no_children_lists, raising=False)
    assert sorted(p.pid for p in descendants(tree)) == expected

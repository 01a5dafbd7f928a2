"""A warm template of runs: a process that has imported what jobs import and forks each run.

    python -m cumulus_jupyter.runtime.template SOCKET PRELOAD_JSON [NICE]

Started by the server (``CumulusApp.warm_workers``) with a job's environment
minus what is particular to one run. It takes the niceness ``NICE``
(``CumulusApp.job_nice``), imports the modules of ``PRELOAD_JSON`` and the
worker, then answers one JSON line per connection on
the unix socket ``SOCKET``:

- ``{"op": "start", "job_dir": D, "env": {...}}``: forks a run of the job in
  ``D`` with exactly that environment; answers ``{"pid": N}``;
- ``{"op": "reap", "pid": N}``: once a run it forked has ended, kills what is
  left of its process group (a DataLoader worker, say; exact, since the
  group's id is reserved until the run is reaped), reaps it, and answers its
  exit status as ``subprocess.Popen.returncode`` gives it; ``null`` while it
  runs;
- ``{"op": "kill", "pid": N}``: kills the run's whole process group now
  (exact, for the same reason) and reaps the run as soon as it has ended,
  keeping its status for ``reap``; answers ``{"killed": true}``, or ``false``
  when ``N`` is not a run of this template.

Runs are reaped only so: the server asks for each run that ends, or kills it.

It never runs user code and never touches CUDA (a forked CUDA context is
unusable), and it exits when the server that started it is gone. A forked run
is made indistinguishable from a run started cold: its own session, the
job's directory, environment and stdio, default signal dispositions, no
inherited descriptors, and fresh seeds for every random generator.

What the template holds stays the template's: it imports what every run
imports (so no run imports it again), freezes its objects for the garbage
collector before each fork (a collection in a run skips them, and their
pages stay shared instead of being copied on write), and keeps the
finalizers its imports registered from running as a run exits. A forked run
costs about a hundredth of the CPU of a cold one (``benchmarks/run_cost.py``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import weakref
from pathlib import Path
from typing import Any

_SIGNALS = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP)]


def _become_run(job_dir: str, env: dict[str, str], defaults: dict[int, Any]) -> None:
    """In the forked child: turn the template's copy into a fresh run, then run it."""
    os.setsid()
    for signum, handler in defaults.items():  # as a cold interpreter starts
        with contextlib.suppress(OSError, ValueError, TypeError):
            signal.signal(signum, handler)
    os.chdir(job_dir)
    from ..jobdir import JobDir

    stdin = os.open(os.devnull, os.O_RDONLY)
    log = JobDir(job_dir).open_output()
    os.dup2(stdin, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the socket, the connection, the rest
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [sys.argv[0], job_dir]
    from .worker import exit_now, fresh_seeds, run

    fresh_seeds(torch=True)  # forked children share the template's generator states

    code = 1
    try:
        code = run(Path(job_dir))
    finally:
        exit_now(code)


def _answer(conn: socket.socket, runs: _Runs, defaults: dict[int, Any]) -> None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        data += chunk
    request = json.loads(data)
    op = request.get("op")
    if op == "start":
        sys.stdout.flush()
        sys.stderr.flush()
        # What the template holds is never collected in a run: a collection
        # there would walk (and so write, and copy on write) every object the
        # imports made, about a tenth of a second and most of the heap's pages
        # per run. Frozen objects are skipped by the collector. The garbage
        # of the template's own requests (a traceback's cycle) goes first, so
        # none is frozen for good; with the rest frozen that takes microseconds.
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            try:
                _become_run(request["job_dir"], request["env"], defaults)
            finally:
                os._exit(1)  # never back into the template's loop
        reply: dict[str, Any] = {"pid": pid}
    elif op == "reap":
        reply = {"status": runs.reap(int(request["pid"]))}
    elif op == "kill":
        reply = {"killed": runs.kill(int(request["pid"]))}
    else:
        reply = {"error": f"unknown op {op!r}"}
    conn.sendall(json.dumps(reply).encode() + b"\n")


class _Runs:
    """The runs this template forked that have ended, or are being killed."""

    #: Statuses kept for a later ``reap``; each is asked for twice at most.
    KEEP = 10_000

    def __init__(self) -> None:
        self.exits: dict[int, int] = {}
        #: Runs killed on request: reaped here as soon as they have ended.
        self.doomed: set[int] = set()

    def reap(self, pid: int) -> int | None:
        """The exit status of run ``pid`` once it ended, its group killed and itself reaped."""
        if pid in self.exits:
            return self.exits[pid]
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return None  # still running
        except ChildProcessError:
            return None  # not a run of this template
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        self._ended(pid, status)
        return self.exits[pid]

    def kill(self, pid: int) -> bool:
        """Kill run ``pid``'s process group; it is reaped once it has ended (False: not ours).

        Not waited for here: a process with a large address space (torch, a
        CUDA context) takes a while to die, and forks queue behind this.
        """
        if pid in self.exits:
            return True  # ended and reaped: its group was killed then
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        # Exact: until this template reaps the run, no other process can
        # take its pid, and so its process group's id. The run itself too:
        # a run forked a moment ago may not lead its own group yet.
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)
        self.doomed.add(pid)
        self.reap_doomed()
        return True

    def reap_doomed(self) -> None:
        """Reap the killed runs that have ended (each is looked at once, without waiting)."""
        for pid in list(self.doomed):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.doomed.discard(pid)
                continue
            if done:
                self._ended(pid, status)

    def _ended(self, pid: int, status: int) -> None:
        self.doomed.discard(pid)
        self.exits[pid] = os.waitstatus_to_exitcode(status)
        if len(self.exits) > self.KEEP:  # forget the oldest
            self.exits.pop(next(iter(self.exits)))


def _finalizers_stay_here() -> None:
    """Keep the runs from calling, as they exit, the finalizers the imports registered.

    torch registers one per operator library (over a hundred); called at exit
    they unregister operators one by one: about 40 ms of CPU in every run,
    just before ``os._exit`` drops the whole process anyway. What the
    template imported is the template's. Finalizers a run creates itself keep
    their ``atexit`` flag and run as it exits (``worker.exit_now``).
    """
    for finalizer in list(getattr(weakref.finalize, "_registry", ())):
        finalizer.atexit = False


def main(argv: list[str]) -> int:
    path, preload = argv[0], json.loads(argv[1])
    from .worker import lower_priority

    # A burst of submits is a burst of forks here: below the server, as runs are.
    lower_priority(int(argv[2]) if len(argv) > 2 else 0)
    defaults: dict[int, Any] = {int(s): signal.getsignal(s) for s in _SIGNALS}
    # Its own signals only now, after the defaults were noted: a stray Ctrl-C
    # of the server's terminal must not end the template.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    importlib.import_module("cumulus_jupyter.runtime.worker").warm_up()
    _finalizers_stay_here()
    gc.collect()  # once over everything the imports made, so no fork pays for it
    gc.freeze()
    parent = os.getppid()
    runs = _Runs()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server.bind(path)
        server.listen(64)
        print("ready", flush=True)
        while os.getppid() == parent:  # the server is gone: so is its template
            # A killed run is reaped within a few ticks of its death.
            if select.select([server], [], [], 0.05 if runs.doomed else 1.0)[0]:
                conn, _ = server.accept()
                with conn, contextlib.suppress(OSError, ValueError, KeyError):
                    conn.settimeout(5.0)
                    _answer(conn, runs, defaults)
            runs.reap_doomed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``LocalBackend``: each run is a child process of the server, on this host."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ...fileio import readable_now
from ...jobdir import PAUSE_SIGNAL, start_worker
from . import Backend, ProcessHandle
from .warm import WarmTemplate

# Two readings of one process's start time differ by rounding only.
_START_TIME_TOLERANCE = 0.05


class LocalBackend(Backend[ProcessHandle]):
    """Runs each job as a subprocess of this host in its own session and process group."""

    def __init__(self, warm: WarmTemplate | None = None) -> None:
        #: Forks runs from a process that has imported torch already (None: every run cold).
        self.warm = warm
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._forked: set[int] = set()  # runs the warm template started
        self._reaped: dict[int, int] = {}  # forked runs the template reaped: their status
        self._killed: set[int] = set()  # forked runs the template killed (and reaps)
        #: pid -> (loop, pidfd, the handle it was opened for)
        self._watched: dict[int, tuple[asyncio.AbstractEventLoop, int, ProcessHandle]] = {}

    def handle(self, data: Any) -> ProcessHandle | None:
        return ProcessHandle.from_json(data)

    def start(self, job_dir: Path, python: str, env: dict[str, str]) -> ProcessHandle:
        pid = self.warm.fork(job_dir, python, env) if self.warm is not None else None
        if pid is not None:
            self._forked.add(pid)
            # An earlier run's, if the pid came round again.
            self._reaped.pop(pid, None)
            self._killed.discard(pid)
            try:
                return ProcessHandle(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                return ProcessHandle(pid, None)  # it already exited; is_alive will say so
        proc = start_worker(python, job_dir, env)
        self._children[proc.pid] = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None  # it already exited; is_alive will say so
        return ProcessHandle(proc.pid, create_time)

    def _process(self, handle: ProcessHandle) -> psutil.Process | None:
        """The live process behind ``handle``, or None if it is gone or a stranger."""
        try:
            proc = psutil.Process(handle.pid)
            if (
                handle.create_time is not None
                and abs(proc.create_time() - handle.create_time) > _START_TIME_TOLERANCE
            ):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def _pidfd(self, handle: ProcessHandle) -> int | None:
        """The pidfd watching ``handle``'s process, if one does (see :meth:`watch`)."""
        watched = self._watched.get(handle.pid)
        return watched[1] if watched is not None and watched[2] == handle else None

    def is_alive(self, handle: ProcessHandle) -> bool:
        fd = self._pidfd(handle)
        if fd is not None:
            # Readable once the process has ended: one poll instead of reading
            # /proc twice, for every running job on every pass of the monitor.
            return not readable_now(fd)
        child = self._children.get(handle.pid)
        if child is not None:
            if child.returncode is not None:
                return False
            # Look without reaping: until cleanup() reaps it, the pid (and so
            # the process group id) cannot be given to another process.
            try:
                return os.waitid(os.P_PID, handle.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
            except ChildProcessError:
                return child.poll() is None
        return self._process(handle) is not None

    def exit_code(self, handle: ProcessHandle) -> int | None:
        if handle.pid in self._forked and self.warm is not None:
            status = self.warm.reap(handle.pid)  # the template is its parent
            if status is not None:
                self._reaped[handle.pid] = status  # cleanup() need not ask again
            return status
        child = self._children.get(handle.pid)
        if child is None:
            return None
        if child.returncode is None:
            try:
                info = os.waitid(os.P_PID, handle.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return child.poll()
            if info is not None:
                # As Popen reports it: the exit status, or minus the signal.
                killed = info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
                return -info.si_status if killed else info.si_status
        return child.returncode

    def notify_pause(self, handle: ProcessHandle) -> None:
        self._signal(handle, PAUSE_SIGNAL)

    def terminate(self, handle: ProcessHandle) -> None:
        # Only the main process: it saves a checkpoint on SIGTERM and needs
        # nothing from its workers for that. kill() takes the rest.
        self._signal(handle, signal.SIGTERM)

    def _signal(self, handle: ProcessHandle, signum: int) -> None:
        """Send ``signum`` to the run's main process, if it is still that process."""
        fd = self._pidfd(handle)
        if fd is not None:
            # Exact by construction: a pidfd names one process, never a later
            # one that was given its pid.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signum)
        elif self._process(handle) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signum)

    def _tree(self, handle: ProcessHandle) -> list[psutil.Process]:
        """The job's process group and every descendant (some may have left the group)."""
        procs: dict[int, psutil.Process] = {}
        leader = self._process(handle)
        if leader is not None:
            procs[leader.pid] = leader
            for child in descendants(leader):
                procs[child.pid] = child
        if leader is None and psutil.pid_exists(handle.pid):
            # The pid now belongs to another process: the group id may have
            # been reused too, so its members are not ours to touch.
            return list(procs.values())
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(proc.pid) == handle.pid and proc.pid != os.getpid():
                    procs.setdefault(proc.pid, proc)
        return list(procs.values())

    def kill(self, handle: ProcessHandle) -> None:
        if handle.pid in self._forked and self.warm is not None:
            # Its parent, the template, kills its group exactly (the group's id
            # is reserved until the template reaps it, which it then does as
            # soon as the run has died), without a look at every process on
            # the host. Descendants that left the group are found first: once
            # their parent is dead they are no longer its descendants.
            leader = self._process(handle)
            strays = descendants(leader) if leader is not None else []
            if self.warm.kill(handle.pid):
                self._killed.add(handle.pid)
                for proc in strays:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                return
        for proc in self._tree(handle):
            with contextlib.suppress(psutil.Error):
                proc.kill()
        self._reap(handle)

    def adopt(self, handle: ProcessHandle) -> bool:
        return handle.create_time is not None and self._process(handle) is not None

    def cleanup(self, handle: ProcessHandle) -> None:
        if handle.pid in self._forked:
            self._forked.discard(handle.pid)
            killed = handle.pid in self._killed
            self._killed.discard(handle.pid)
            # Its parent, the template, kills the rest of its group and reaps it;
            # without an answer (the template died), look for its group below.
            if self._reaped.pop(handle.pid, None) is not None:
                return
            if self.warm is not None and self.warm.reap(handle.pid) is not None:
                return
            # Still dying (killed a moment ago), or still running: the template
            # kills what is left of its group and reaps it once it has ended.
            if killed or (self.warm is not None and self.warm.kill(handle.pid)):
                return
        # The main process is gone; stray members of its group (a DataLoader
        # worker, a subprocess the job started) must not keep GPU memory.
        child = self._children.get(handle.pid)
        if child is not None and child.returncode is None:
            # Our own child, exited but not reaped yet: its pid and group id
            # are still reserved, so one signal to the group is exact (and
            # cheap: no scan of every process on the host).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.pid, signal.SIGKILL)
            child.wait()
        else:
            for proc in self._tree(handle):
                if proc.pid != handle.pid:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
        self._reap(handle)

    def watch(self, handle: ProcessHandle, on_exit: Callable[[], None]) -> None:
        # A pidfd becomes readable when its process ends, child or not (Linux
        # 5.3+): the server hears of a run's end from the process itself,
        # not from the next pass of the monitor.
        try:
            loop = asyncio.get_running_loop()
            fd = os.pidfd_open(handle.pid)
        except (RuntimeError, AttributeError, OSError):
            return  # no loop, no pidfd, or already gone: the monitor's poll finds it
        if not self.is_alive(handle):  # ended, or the pid is another process's now
            os.close(fd)
            loop.call_soon(on_exit)
            return
        self._unwatch(handle.pid)

        def ended() -> None:
            self._unwatch(handle.pid)
            on_exit()

        self._watched[handle.pid] = (loop, fd, handle)
        loop.add_reader(fd, ended)

    def _unwatch(self, pid: int) -> None:
        watched = self._watched.pop(pid, None)
        if watched is not None:
            loop, fd, _ = watched
            with contextlib.suppress(Exception):  # the loop may be closed already
                loop.remove_reader(fd)
            os.close(fd)

    def unwatch_all(self) -> None:
        for pid in list(self._watched):
            self._unwatch(pid)

    def _reap(self, handle: ProcessHandle) -> None:
        child = self._children.get(handle.pid)
        if child is not None and child.poll() is not None:
            del self._children[handle.pid]


def descendants(proc: psutil.Process) -> list[psutil.Process]:
    """Every descendant of ``proc``, found from its children down.

    Linux lists each thread's children in ``/proc/<pid>/task/<tid>/children``:
    reading those costs in proportion to the job's tree. psutil finds children
    from every process's parent on the host instead (8 ms of CPU with 180
    processes on a 2-core machine), which is done only where those lists
    are missing.
    """
    found: list[psutil.Process] = []
    todo = [proc.pid]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
            kids: list[int] = []
            for tid in tasks:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            if pid == proc.pid and os.path.isdir(f"/proc/{pid}"):
                with contextlib.suppress(psutil.Error):  # a kernel without the lists
                    return proc.children(recursive=True)
            continue  # it, or a thread of it, has just ended
        except OSError:
            continue
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(kid))
                todo.append(kid)
    return found

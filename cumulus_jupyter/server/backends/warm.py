"""Warm starts: a template process per interpreter forks runs that have imported torch already.

A cold run pays an interpreter start and a torch import (more than a second)
on every start and every resume. :class:`WarmTemplate` keeps one process of
the server's interpreter (:mod:`cumulus_jupyter.runtime.template`) that has
imported what jobs import and forks each run on request. It is used only
when it matches the run exactly: the same interpreter and the same
environment apart from what is particular to one run; otherwise, or while it
is starting, or after it died, the run starts cold and the template is
started again in the background.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from ...jobdir import RUN_ENV_KEYS

_TIMEOUT = 5.0


def environment_key(python: str, env: Mapping[str, str], code: list[Any] | None = None) -> str:
    """What a template must share with a run: its interpreter, the environment
    without the run's own variables, and the code it imported (``code``)."""
    shared = sorted((k, v) for k, v in env.items() if k not in RUN_ENV_KEYS)
    return hashlib.sha256(json.dumps([python, shared, code]).encode()).hexdigest()


def code_stamp(modules: list[str]) -> list[Any]:
    """When the files of the worker and of ``modules`` last changed: an upgrade of
    any of them (``pip install -U``) makes a template that imported them stale."""
    stamp: list[Any] = []
    for name in ["cumulus_jupyter.runtime.worker", *modules]:
        try:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec else None
            stamp.append([name, os.stat(origin).st_mtime_ns if origin else None])
        except (ImportError, ValueError, OSError):
            stamp.append([name, None])
    return stamp


class WarmTemplate:
    """The template of one interpreter; every method is quick and never raises."""

    def __init__(
        self,
        python: str,
        preload: list[str],
        log: logging.Logger | None = None,
        nice: int = 0,
    ):
        self.python = python
        self.preload = list(preload)
        #: The template's niceness, the runs' too: its forks must not slow the server.
        self.nice = nice
        self.log = log or logging.getLogger("cumulus_jupyter")
        # A short private path: a unix socket's name is limited to about 100 bytes.
        self._dir = Path(tempfile.mkdtemp(prefix="cumulus-warm-"))
        self._socket = self._dir / "template.sock"
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._key: str | None = None
        self._ready = False
        self._starting = False
        self._closed = False

    def _key_for(self, env: Mapping[str, str]) -> str:
        return environment_key(self.python, env, code_stamp(self.preload))

    # -- lifetime --------------------------------------------------------------------

    def prepare(self, env: Mapping[str, str]) -> None:
        """Start (or restart) the template for ``env`` in the background, unless it runs."""
        key = self._key_for(env)
        with self._lock:
            if self._closed or self._starting or (self._key == key and self._alive()):
                return
            self._starting = True
        threading.Thread(
            target=self._start, args=(dict(env), key), name="cumulus-warm-start", daemon=True
        ).start()

    def _start(self, env: dict[str, str], key: str) -> None:
        try:
            self.stop()
            shared = {k: v for k, v in env.items() if k not in RUN_ENV_KEYS}
            # Nothing in the template may see a GPU: each run sets its own devices.
            shared.update(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
            with self._lock:
                if self._closed:
                    return
                # Registered at once, so that stop() and close() reach it while it starts.
                self._proc = proc = subprocess.Popen(
                    [
                        self.python,
                        "-m",
                        "cumulus_jupyter.runtime.template",
                        str(self._socket),
                        json.dumps(self.preload),
                        str(self.nice),
                    ],
                    env=shared,
                    cwd=self._dir,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                    text=True,
                )
                self._key = key
            ready = proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            with self._lock:
                self._ready = ready and self._proc is proc
            if ready:
                usage = self.usage()
                rss = usage["rss"] / 2**20 if usage else 0
                self.log.info(
                    "cumulus: warm template ready (pid %s, %.0f MiB, preloaded %s)",
                    proc.pid,
                    rss,
                    ", ".join(self.preload) or "nothing",
                )
            elif not self._closed:
                self.log.warning("cumulus: the warm template did not start; runs start cold")
        except OSError as e:
            self.log.warning("cumulus: cannot start the warm template (%s); runs start cold", e)
        finally:
            with self._lock:
                self._starting = False

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """End the template (the runs it forked go on: each has its own session)."""
        with self._lock:
            proc, self._proc, self._ready = self._proc, None, False
        if proc is not None:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def close(self) -> None:
        """End the template for good (the server stops)."""
        with self._lock:
            self._closed = True
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- requests -----------------------------------------------------------------------

    def _ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(_TIMEOUT)
                conn.connect(str(self._socket))
                conn.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        return None
                    data += chunk
            answer = json.loads(data)
            return answer if isinstance(answer, dict) else None
        except (OSError, ValueError):
            return None

    def fork(self, job_dir: Path, python: str, env: Mapping[str, str]) -> int | None:
        """The pid of a run forked for ``job_dir``, or None: start it cold then."""
        if python != self.python:
            return None
        key = self._key_for(env)
        with self._lock:
            usable = self._ready and self._key == key and self._alive()
        if not usable:
            self.prepare(env)  # for the next run
            return None
        answer = self._ask({"op": "start", "job_dir": str(job_dir), "env": dict(env)})
        pid = answer.get("pid") if answer else None
        if not isinstance(pid, int):
            self.log.warning("cumulus: the warm template did not answer; starting cold")
            self.stop()
            self.prepare(env)
            return None
        return pid

    def reap(self, pid: int) -> int | None:
        """Once a run the template forked has ended: its exit status, with what was left
        of its process group killed and the run reaped (None while it runs, or unknown)."""
        answer = self._ask({"op": "reap", "pid": pid})
        status = answer.get("status") if answer else None
        return status if isinstance(status, int) else None

    def kill(self, pid: int) -> bool:
        """Kill the process group of a run the template forked; the template reaps the
        run once it has ended. False if it could not (no answer, or not its run)."""
        answer = self._ask({"op": "kill", "pid": pid})
        return bool(answer and answer.get("killed") is True)

    def usage(self) -> dict[str, Any] | None:
        """The template's pid, memory (RSS bytes) and what it imported; None when none is ready."""
        with self._lock:
            proc = self._proc if self._ready and self._alive() else None
        if proc is None:
            return None
        try:
            rss = psutil.Process(proc.pid).memory_info().rss
        except psutil.Error:
            return None
        return {"pid": proc.pid, "rss": rss, "python": self.python, "preload": self.preload}


def default_preload() -> list[str]:
    """What jobs usually import, where installed (``CumulusApp.preload``'s default)."""
    import importlib.util

    return [m for m in ("torch", "numpy", "cloudpickle") if importlib.util.find_spec(m)]


__all__ = ["WarmTemplate", "default_preload", "environment_key"]

"""A real ``jupyter server`` (or ``jupyter cumulus``) subprocess on 127.0.0.1 for tests."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from cumulus_jupyter import CumulusClient

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Any, timeout: float = 30.0, interval: float = 0.05, what: Any = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    ``what`` describes the wait in the failure message; a callable is called
    then, so the message can show the state at the deadline, not at the start.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {described or predicate}")
        time.sleep(interval)


def labextension_list(env: dict[str, str] | None = None) -> str:
    """What ``jupyter labextension list`` prints, without its colours."""
    out = subprocess.run(
        [str(BIN / "jupyter"), "labextension", "list"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)


class ServerProcess:
    """Starts, stops and restarts a Jupyter server subprocess with the extension."""

    def __init__(
        self,
        base: Path,
        command: str = "server",
        job_root: Path | None = None,
        extra: list[str] | None = None,
        **cumulus_config: Any,
    ):
        self.base = base
        self.command = command
        self.job_root = Path(job_root) if job_root else base / "jobs"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.cumulus_config = {"gpus": "[]", **cumulus_config}
        self.extra = list(extra or [])  # more command-line options (e.g. --RayBackend.address)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / "server.log"
        self.url = f"http://127.0.0.1:{self.port}/"

    def argv(self) -> list[str]:
        args = [
            str(BIN / "jupyter"),
            self.command,
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={self.base}",
            f"--IdentityProvider.token={self.token}",
            "--ServerApp.allow_unauthenticated_access=False",
            f"--CumulusApp.job_root={self.job_root}",
        ]
        args += [f"--CumulusApp.{k}={v}" for k, v in self.cumulus_config.items()]
        args += self.extra
        if os.geteuid() == 0:
            args.append("--allow-root")
        return args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["JUPYTER_RUNTIME_DIR"] = str(self.base / "runtime")
        env["JUPYTER_CONFIG_DIR"] = str(self.base / "config")
        env.pop("CUMULUS_SERVER_URL", None)
        env.pop("CUMULUS_TOKEN", None)
        return env

    def start(self, timeout: float = 60) -> ServerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server owns it until stop()
        # In a session of its own, as a server started as a service is: with
        # autogroup scheduling the clients driving it (tests, benchmarks) then
        # do not share its part of the CPU.
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self.base,
            start_new_session=True,
        )
        log.close()
        wait_until(self._ready, timeout=timeout, what=f"the server on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
        req = urllib.request.Request(
            self.url + "cumulus/api/jobs", headers={"Authorization": f"token {self.token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> CumulusClient:
        return CumulusClient(self.url, token=self.token)

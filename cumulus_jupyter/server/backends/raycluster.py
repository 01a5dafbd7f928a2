"""``RayBackend``: each run is a Ray job, placed by Ray on any node of a cluster.

Ray schedules (fractional) GPUs and starts, stops and reports processes on
every node through its Jobs API; cumulus keeps what Ray has not: pause,
checkpoints, restarts. The job root must be on storage every node mounts at
the same path: a run reads its payload and writes its log, state, result and
checkpoints there, exactly as a local run does, and the server reads them
from there. :meth:`RayBackend.check_root` proves it at start.

Ray's job status is read by one thread of this backend for every run it
knows of, a few times a second; the methods the manager calls on its event
loop answer from what that thread last saw and never wait for Ray (stops are
sent from that thread too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import secrets
import shlex
import sys
import threading
import time
from abc import ABCMeta
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traitlets import Float, MetaHasTraits, Unicode
from traitlets.config import LoggingConfigurable

from ...jobdir import (
    CONTROL_POLL_ENV,
    GPU_FRACTION_ENV,
    JOB_ID_ENV,
    KILL_GRACE_ENV,
    NPROCS_ENV,
    OUTPUT,
    RUN_ENV,
    worker_command,
)
from . import Backend
from .rayprobe import PROBE_MARK

#: Ray's job states that still hold (or wait for) resources.
_ACTIVE = ("PENDING", "RUNNING")
#: What the status thread has not read yet for a run (just submitted).
_UNSEEN = object()
#: How often a run looks at control.json: a pause cannot be signalled across nodes.
CONTROL_POLL_SECONDS = 0.1
#: Ray's own variables of the server's environment describe the server's
#: Ray session, not the run's; CUDA's are Ray's to set on the node.
_NOT_PASSED = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")


class RootNotShared(RuntimeError):
    """A node of the cluster does not see the job root the server writes."""


@dataclass(frozen=True)
class RayRun:
    """One run as Ray knows it: its submission id, made from the job id and run number."""

    submission_id: str

    def to_json(self) -> dict[str, Any]:
        return {"ray_submission_id": self.submission_id}

    @classmethod
    def from_json(cls, data: Any) -> RayRun | None:
        if isinstance(data, dict) and isinstance(data.get("ray_submission_id"), str):
            return cls(data["ray_submission_id"])
        return None


def submission_id(job_id: str, run: int) -> str:
    """The Ray submission id of a job's run: a retried start finds the run it started."""
    return f"cumulus-{job_id}-run{run}"


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", text or "").strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _ConfigurableBackend(ABCMeta, MetaHasTraits):
    """A backend with traitlets configuration (``--RayBackend.address=...``)."""


class RayBackend(Backend[RayRun], LoggingConfigurable, metaclass=_ConfigurableBackend):
    """Runs each job's runs as Ray jobs on a Ray cluster (``CumulusApp.backend = "ray"``)."""

    places_runs = True

    address = Unicode(
        "http://127.0.0.1:8265",
        config=True,
        help="The Ray cluster's dashboard address (its Jobs API), e.g. http://HEAD:8265.",
    )
    num_cpus = Float(
        1.0,
        config=True,
        help="CPUs Ray reserves for each rank of a run (entrypoint_num_cpus).",
    )
    poll_interval = Float(
        0.25,
        config=True,
        help="Seconds between two looks at the status of the runs Ray holds.",
    )
    probe_timeout = Float(
        180.0,
        config=True,
        help="Seconds the start-up check that every node sees the job root may take.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise RuntimeError(
                "CumulusApp.backend = 'ray' needs Ray's job client: "
                "pip install 'cumulus-jupyter[ray]'"
            ) from None
        try:
            self.client = JobSubmissionClient(self.address)
        except Exception as e:  # ConnectionError, RuntimeError: Ray's words say why
            raise RuntimeError(
                f"cannot reach the Ray cluster at RayBackend.address={self.address!r}: "
                f"{_one_line(str(e))}. Start it (ray start --head --dashboard-host=...) "
                "or point RayBackend.address at its dashboard"
            ) from None
        self._lock = threading.Lock()
        self._info: dict[str, Any] = {}  # submission id -> Ray's JobInfo (None: unknown to Ray)
        self._tracked: set[str] = set()
        self._watchers: dict[str, tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = {}
        self._stops: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._unreachable = False

    # -- the interface -------------------------------------------------------------

    def handle(self, data: Any) -> RayRun | None:
        return RayRun.from_json(data)

    def start(self, job_dir: Path, python: str, env: dict[str, str]) -> RayRun:
        sid = submission_id(env[JOB_ID_ENV], int(env[RUN_ENV]))
        nprocs = int(env.get(NPROCS_ENV, "1"))
        share = float(env.get(GPU_FRACTION_ENV, "1"))
        run_env = {
            k: v for k, v in env.items() if k not in _NOT_PASSED and not k.startswith("RAY_")
        }
        run_env[CONTROL_POLL_ENV] = repr(CONTROL_POLL_SECONDS)
        # Ray's stop sends SIGTERM, then SIGKILL after this many seconds (3 by
        # default): the grace the server gives every run instead.
        run_env["RAY_JOB_STOP_SIGNAL"] = "SIGTERM"
        run_env["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, round(float(env.get(KILL_GRACE_ENV, 10)))))
        command = " ".join(shlex.quote(part) for part in worker_command(python, job_dir))
        # The run appends to output.log itself, as a local run does: its log is
        # the same file wherever it runs, and survives Ray's own log rotation.
        entrypoint = (
            f"cd {shlex.quote(str(job_dir))} && exec {command} "
            f">> {shlex.quote(str(job_dir / OUTPUT))} 2>&1 < /dev/null"
        )
        try:
            self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env={"env_vars": run_env},
                metadata={"cumulus_job": env[JOB_ID_ENV], "cumulus_run": env[RUN_ENV]},
                # Ray cannot give one job parts of several GPUs: ranks take whole ones.
                entrypoint_num_gpus=share if nprocs == 1 else float(nprocs),
                entrypoint_num_cpus=self.num_cpus * nprocs,
            )
        except Exception as e:
            if "already exists" not in str(e):
                raise OSError(f"Ray at {self.address} refused the run: {_one_line(str(e))}") from e
            # Submitted before (the server died before it recorded so): that
            # very run goes on; it is never started twice.
        self._track(sid)
        return RayRun(sid)

    def is_alive(self, handle: RayRun) -> bool:
        info = self._seen(handle)
        if info is _UNSEEN:
            return True  # submitted a moment ago: the next look says how it is
        return info is not None and _status(info) in _ACTIVE

    def exit_code(self, handle: RayRun) -> int | None:
        info = self._seen(handle)
        code = getattr(info, "driver_exit_code", None)
        return code if isinstance(code, int) else None

    def placed(self, handle: RayRun) -> str | None:
        info = self._seen(handle)
        if info is _UNSEEN or info is None or _status(info) == "PENDING":
            return None
        return _node_name(info)

    def waiting_reason(self, handle: RayRun) -> str:
        info = self._seen(handle)
        if info is _UNSEEN or info is None:
            return ""
        return f"Ray: {_one_line(info.message or '')}" if info.message else ""

    def end_note(self, handle: RayRun) -> str:
        info = self._seen(handle)
        if info is _UNSEEN:
            return ""
        if info is None:
            return f"Ray has no job {handle.submission_id} (was the cluster restarted?)"
        kind = f" {info.error_type}" if getattr(info, "error_type", None) else ""
        return f"Ray: {_status(info)}{kind}: {_one_line(info.message or '')}"

    def notify_pause(self, handle: RayRun) -> None:
        """Nothing to send: the run reads ``control.json`` every 0.1 s (no signal crosses nodes)."""

    def terminate(self, handle: RayRun) -> None:
        # Ray's stop: SIGTERM to the run and its children, SIGKILL after kill_grace.
        self._stops.put(handle.submission_id)
        self._ensure_thread()
        self._wake.set()

    def kill(self, handle: RayRun) -> None:
        # Ray has no immediate kill: its stop ends in SIGKILL kill_grace after
        # the SIGTERM (which the manager sent kill_grace ago), to the whole tree.
        self.terminate(handle)

    def adopt(self, handle: RayRun) -> bool:
        sid = handle.submission_id
        info = self._fetch(sid)
        with self._lock:
            self._info[sid] = info
        if info is not None and _status(info) in _ACTIVE:
            self._track(sid)
            return True
        return False

    def watch(self, handle: RayRun, on_exit: Callable[[], None]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the monitor's poll of is_alive finds the end
        with self._lock:
            self._watchers[handle.submission_id] = (loop, on_exit)
        self._track(handle.submission_id)

    def unwatch_all(self) -> None:
        with self._lock:
            self._watchers.clear()
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- the start-up check ------------------------------------------------------------

    def check_root(self, root: Path) -> list[dict[str, Any]]:
        """Prove that every alive node sees ``root`` (the job root) as this server does.

        Submits one small Ray job that runs a task on every node; each reads a
        token this server wrote under ``root`` and writes one back. Returns
        what each node found; raises :class:`RootNotShared` naming every node
        that could not, or the probe's own failure.
        """
        token = secrets.token_hex(8)
        probe_dir = root / ".probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / token).write_text(token)
        sid = f"cumulus-probe-{token}"
        module = "cumulus_jupyter.server.backends.rayprobe"
        try:
            self.client.submit_job(
                entrypoint=shlex.join([sys.executable, "-m", module, str(root), token]),
                submission_id=sid,
                entrypoint_num_cpus=0,
            )
            deadline = time.monotonic() + self.probe_timeout
            while _status(self.client.get_job_info(sid)) in _ACTIVE:
                if time.monotonic() > deadline:
                    self.client.stop_job(sid)
                    raise RootNotShared(
                        f"the check that every Ray node sees the job root {root} did not finish "
                        f"in {self.probe_timeout:.0f} s (RayBackend.probe_timeout); is the "
                        "cluster busy or short of nodes?"
                    )
                time.sleep(0.2)
            logs = self.client.get_job_logs(sid)
            wrote = {p.name[len(token) + 1 :] for p in probe_dir.glob(f"{token}-*")}
        finally:
            for leftover in probe_dir.glob(f"{token}*"):
                leftover.unlink(missing_ok=True)
        found = [line for line in logs.splitlines() if line.startswith(PROBE_MARK)]
        if not found:
            raise RootNotShared(
                f"the check that every Ray node sees the job root {root} failed: "
                f"{_one_line(logs[-2000:])}"
            )
        nodes: list[dict[str, Any]] = json.loads(found[-1][len(PROBE_MARK) :])
        for node in nodes:
            # Written there, read here: the node's directory is this one.
            if node.get("ok") and node.get("node") not in wrote:
                node.update(ok=False, problem=f"what it wrote under {root} is not here")
        blind = [n for n in nodes if not n.get("ok")]
        if blind:
            names = "; ".join(f"node {n['node']} ({n['ip']}): {n['problem']}" for n in blind)
            raise RootNotShared(
                f"these Ray nodes do not see the job root {root} as this server does: {names}. "
                "Put CumulusApp.job_root on storage every node mounts at the same path "
                "(NFS or similar)"
            )
        return nodes

    # -- the status thread ---------------------------------------------------------------

    def _track(self, sid: str) -> None:
        with self._lock:
            self._tracked.add(sid)
        self._ensure_thread()

    def _seen(self, handle: RayRun) -> Any:
        with self._lock:
            return self._info.get(handle.submission_id, _UNSEEN)

    def _fetch(self, sid: str) -> Any:
        """Ray's JobInfo for ``sid``; None if Ray has no such job (raises if unreachable)."""
        try:
            return self.client.get_job_info(sid)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return None
            raise

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._closed = False
            self._thread = threading.Thread(
                target=self._watch_loop, name="cumulus-ray", daemon=True
            )
            self._thread.start()

    def _watch_loop(self) -> None:
        while not self._closed:
            while True:
                try:
                    sid = self._stops.get_nowait()
                except queue.Empty:
                    break
                try:
                    self.client.stop_job(sid)
                except Exception as e:  # an ended job cannot be stopped: that is fine
                    self.log.debug("cumulus: stopping Ray job %s: %s", sid, e)
            with self._lock:
                tracked = list(self._tracked)
            for sid in tracked:
                try:
                    info = self._fetch(sid)
                except Exception as e:  # the cluster is unreachable: try again later
                    if not self._unreachable:  # once per outage, not 4 times a second
                        self.log.warning(
                            "cumulus: cannot read Ray's jobs at %s (runs are kept as they "
                            "were until it answers): %s",
                            self.address,
                            _one_line(str(e)),
                        )
                    self._unreachable = True
                    continue
                if self._unreachable:
                    self.log.info("cumulus: Ray at %s answers again", self.address)
                    self._unreachable = False
                ended = info is None or _status(info) not in _ACTIVE
                with self._lock:
                    self._info[sid] = info
                    watcher = self._watchers.pop(sid, None) if ended else None
                    if ended:
                        self._tracked.discard(sid)
                if watcher is not None:
                    loop, on_exit = watcher
                    with contextlib.suppress(RuntimeError):  # the loop is closed
                        loop.call_soon_threadsafe(on_exit)
            self._wake.wait(self.poll_interval)
            self._wake.clear()


def _status(info: Any) -> str:
    status = info.status
    return str(getattr(status, "value", status))


def _node_name(info: Any) -> str | None:
    """``ip (node id prefix)``: several nodes may share one address."""
    node = getattr(info, "driver_node_id", None) or ""
    address = getattr(info, "driver_agent_http_address", None) or ""
    ip = re.sub(r"^\w+://|:\d+$", "", address)
    if not node and not ip:
        return None
    return f"{ip} ({node[:8]})" if node else ip

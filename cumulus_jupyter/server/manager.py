"""The job manager: lifecycle, queue, GPU-share admission, duration limits, escalation.

It runs in the Jupyter server's event loop. Every operation is a quick,
synchronous state change (so two requests on one job can never interleave);
only the waits (``wait_for_change``, logs) await. A monitor task notices when
processes end, enforces duration limits and escalates pauses nobody answered.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import (
    BadRequestError,
    InvalidStateError,
    JobNotFoundError,
    PayloadTooLargeError,
)
from ..jobdir import RUN_ENV
from ..manifest import CheckpointIndex
from ..metrics import newest_per_step, with_run
from ..shipping import parse_modules
from ..spec import SpecError, parse_duration, parse_gpu_memory, parse_name, python_version
from ..states import ACTIVE, RESUMABLE, JobState, actions, can_transition
from .backends import Backend, LocalBackend, ProcessHandle
from .gpu import ShareLedger
from .store import JobStore

#: Environment variables a job must not inherit from the server: its own
#: token, and JupyterHub's API token under its current and its legacy name.
_SECRET_ENV = ("CUMULUS_TOKEN", "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")
_SUBMIT_FIELDS = {
    "payload",
    "modules",
    "name",
    "gpu_memory",
    "duration",
    "python",
    "python_version",
}
_MONITOR_INTERVAL = 0.2
_LOG_CHUNK = 1 << 20
#: Below this much free space a job that died is said to have met a full disk.
_LOW_DISK = 16 << 20


class JobManager:
    """Owns every job of one job root."""

    def __init__(
        self,
        root: str | Path,
        *,
        backend: Backend | None = None,
        devices: list[str] | None = None,
        pause_timeout: float = 60.0,
        kill_grace: float = 10.0,
        max_payload_bytes: int = 256 << 20,
        job_nice: int = 5,
        log: logging.Logger | None = None,
    ):
        self.store = JobStore(root)
        self.backend = backend or LocalBackend()
        self.ledger = ShareLedger(list(devices or []))
        self.pause_timeout = pause_timeout
        self.kill_grace = kill_grace
        self.max_payload_bytes = max_payload_bytes
        self.job_nice = job_nice
        self.log = log or logging.getLogger("cumulus_jupyter")
        self.jobs: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._monitor: asyncio.Task[None] | None = None

    # -- start / stop ----------------------------------------------------------

    def load(self) -> None:
        """Rebuild the in-memory view from the job root and re-adopt live jobs."""
        for job_id in self.store.job_ids():
            try:
                record = _checked_record(self.store.read_record(job_id))
            except (ValueError, TypeError, KeyError) as e:
                # Reported, not skipped: the user sees it and can delete it;
                # its files stay as they are for inspection.
                self.log.error("cumulus: job %s is damaged: %s", job_id, e)
                self.jobs[job_id] = self._damaged(job_id, e)
                continue
            record["id"] = job_id
            self.jobs[job_id] = record
            state = JobState(record["state"])
            if state in (JobState.RUNNING, JobState.PAUSING):
                handle = ProcessHandle.from_json(record.get("process"))
                if handle is not None and self.backend.adopt(handle):
                    self.ledger.take(job_id, record.get("device") or "", record["gpu_memory"])
                    self.log.info("cumulus: re-adopted job %s (pid %s)", job_id, handle.pid)
                else:
                    self._finish(job_id)
        self._admit()

    def _damaged(self, job_id: str, error: BaseException) -> dict[str, Any]:
        path = self.store.path(job_id)
        try:
            created = path.stat().st_mtime
        except OSError:
            created = 0.0
        return {
            "id": job_id,
            "name": job_id,
            "state": JobState.LOST.value,
            "damaged": True,
            "created": created,
            "gpu_memory": 0.0,
            "duration": None,
            "run": 0,
            "runs": [],
            "device": None,
            "started": None,
            "ended": None,
            "message": (
                f"this job's record is damaged ({error}); it cannot be controlled. Its files "
                "are kept for inspection: delete the job to remove them"
            ),
        }

    def _refuse_damaged(self, job: dict[str, Any]) -> None:
        if job.get("damaged"):
            raise InvalidStateError(f"job {job['id']} is damaged: {job['message']}")

    async def start(self) -> None:
        self.load()
        self._monitor = asyncio.create_task(self._monitor_loop())

    async def stop(self) -> None:
        """Stop watching. Jobs keep running and are re-adopted at the next start."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None

    # -- queries ---------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r}; list jobs with GET /cumulus/api/jobs")
        return job

    def public(self, job_id: str) -> dict[str, Any]:
        """The record the API shows for one job."""
        job = self.get(job_id)
        out = {k: v for k, v in job.items() if not k.startswith("_")}
        now = time.time()
        started = job.get("started")
        if started:
            end = job.get("ended") if job["state"] not in ("running", "pausing") else None
            out["elapsed"] = round((end or now) - started, 3)
        else:
            out["elapsed"] = None
        out["actions"] = [
            a.value
            for a in actions(
                JobState(job["state"]),
                cancelling=bool(job.get("cancel_requested")),
                damaged=bool(job.get("damaged")),
            )
        ]
        return out

    def list_jobs(self) -> list[dict[str, Any]]:
        return sorted(
            (self.public(j) for j in self.jobs), key=lambda r: (r.get("created") or 0, r["id"])
        )

    def gpu_usage(self) -> list[dict[str, Any]]:
        return self.ledger.usage()

    # -- submit ----------------------------------------------------------------

    async def submit(self, body: Any, owner: str = "") -> dict[str, Any]:
        """Validate a submission, store it (durably, off the event loop), and queue the job."""
        if not isinstance(body, dict):
            raise BadRequestError("the request body must be a JSON object")
        unknown = set(body) - _SUBMIT_FIELDS
        if unknown:
            raise BadRequestError(
                f"unknown field(s) {sorted(unknown)}; known fields: {sorted(_SUBMIT_FIELDS)}"
            )
        payload = self._decode_payload(body.get("payload"))
        try:
            files, origins = parse_modules(
                body.get("modules"), self.max_payload_bytes - len(payload)
            )
        except OverflowError:
            raise PayloadTooLargeError(self._too_large_message()) from None
        except ValueError as e:
            raise BadRequestError(str(e)) from None
        try:
            gpu_memory = parse_gpu_memory(body.get("gpu_memory", 1.0))
            duration = parse_duration(body.get("duration"))
            name = parse_name(body.get("name"), default="job")
        except SpecError as e:
            raise BadRequestError(str(e)) from None
        client_version = body.get("python_version")
        if not isinstance(client_version, str) or not client_version:
            raise BadRequestError(
                "python_version is required (e.g. '3.11'): jobs are pickled with cloudpickle, "
                "which needs the same Python version on both ends"
            )
        python = self._choose_python(body.get("python"), client_version)
        job_id = self.store.new_id()
        record: dict[str, Any] = {
            "id": job_id,
            "name": name,
            "owner": owner,
            "created": time.time(),
            "gpu_memory": gpu_memory,
            "duration": duration,
            "python": python,
            "python_version": client_version,
            "state": JobState.QUEUED.value,
            "queued_at": time.time(),
            "run": 0,
            "runs": [],
            "device": None,
            "process": None,
            "started": None,
            "ended": None,
            "message": "waiting for a GPU share",
            "resume_checkpoint": None,
            "pause_requested": None,
            "pause_reason": None,
            "cancel_requested": None,
            "escalation": None,
        }
        await asyncio.to_thread(self.store.create, job_id, record, payload, files, origins)
        self.jobs[job_id] = record
        self._admit()
        return self.public(job_id)

    def _decode_payload(self, value: Any) -> bytes:
        if not isinstance(value, str) or not value:
            raise BadRequestError(
                "payload is required: the base64 of cloudpickle.dumps((func, args, kwargs))"
            )
        if len(value) * 3 // 4 > self.max_payload_bytes:
            raise PayloadTooLargeError(self._too_large_message())
        try:
            payload = base64.b64decode(value, validate=True)
        except ValueError:
            raise BadRequestError("payload is not valid base64") from None
        if len(payload) > self.max_payload_bytes:
            raise PayloadTooLargeError(self._too_large_message())
        # Look at the framing only (protocol 2+ opens with PROTO, every pickle
        # closes with STOP); the server never unpickles what it was sent.
        if len(payload) < 3 or payload[0] != 0x80 or payload[-1:] != b".":
            raise BadRequestError("payload is not a complete pickle (empty or truncated?)")
        return payload

    def _too_large_message(self) -> str:
        mb = self.max_payload_bytes / (1 << 20)
        return (
            f"the pickled function and arguments exceed the server's limit of {mb:.0f} MiB: "
            "load large data inside the job instead of shipping it, or raise "
            "CumulusApp.max_payload_bytes"
        )

    def _choose_python(self, python: Any, version: str) -> str:
        if isinstance(python, str) and os.path.isabs(python) and os.access(python, os.X_OK):
            return python  # the submitter's own interpreter, with its packages
        if version != python_version():
            raise BadRequestError(
                f"the job was pickled by Python {version}, but its interpreter is not on this "
                f"host and the server's Python is {python_version()}: submit from "
                f"Python {python_version()}"
            )
        return sys.executable  # the server's own

    # -- control ---------------------------------------------------------------

    def pause(self, job_id: str, reason: str = "user") -> dict[str, Any]:
        """Ask a running job to checkpoint and stop at its next batch boundary."""
        job = self.get(job_id)
        self._refuse_damaged(job)
        state = JobState(job["state"])
        if state is JobState.PAUSING:
            raise InvalidStateError(f"job {job_id} is already pausing")
        if state is not JobState.RUNNING or job.get("cancel_requested"):
            raise InvalidStateError(f"job {job_id} is {state.value}; only a running job can pause")
        self.store.write_control(job_id, pause=True, reason=reason, requested=time.time())
        job.update(
            state=JobState.PAUSING.value,
            pause_requested=time.time(),
            pause_reason=reason,
            message="duration limit reached, pausing" if reason == "duration" else "pausing",
        )
        handle = ProcessHandle.from_json(job.get("process"))
        # Before the worker has installed its handler the signal would kill
        # it; it then sees the flag in control.json within a second anyway.
        if handle is not None and self.store.read_state(job_id).get("run") == job["run"]:
            self.backend.notify_pause(handle)
        self._save(job_id)
        return self.public(job_id)

    def resume(self, job_id: str, checkpoint: Any = None, duration: Any = None) -> dict[str, Any]:
        """Queue a stopped job again: the same function continues from a checkpoint."""
        job = self.get(job_id)
        self._refuse_damaged(job)
        state = JobState(job["state"])
        if state not in RESUMABLE:
            raise InvalidStateError(
                f"job {job_id} is {state.value}; only a paused, timed-out or lost job can resume"
            )
        if checkpoint is not None:
            if not isinstance(checkpoint, str) or not checkpoint:
                raise BadRequestError("checkpoint must be the name of one of the job's checkpoints")
            if self.checkpoint_index(job_id).get(checkpoint) is None:
                raise JobNotFoundError(
                    f"job {job_id} has no checkpoint {checkpoint!r}; list them with "
                    f"GET /cumulus/api/jobs/{job_id}/checkpoints"
                )
        elif job.get("resume_checkpoint"):
            # A job resumed from an earlier checkpoint and stopped before saving
            # a new one continues from that checkpoint again, not from the
            # newer files of the run it branched away from.
            chosen = self.checkpoint_index(job_id).get(job["resume_checkpoint"])
            branched = job.get("resume_requested") or 0
            newer = [e for e in self.checkpoint_index(job_id).entries() if e["time"] > branched]
            if chosen is not None and not newer:
                checkpoint = job["resume_checkpoint"]
        if duration is not None:
            try:
                job["duration"] = parse_duration(duration)
            except SpecError as e:
                raise BadRequestError(str(e)) from None
        self.store.write_control(
            job_id, pause=False, cancel=False, reason=None, resume_checkpoint=checkpoint
        )
        job.update(
            state=JobState.QUEUED.value,
            queued_at=time.time(),
            resume_checkpoint=checkpoint,
            resume_requested=job.get("resume_requested")
            if checkpoint is not None and checkpoint == job.get("resume_checkpoint")
            else time.time(),
            pause_requested=None,
            pause_reason=None,
            cancel_requested=None,
            escalation=None,
            escalated_at=None,
            message="waiting for a GPU share",
        )
        self._save(job_id)
        self._admit()
        return self.public(job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a job for good; its process tree is removed."""
        job = self.get(job_id)
        self._refuse_damaged(job)
        state = JobState(job["state"])
        if state in (JobState.QUEUED, *RESUMABLE):
            self._set_state(job_id, JobState.CANCELLED, "cancelled")
            return self.public(job_id)
        if state not in (JobState.RUNNING, JobState.PAUSING):
            raise InvalidStateError(f"job {job_id} is {state.value}; it cannot be cancelled")
        if not job.get("cancel_requested"):
            self.store.write_control(job_id, cancel=True)
            job.update(
                cancel_requested=time.time(),
                escalation="sigterm",
                escalated_at=time.time(),
                message="cancelling",
            )
            handle = ProcessHandle.from_json(job.get("process"))
            if handle is not None:
                self.backend.terminate(handle)
            self._save(job_id)
        return self.public(job_id)

    def forget(self, job_id: str) -> None:
        """Delete a job that is not running, with its directory."""
        job = self.get(job_id)
        if JobState(job["state"]) in ACTIVE:
            raise InvalidStateError(f"job {job_id} is {job['state']}; cancel it before deleting it")
        self.store.remove(job_id)
        del self.jobs[job_id]
        self._notify(job_id)

    # -- files -----------------------------------------------------------------

    def checkpoint_index(self, job_id: str) -> CheckpointIndex:
        self.get(job_id)
        return CheckpointIndex(self.store.path(job_id) / "checkpoints")

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        # Paths are included: the seed's third example hands one to a new job.
        return self.checkpoint_index(job_id).entries()

    def delete_checkpoint(self, job_id: str, name: str) -> None:
        job = self.get(job_id)
        index = self.checkpoint_index(job_id)
        entry = index.get(name)
        if entry is None:
            raise JobNotFoundError(f"job {job_id} has no checkpoint {name!r}")
        if JobState(job["state"]) in RESUMABLE:
            latest = index.latest()
            if latest and latest["name"] == name:
                raise InvalidStateError(
                    f"checkpoint {name!r} is the one job {job_id} resumes from; "
                    "resume or cancel the job first"
                )
        if JobState(job["state"]) is JobState.QUEUED and job.get("resume_checkpoint") == name:
            raise InvalidStateError(f"job {job_id} is queued to resume from {name!r}")
        index.remove(name)

    def metrics(
        self, job_id: str, since: int = 0, run: int | None = None, every: bool = False
    ) -> tuple[list[dict[str, Any]], int]:
        """Reported metrics from record number ``since`` on, and the number of the next.

        By default one record per step, the newest run's (see
        :mod:`cumulus_jupyter.metrics`); ``run`` gives that run's records and
        ``every`` all records, as they were written. Each record has its ``run``.
        ``since`` and the number returned count the records written, whichever
        view is asked for, so a poller pages through any of them the same way.
        """
        path = self.store.path(self.get(job_id)["id"]) / "metrics.jsonl"
        out: list[dict[str, Any]] = []
        count = 0
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written right now: next time
                count += 1
                if count <= since:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(with_run(record))
        if run is not None:
            return [r for r in out if r["run"] == run], count
        if every:
            return out, count
        return newest_per_step(out), count

    def result_bytes(self, job_id: str) -> bytes | None:
        path = self.store.path(self.get(job_id)["id"]) / "result.pkl"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def read_log(self, job_id: str, offset: int, limit: int = _LOG_CHUNK) -> tuple[bytes, int]:
        """Bytes of ``output.log`` from ``offset`` and the log's total size."""
        path = self.store.path(self.get(job_id)["id"]) / "output.log"
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                return f.read(max(0, min(limit, _LOG_CHUNK))), size
        except FileNotFoundError:
            return b"", 0

    async def wait_for_change(self, job_id: str, timeout: float) -> None:
        """Return when the job's record changes, or after ``timeout`` seconds."""
        event = self._changed.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- internals -------------------------------------------------------------

    def _notify(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _save(self, job_id: str) -> None:
        job = self.jobs[job_id]
        try:
            # Keys starting with "_" are this process's own bookkeeping.
            record = {k: v for k, v in job.items() if not k.startswith("_")}
            self.store.write_record(job_id, record)
        except OSError as e:  # e.g. disk full: keep serving, say so in the record
            note = f"could not save the job record: {e.strerror or e}"
            job["message"] = f"{job['message']} ({note})" if job.get("message") else note
            self.log.error("cumulus: could not write the record of job %s: %s", job_id, e)
        self._notify(job_id)

    def _set_state(self, job_id: str, new: JobState, message: str) -> None:
        job = self.jobs[job_id]
        old = JobState(job["state"])
        if old is not new and not can_transition(old, new):
            raise InvalidStateError(f"job {job_id} cannot go from {old.value} to {new.value}")
        job["state"] = new.value
        job["message"] = message
        self._save(job_id)

    def _admit(self) -> None:
        """Start queued jobs in order while the oldest one finds a device with room.

        Strictly first in, first out: a job never overtakes an older one, so a
        job asking for a whole GPU is not starved by a stream of small ones.
        """
        queued = sorted(
            (
                j
                for j in self.jobs.values()
                if j["state"] == JobState.QUEUED.value and not j.get("_starting")
            ),
            key=lambda j: (j.get("queued_at") or j.get("created") or 0, j["id"]),
        )
        for job in queued:
            device = self.ledger.place(job["gpu_memory"])
            if device is None:
                break
            # The share is taken now, so the next job is placed knowing it;
            # the process starts in a thread (a fork takes milliseconds that
            # every other request would wait for).
            self.ledger.take(job["id"], device, job["gpu_memory"])
            job["_starting"] = True
            task = asyncio.get_running_loop().create_task(self._start_run(job["id"], device))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _job_env(self, job: dict[str, Any], device: str, run: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SECRET_ENV}
        env.update(
            CUMULUS_JOB_DIR=str(self.store.path(job["id"])),
            CUMULUS_JOB_ID=job["id"],
            CUMULUS_GPU_FRACTION=repr(job["gpu_memory"]),
            CUMULUS_JOB_NICE=str(self.job_nice),
            PYTHONUNBUFFERED="1",
            # Pin the job to its device; with no GPUs configured, hide them all.
            CUDA_VISIBLE_DEVICES=device if self.ledger.has_gpus else "",
            # Device numbers are nvidia-smi's (PCI bus order); CUDA's default
            # order (fastest first) may number the cards differently.
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
        )
        env[RUN_ENV] = str(run)
        return env

    async def _start_run(self, job_id: str, device: str) -> None:
        job = self.jobs[job_id]
        job_dir = self.store.path(job_id)
        run = int(job.get("run", 0)) + 1
        # The last run's result must not pass for this run's.
        with contextlib.suppress(FileNotFoundError):
            (job_dir / "result.pkl").unlink()
        env = self._job_env(job, device, run)
        try:
            handle = await asyncio.to_thread(self.backend.start, job_dir, job["python"], env)
        except OSError as e:
            job.pop("_starting", None)
            self.ledger.release(job_id)
            if job["state"] == JobState.QUEUED.value:
                job["ended"] = time.time()
                self._set_state(job_id, JobState.FAILED, f"could not start the job process: {e}")
            self._admit()
            return
        job.pop("_starting", None)
        if self.jobs.get(job_id) is not job or job["state"] != JobState.QUEUED.value:
            # Cancelled while its process was starting: that process goes too.
            self.backend.kill(handle)
            self.backend.cleanup(handle)
            self.ledger.release(job_id)
            self._admit()
            return
        job["run"] = run
        now = time.time()
        job.update(
            device=device,
            process=handle.to_json(),
            started=now,
            ended=None,
            escalation=None,
        )
        job.setdefault("runs", []).append(
            {"run": job["run"], "started": now, "pid": handle.pid, "device": device}
        )
        self._set_state(job_id, JobState.RUNNING, "running")

    def _finish(self, job_id: str) -> None:
        """The job's process has ended: record how, free its share, start the next."""
        job = self.jobs[job_id]
        handle = ProcessHandle.from_json(job.get("process"))
        exit_code = self.backend.exit_code(handle) if handle else None
        if handle is not None:
            self.backend.cleanup(handle)
        reported = self.store.read_state(job_id)
        outcome = reported.get("state") if reported.get("run") == job.get("run") else None
        pausing = bool(job.get("pause_requested"))
        timed = job.get("pause_reason") == "duration"
        # SIGTERM raises JobInterrupted wherever the job is, an import
        # included; code that was interrupted halfway may then fail with any
        # exception. A run that failed after we sent it a signal was stopped
        # by us: it ends as the cancel or the pause asked.
        stopped_by_signal = outcome == "failed" and bool(job.get("escalation"))
        if outcome == "completed" or (outcome == "failed" and not stopped_by_signal):
            new = JobState(outcome)
        elif job.get("cancel_requested") or outcome == "cancelled":
            new = JobState.CANCELLED
        elif outcome in ("paused", "timed_out") or pausing:
            new = JobState.TIMED_OUT if timed or outcome == "timed_out" else JobState.PAUSED
        else:
            new = JobState.LOST
        messages = {
            JobState.COMPLETED: "completed",
            JobState.FAILED: reported.get("error") or "the job raised an exception",
            JobState.CANCELLED: "cancelled",
            JobState.PAUSED: "paused",
            JobState.TIMED_OUT: "duration limit reached; resume to continue",
            JobState.LOST: (
                "the job process ended without recording an outcome"
                + (f" (exit status {exit_code})" if exit_code is not None else "")
                + "; see its log, resume it from its last checkpoint"
            ),
        }
        message = messages[new]
        if new is JobState.LOST:
            last = self._last_log_line(job_id)
            if last:
                message += f". Last output: {last}"
            free = self._free_bytes(job_id)
            if free is not None and free < _LOW_DISK:
                message += (
                    f". The disk holding the job root is full ({free / 2**20:.1f} MiB free): "
                    "free space, then resume the job"
                )
        notes = []
        if job.get("escalation") and new in (JobState.PAUSED, JobState.TIMED_OUT):
            notes.append(f"did not stop in time: {job['escalation']} sent")
        if stopped_by_signal:
            error = reported.get("error") or "an exception"
            notes.append(f"while stopping on {job['escalation']}, it raised {error}")
        if notes:
            message += f" ({'; '.join(notes)})"
        self.ledger.release(job_id)
        now = time.time()
        job["ended"] = reported.get("ended") or now
        if job.get("runs"):
            job["runs"][-1].update(
                ended=job["ended"],
                state=new.value,
                exit_code=exit_code,
                stop=job.get("escalation")
                or ("cooperative" if new in (JobState.PAUSED, JobState.TIMED_OUT) else None),
            )
        if not can_transition(JobState(job["state"]), new):
            new = JobState.LOST  # never leave a job stuck in an active state
        self._set_state(job_id, new, message)

    def _free_bytes(self, job_id: str) -> int | None:
        try:
            return shutil.disk_usage(self.store.path(job_id)).free
        except OSError:
            return None

    def _last_log_line(self, job_id: str) -> str:
        """The job's last line of output: often the reason it died."""
        try:
            with open(self.store.path(job_id) / "output.log", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                data = f.read()
        except OSError:
            return ""
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else ""

    def _escalate(self, job_id: str, now: float) -> None:
        job = self.jobs[job_id]
        handle = ProcessHandle.from_json(job.get("process"))
        if handle is None:
            return
        if job.get("cancel_requested"):
            overdue = now - job["cancel_requested"] >= self.kill_grace
            if overdue and job["escalation"] != "sigkill":
                self.backend.kill(handle)
                job["escalation"] = "sigkill"
                self._save(job_id)
            return
        if job["state"] != JobState.PAUSING.value:
            return
        if job["escalation"] is None and now - job["pause_requested"] >= self.pause_timeout:
            self.log.warning("cumulus: job %s ignored the pause; sending SIGTERM", job_id)
            self.backend.terminate(handle)
            job.update(escalation="sigterm", escalated_at=now)
            self._save(job_id)
        elif job["escalation"] == "sigterm" and now - job["escalated_at"] >= self.kill_grace:
            self.log.warning("cumulus: job %s ignored SIGTERM; killing it", job_id)
            self.backend.kill(handle)
            job.update(escalation="sigkill", escalated_at=now)
            self._save(job_id)

    def tick(self) -> None:
        """One pass of the monitor: exits, duration limits, escalation, admission."""
        now = time.time()
        finished = False
        for job_id, job in list(self.jobs.items()):
            if job["state"] not in (JobState.RUNNING.value, JobState.PAUSING.value):
                continue
            handle = ProcessHandle.from_json(job.get("process"))
            if handle is None or not self.backend.is_alive(handle):
                self._finish(job_id)
                finished = True
                continue
            duration = job.get("duration")
            if (
                duration
                and job["state"] == JobState.RUNNING.value
                and not job.get("cancel_requested")
                and now - job["started"] >= duration
            ):
                self.pause(job_id, reason="duration")
            self._escalate(job_id, now)
        if finished:
            self._admit()

    async def _monitor_loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # one bad job must not stop the watching of the others
                self.log.exception("cumulus: monitor pass failed")
            await asyncio.sleep(_MONITOR_INTERVAL)


_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "name": str,
    "state": str,
    "gpu_memory": (int, float),
    "run": int,
    "runs": list,
    "python": str,
}


def _checked_record(record: Any) -> dict[str, Any]:
    """A job record read from disk, or ValueError saying what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("job.json is not a JSON object")
    for key, kind in _RECORD_TYPES.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"job.json has no valid {key!r}")
    JobState(record["state"])  # ValueError for an unknown state
    parse_gpu_memory(record["gpu_memory"])
    return record

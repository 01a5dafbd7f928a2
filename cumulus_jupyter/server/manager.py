"""The job manager: the lifecycle of every job of one job root.

It runs in the Jupyter server's event loop and is the only code that changes
a job's state, always through :meth:`JobManager.set_state`, so
:mod:`cumulus_jupyter.states` decides what is legal. Each operation checks
and changes the record synchronously (two requests on one job never
interleave); what takes time happens off the loop: the durable write of a
new job, the start of a run's process and the collection of an ended run
(its exit status, what is left of its process group) run in threads. A
:class:`~.monitor.Monitor` reports ended runs, reached duration limits and
unanswered pauses; admission hands the oldest queued job a GPU share.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from ..errors import InvalidStateError, JobNotFoundError
from ..jobdir import JobDir, job_environment
from ..manifest import CheckpointIndex
from ..states import RESUMABLE, RUNNING_STATES, Action, JobState, can_transition, end_state, refusal
from .backends import Backend, LocalBackend, RunHandle
from .events import STATE_CHANGE, EventLog
from .gpu import ShareLedger
from .monitor import Escalation, Monitor, end_message
from .record import JobRecord
from .requests import RankLimit, ResumeRequest, Submission
from .store import JobStore

_WAITING = "waiting for a GPU share"
#: A run handed to an engine that places runs itself, not started by it yet.
_PLACING = "submitted; waiting to be placed"
_UNSEEN = object()


class JobManager:
    """Owns every job of one job root."""

    def __init__(
        self,
        root: str | Path,
        *,
        backend: Backend[Any] | None = None,
        devices: list[str] | None = None,
        pause_timeout: float = 60.0,
        kill_grace: float = 10.0,
        max_payload_bytes: int = 256 << 20,
        job_nice: int = 19,
        log: logging.Logger | None = None,
        event_limit: int = 10_000,
        event_max_age: float = 30 * 86400,
    ):
        self.store = JobStore(root)
        self.backend: Backend[Any] = backend or LocalBackend()
        self.ledger = ShareLedger(list(devices or []))
        self.pause_timeout = pause_timeout
        self.kill_grace = kill_grace
        self.max_payload_bytes = max_payload_bytes
        self.job_nice = job_nice
        self.log = log or logging.getLogger("cumulus_jupyter")
        self.jobs: dict[str, JobRecord] = {}
        self.monitor = Monitor(self, self.log)
        #: Every change of every job, numbered (GET /cumulus/api/events).
        self.events = EventLog(
            self.store.root, max_events=event_limit, max_age=event_max_age, log=self.log
        )
        self._manifest_mtime: dict[str, int | None] = {}  # per running job
        self._checkpoint_seen: dict[str, object] = {}  # newest checkpoint's name per job
        self._changed: dict[str, asyncio.Event] = {}
        # Each record's version, for followers that have it already (POST
        # follow). Unique to this server's life: a version a client kept from
        # the server before a restart never matches one of this server's.
        self._versions: dict[str, int] = {}
        self._version_prefix = secrets.token_hex(4)
        self._last_version = 0
        self._starting: set[str] = set()  # queued jobs whose run's process is being started
        self._finishing: set[str] = set()  # jobs whose ended run is being collected
        self._tasks: set[asyncio.Task[None]] = set()

    # -- start / stop ----------------------------------------------------------

    def load(self) -> None:
        """Rebuild the in-memory view from the job root and re-adopt live jobs."""
        for job_id in self.store.job_ids():
            job = self.jobs[job_id] = self.store.read_job(job_id)
            if job.damaged:
                # Reported, not skipped: the user sees it and can delete it.
                self.log.error("cumulus: job %s: %s", job_id, job.message)
            elif job.state in RUNNING_STATES or self.placing(job):
                handle = self.handle(job)
                if handle is not None and self.backend.adopt(handle):
                    if not self.backend.places_runs:
                        devices = job.devices or [job.device or ""]
                        self.ledger.take(job_id, devices, job.gpu_memory)
                    self.backend.watch(handle, functools.partial(self._run_ended, job))
                    self.log.info("cumulus: re-adopted job %s (%s)", job_id, handle.to_json())
                else:
                    if self.placing(job):
                        # It ran, or failed to start, while the server was down.
                        self.placed(job, self.backend.placed(handle) if handle else None)
                    self.finish(job_id)
        self.admit()

    async def start(self) -> None:
        self.load()
        self.monitor.start()

    async def stop(self) -> None:
        """Stop watching. Jobs keep running and are re-adopted at the next start."""
        await self.monitor.stop()
        self.backend.unwatch_all()
        await asyncio.to_thread(self.store.writer.drain)  # the last records land

    # -- queries ---------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r}; list jobs with GET /cumulus/api/jobs")
        return job

    def public(self, job_id: str) -> dict[str, Any]:
        """The record the API shows for one job."""
        return self.get(job_id).public(time.time())

    def list_jobs(self) -> list[dict[str, Any]]:
        now = time.time()
        jobs = sorted(self.jobs.values(), key=lambda j: (j.created or 0, j.id))
        return [j.public(now) for j in jobs]

    def handle(self, job: JobRecord) -> Any:
        """The backend's handle of the job's current (or last) run, or None."""
        return self.backend.handle(job.process)

    def placing(self, job: JobRecord) -> bool:
        """Whether the job's run was submitted to the engine and waits to be placed."""
        return job.state is JobState.QUEUED and job.submitted_at is not None

    def gpu_usage(self) -> list[dict[str, Any]]:
        if self.backend.places_runs:
            return []  # the engine (Ray) holds the shares: `ray status` shows them
        return self.ledger.usage()

    @property
    def rank_limit(self) -> RankLimit:
        """The most ranks one job may ask for here: one GPU each, or the CPU cores."""
        if self.backend.places_runs:
            return RankLimit(64, "the engine places each rank on a GPU of its own")
        if self.ledger.has_gpus:
            n = len(self.ledger.devices)
            return RankLimit(n, f"this server has {n} GPU(s) and each rank needs one of its own")
        n = os.cpu_count() or 1
        return RankLimit(n, f"this server has no GPUs and {n} CPU core(s) for the ranks to share")

    # -- the user's requests -------------------------------------------------------

    async def submit(self, submission: Submission, owner: str = "") -> dict[str, Any]:
        """Store a checked submission (durably, off the event loop) and queue the job."""
        job_id = self.store.new_id()
        job = JobRecord.submitted(job_id, submission, owner, message=_WAITING)
        await asyncio.to_thread(
            self.store.create,
            job_id,
            job.to_json(),
            submission.payload,
            submission.files,
            submission.origins,
        )
        self.jobs[job_id] = job
        self._checkpoint_seen[job_id] = None  # a new job: its first checkpoint is news
        self.event(job, STATE_CHANGE, old=None, new=job.state.value, message=job.message)
        self.admit()
        return self.public(job_id)

    def _allow(self, action: Action, job: JobRecord) -> None:
        """Refuse (409) what the lifecycle does not allow now, saying why."""
        if job.damaged:
            raise InvalidStateError(f"job {job.id} is damaged: {job.message}")
        why = refusal(action, job.state, cancelling=job.cancelling)
        if why is not None:
            raise InvalidStateError(f"job {job.id} {why}")

    def pause(self, job_id: str, reason: str = "user") -> dict[str, Any]:
        """Ask a running job to checkpoint and stop at its next batch boundary."""
        job = self.get(job_id)
        self._allow(Action.PAUSE, job)
        files = self.store.dir(job_id)
        self.store.write_control(job_id, pause=True, reason=reason, requested=time.time())
        job.pause_requested = time.time()
        job.pause_reason = reason
        message = "duration limit reached, pausing" if reason == "duration" else "pausing"
        self.set_state(job, JobState.PAUSING, message)
        handle = self.handle(job)
        # Before the worker has installed its handler the signal would kill
        # it; it then sees the flag in control.json within a second anyway.
        if handle is not None and files.read_state().get("run") == job.run:
            self.backend.notify_pause(handle)
        return self.public(job_id)

    def resume(self, job_id: str, request: ResumeRequest | None = None) -> dict[str, Any]:
        """Queue a stopped job again: the same function continues from a checkpoint."""
        request = request or ResumeRequest()
        job = self.get(job_id)
        self._allow(Action.RESUME, job)
        index = self.checkpoint_index(job_id)
        checkpoint = request.checkpoint
        if checkpoint is not None:
            if index.get(checkpoint) is None:
                raise JobNotFoundError(
                    f"job {job_id} has no checkpoint {checkpoint!r}; list them with "
                    f"GET /cumulus/api/jobs/{job_id}/checkpoints"
                )
        elif job.resume_checkpoint:
            # A job resumed from an earlier checkpoint and stopped before saving
            # a new one continues from that checkpoint again, not from the
            # newer files of the run it branched away from.
            branched = job.resume_requested or 0
            newer = [e for e in index.entries() if e["time"] > branched]
            if index.get(job.resume_checkpoint) is not None and not newer:
                checkpoint = job.resume_checkpoint
        if request.duration is not None:
            job.duration = request.duration
        if request.nprocs is not None:
            # The next run starts this many ranks.
            job.nprocs = request.nprocs
        self.store.write_control(
            job_id, pause=False, cancel=False, reason=None, resume_checkpoint=checkpoint
        )
        if checkpoint is None or checkpoint != job.resume_checkpoint:
            job.resume_requested = time.time()
        job.resume_checkpoint = checkpoint
        job.queued_at = time.time()
        job.pause_requested = job.pause_reason = job.cancel_requested = None
        job.escalation = None
        job.escalated_at = None
        job.submitted_at = None
        self.set_state(job, JobState.QUEUED, _WAITING)
        self.admit()
        return self.public(job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a job for good; its process tree is removed."""
        job = self.get(job_id)
        if job.cancelling and not job.damaged:
            return self.public(job_id)  # asked already: the process is on its way out
        self._allow(Action.CANCEL, job)
        if job.state not in RUNNING_STATES:
            queued = job.state is JobState.QUEUED
            handle = self.handle(job)
            if self.placing(job) and handle is not None:
                # Handed to the engine, not started yet: take it back.
                self.backend.kill(handle)
                job.submitted_at = None
            self.set_state(job, JobState.CANCELLED, "cancelled")  # no process to stop
            if queued:
                # It may have been the oldest in the queue, waiting for more
                # room (or more devices) than the jobs behind it need.
                self.admit()
            return self.public(job_id)
        self.store.write_control(job_id, cancel=True)
        job.cancel_requested = job.escalated_at = time.time()
        job.escalation = "sigterm"
        job.message = "cancelling"
        handle = self.handle(job)
        if handle is not None:
            self.backend.terminate(handle)
        self.save(job)
        return self.public(job_id)

    def forget(self, job_id: str) -> None:
        """Delete a job that is not running, with its directory."""
        job = self.get(job_id)
        if not job.damaged:
            self._allow(Action.DELETE, job)
        self.store.remove(job_id, on_error=functools.partial(self._not_removed, job_id))
        del self.jobs[job_id]
        self._manifest_mtime.pop(job_id, None)
        self._checkpoint_seen.pop(job_id, None)
        self.event(job, "deleted", old=job.state.value)
        self._notify(job_id)
        self._versions.pop(job_id, None)

    def _not_removed(self, job_id: str, error: OSError) -> None:
        # The job is gone from the list; its directory comes back at the next start.
        self.log.error("cumulus: could not delete the directory of job %s: %s", job_id, error)

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint_index(self, job_id: str) -> CheckpointIndex:
        return self.store.checkpoints(self.get(job_id).id)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        # Paths are included: the seed's third example hands one to a new job.
        return self.checkpoint_index(job_id).entries()

    def delete_checkpoint(self, job_id: str, name: str) -> None:
        job = self.get(job_id)
        index = self.checkpoint_index(job_id)
        if index.get(name) is None:
            raise JobNotFoundError(f"job {job_id} has no checkpoint {name!r}")
        if job.state in RESUMABLE:
            latest = index.latest()
            if latest and latest["name"] == name:
                raise InvalidStateError(
                    f"checkpoint {name!r} is the one job {job_id} resumes from; "
                    "resume or cancel the job first"
                )
        if job.state is JobState.QUEUED and job.resume_checkpoint == name:
            raise InvalidStateError(f"job {job_id} is queued to resume from {name!r}")
        index.remove(name)

    # -- waiting -------------------------------------------------------------------------

    async def wait_for_change(self, job_id: str, timeout: float) -> None:
        """Return when the job's record changes, or after ``timeout`` seconds."""
        event = self._changed.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def version(self, job_id: str) -> str:
        """A name of the job's record as it is now: it changes whenever the record does."""
        return f"{self._version_prefix}.{self._versions.get(job_id, 0)}"

    def _notify(self, job_id: str) -> None:
        self._last_version += 1
        self._versions[job_id] = self._last_version
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    # -- state changes -------------------------------------------------------------------

    def save(self, job: JobRecord) -> None:
        """Have the record written and wake whoever waits for it to change."""
        self.store.write_record(
            job.id, job.to_json(), on_error=functools.partial(self._not_saved, job)
        )
        self._notify(job.id)

    def _not_saved(self, job: JobRecord, error: OSError) -> None:
        """The record could not be written (e.g. disk full): keep serving, say so in it."""
        note = f"could not save the job record: {error.strerror or error}"
        if note not in job.message:
            job.message = f"{job.message} ({note})" if job.message else note
        self.log.error("cumulus: could not write the record of job %s: %s", job.id, error)
        self._notify(job.id)

    async def settled(self, job_id: str) -> None:
        """Return once what was changed for ``job_id`` so far is on disk."""
        await self.store.settled(job_id)

    def set_state(self, job: JobRecord, new: JobState, message: str) -> None:
        """The one way a job changes state: legal transitions only (see states.py)."""
        old = job.state
        if old is not new and not can_transition(old, new):
            raise InvalidStateError(f"job {job.id} cannot go from {old} to {new}")
        job.state = new
        job.message = message
        self.save(job)
        if old is not new:
            self.event(job, STATE_CHANGE, old=old.value, new=new.value, message=message)

    def event(self, job: JobRecord, kind: str, **fields: Any) -> None:
        """Add one event about ``job`` to the event log (see :mod:`.events`)."""
        self.events.add(
            kind=kind,
            job=job.id,
            name=job.name,
            run=job.run,
            notify=job.notify,
            # What the job last reported: the loss it ended at, its epoch.
            metrics=self.store.last_metrics(job.id),
            **fields,
        )

    def note_checkpoints(self, job: JobRecord) -> None:
        """Add an event when a job has committed a new checkpoint since the last look.

        A ``stat`` of the manifest per look; it is read only when it changed.
        A job first looked at after a server restart is only taken note of.
        """
        index = self.checkpoint_index(job.id)
        mtime = index.changed_ns()
        if job.id in self._manifest_mtime and self._manifest_mtime[job.id] == mtime:
            return
        self._manifest_mtime[job.id] = mtime
        latest = None
        if mtime is not None:
            with contextlib.suppress(ValueError, OSError):
                latest = index.latest()
        name = latest["name"] if latest else None
        seen = self._checkpoint_seen.get(job.id, _UNSEEN)
        self._checkpoint_seen[job.id] = name
        if latest is not None and seen is not _UNSEEN and name != seen:
            self.event(
                job,
                "checkpoint",
                checkpoint=name,
                epoch=latest.get("epoch"),
                step=latest.get("step"),
            )

    # -- runs ------------------------------------------------------------------------------

    def admit(self) -> None:
        """Start queued jobs in order while the oldest one finds devices with room.

        Strictly first in, first out: a job never overtakes an older one, so a
        job asking for a whole GPU (or for several GPUs, one per rank) is not
        starved by a stream of small ones.
        """
        queued = sorted(
            (
                j
                for j in self.jobs.values()
                if j.state is JobState.QUEUED and j.id not in self._starting
            ),
            key=lambda j: (j.queued_at or j.created or 0, j.id),
        )
        if self.backend.places_runs:
            # The engine admits and places (and queues what it cannot place yet).
            for job in queued:
                if not self.placing(job):
                    self._starting.add(job.id)
                    self._spawn(self._start_run(job, []))
            return
        for job in queued:
            if self.ledger.has_gpus and job.nprocs > len(self.ledger.devices):
                # Checked at submit and resume, but the server may have been
                # restarted with fewer GPUs since: waiting would block the
                # queue for good.
                job.ended = time.time()
                self.set_state(
                    job,
                    JobState.FAILED,
                    f"the job asks for {job.nprocs} ranks, one GPU each, but the server has "
                    f"only {len(self.ledger.devices)} GPU(s) now; submit it again with "
                    f"nprocs={len(self.ledger.devices)} or fewer",
                )
                continue
            devices = self.ledger.place(job.gpu_memory, job.nprocs)
            if devices is None:
                break
            # The shares are taken now, so the next job is placed knowing them;
            # the process starts in a thread (a fork takes milliseconds that
            # every other request would wait for).
            self.ledger.take(job.id, devices, job.gpu_memory)
            self._starting.add(job.id)
            self._spawn(self._start_run(job, devices))

    async def _start_run(self, job: JobRecord, devices: list[str]) -> None:
        files = self.store.dir(job.id)
        run = job.run + 1
        # A queued job cannot be resumed, so nprocs stays what admit() placed.
        nprocs = job.nprocs
        # The run reads control.json (which checkpoint to resume from) first thing.
        await self.store.settled(job.id)
        env = job_environment(
            os.environ,
            files.path,
            job.id,
            run,
            gpu_fraction=job.gpu_memory,
            cuda_devices=self._visible_devices(devices),
            nice=self.job_nice,
            nprocs=nprocs,
            # The worker stops its ranks with the same grace the server gives it.
            kill_grace=self.kill_grace,
        )
        try:
            handle = await asyncio.to_thread(self._start_process, files, job.python, env)
        except OSError as e:
            self._starting.discard(job.id)
            self.ledger.release(job.id)
            if job.state is JobState.QUEUED:
                job.ended = time.time()
                self.set_state(job, JobState.FAILED, f"could not start the job process: {e}")
            self.admit()
            return
        if self.jobs.get(job.id) is not job or job.state is not JobState.QUEUED:
            # Cancelled while its process was starting: that process goes too
            # (in a thread: a forked run is reaped by the busy template).
            await asyncio.to_thread(self._discard_process, handle)
            self._starting.discard(job.id)
            self.ledger.release(job.id)
            self.admit()
            return
        self._starting.discard(job.id)
        now = time.time()
        job.run = run
        job.process = handle.to_json()
        job.ended = None
        job.escalation = None
        job.node = None
        run_entry: dict[str, Any] = {"run": run, **handle.to_json(), "nprocs": nprocs}
        job.runs.append(run_entry)
        if self.backend.places_runs:
            job.submitted_at = now
            run_entry["submitted"] = now
            self.set_state(job, JobState.QUEUED, _PLACING)
        else:
            job.device = devices[0]
            job.devices = list(devices)
            run_entry.update(device=devices[0], devices=list(devices))
            job.started = run_entry["started"] = now
            self.set_state(job, JobState.RUNNING, "running")
        self.backend.watch(handle, functools.partial(self._run_ended, job))

    def check_placement(self, job: JobRecord) -> None:
        """A run handed to an engine that places runs: running now, or say why it waits."""
        handle = self.handle(job)
        if handle is None:
            return
        node = self.backend.placed(handle)
        if node is not None or not self.backend.is_alive(handle):
            self.placed(job, node)  # one that ended already is collected as any run
            return
        reason = self.backend.waiting_reason(handle)
        message = f"{_PLACING}: {reason}" if reason else _PLACING
        if message != job.message:
            job.message = message
            self.save(job)

    def placed(self, job: JobRecord, node: str | None) -> None:
        """The engine started the job's submitted run (on ``node``): it is running now."""
        now = time.time()
        job.submitted_at = None
        job.started = now
        job.node = node
        job.device = None
        job.devices = []  # the run reports the devices the engine gave it
        if job.runs:
            job.runs[-1].update(started=now, node=node)
        self.set_state(job, JobState.RUNNING, f"running on {node}" if node else "running")

    def learn_devices(self, job: JobRecord) -> None:
        """Record the devices an engine gave a run, once the run has reported them."""
        reported = self.store.dir(job.id).read_state()
        if reported.get("run") != job.run:
            return  # not started far enough to say
        # Unset or empty: the engine gave it no GPU.
        visible = reported.get("cuda_visible_devices") or ""
        job.devices = [d for d in str(visible).split(",") if d] or ["cpu"]
        job.device = job.devices[0]
        if job.runs:
            job.runs[-1].update(device=job.device, devices=list(job.devices))
        self.save(job)

    def _visible_devices(self, devices: list[str]) -> str | None:
        """What CUDA_VISIBLE_DEVICES becomes for a run placed on ``devices``."""
        if self.backend.places_runs:
            return None  # the engine pins the run to what it gave it
        # Rank i on the i-th device; with no GPUs configured, hide them all.
        return ",".join(devices) if self.ledger.has_gpus else ""

    def _start_process(self, files: JobDir, python: str, env: dict[str, str]) -> RunHandle:
        files.clear_result()  # the last run's outcome is not this one's
        return self.backend.start(files.path, python, env)

    def _discard_process(self, handle: RunHandle) -> None:
        self.backend.kill(handle)
        self.backend.cleanup(handle)

    def _run_ended(self, job: JobRecord) -> None:
        """The backend saw the run's process end: record it now, not at the next tick."""
        handle = self.handle(job)
        if (
            self.jobs.get(job.id) is job
            and job.state in RUNNING_STATES
            and handle is not None
            and not self.backend.is_alive(handle)
        ):
            self.finish_soon(job.id)

    def finishing(self, job_id: str) -> bool:
        """Whether the job's ended run is being collected (its end is recorded next)."""
        return job_id in self._finishing

    def finish_soon(self, job_id: str) -> None:
        """The run's process has ended: collect it in a thread, then record how and admit.

        Collecting can wait: a run forked by the warm template is reaped by
        the template, which answers after the forks queued before the
        question (a burst of submits queues dozens). Every other request
        would wait as long if that happened on the event loop.
        """
        if job_id in self._finishing:
            return
        job = self.jobs[job_id]
        self._finishing.add(job_id)

        async def collect_then_record() -> None:
            try:
                exit_code = await asyncio.to_thread(self._collect, job)
            finally:
                self._finishing.discard(job_id)
            if self.jobs.get(job_id) is job and job.state in RUNNING_STATES:
                self._record_end(job, exit_code)
            self.admit()

        self._spawn(collect_then_record())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of the loop, kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def finish(self, job_id: str) -> None:
        """The run's process has ended: record how, free its share (here and now)."""
        job = self.jobs[job_id]
        self._record_end(job, self._collect(job))

    def _collect(self, job: JobRecord) -> int | None:
        """The ended run's exit status, with what was left of its process group removed."""
        handle = self.handle(job)
        if handle is None:
            return None
        exit_code = self.backend.exit_code(handle)
        self.backend.cleanup(handle)
        return exit_code

    def _record_end(self, job: JobRecord, exit_code: int | None) -> None:
        job_id = job.id
        # The checkpoint a run saved as it stopped (a pause) comes before its end.
        self.note_checkpoints(job)
        self._manifest_mtime.pop(job_id, None)  # the next run looks afresh
        reported = self.store.dir(job_id).read_state()
        outcome = None
        if reported.get("run") == job.run:
            with contextlib.suppress(ValueError):
                outcome = JobState(reported.get("state"))
        signalled = bool(job.escalation)
        new = end_state(
            outcome,
            pause_reason=job.pause_reason if job.pause_requested else None,
            cancel_requested=bool(job.cancel_requested),
            signalled=signalled,
        )
        lost = new is JobState.LOST
        message = end_message(
            new,
            error=reported.get("error"),
            exit_code=exit_code,
            escalation=job.escalation,
            stopped_by_signal=outcome is JobState.FAILED and signalled,
            last_line=self.store.last_log_line(job_id) if lost else "",
            note=self._end_note(job) if lost else "",
            free_bytes=self.store.free_bytes(job_id) if lost else None,
        )
        self.ledger.release(job_id)
        job.ended = reported.get("ended") or time.time()
        if job.runs:
            stopped = new in (JobState.PAUSED, JobState.TIMED_OUT)
            job.runs[-1].update(
                ended=job.ended,
                state=new.value,
                exit_code=exit_code,
                stop=job.escalation or ("cooperative" if stopped else None),
            )
        if not can_transition(job.state, new):
            new = JobState.LOST  # never leave a job stuck in an active state
        self.set_state(job, new, message)
        # Died without being asked: nobody paused, cancelled or stopped it.
        unasked = not (job.pause_requested or job.cancel_requested or job.escalation)
        if new is JobState.LOST and unasked and len(job.restarts) < job.max_restarts:
            self._restart(job, message)

    def _end_note(self, job: JobRecord) -> str:
        handle = self.handle(job)
        return self.backend.end_note(handle) if handle is not None else ""

    def _restart(self, job: JobRecord, cause: str) -> None:
        """Queue a lost run again: it continues from the newest good checkpoint."""
        job.restarts.append({"run": job.run, "time": time.time(), "cause": cause})
        self.event(job, "restart", message=cause, restarts=len(job.restarts))
        self.log.warning(
            "cumulus: job %s: run %d was lost (%s); restarting it (%d of %d)",
            job.id,
            job.run,
            cause,
            len(job.restarts),
            job.max_restarts,
        )
        self.resume(job.id)
        if job.state is JobState.QUEUED:  # not admitted at once: say why it waits again
            job.message = (
                f"restart {len(job.restarts)} of {job.max_restarts} after run {job.run} was "
                f"lost; {job.message}"
            )
            self.save(job)

    def escalate(self, job_id: str, signal: Escalation) -> None:
        """Stop a run that did not stop when asked: SIGTERM (it may still save), or SIGKILL."""
        job = self.jobs[job_id]
        handle = self.handle(job)
        if handle is None:
            return
        if signal == "sigterm":
            self.log.warning("cumulus: job %s ignored the pause; sending SIGTERM", job_id)
            self.backend.terminate(handle)
        else:
            self.log.warning("cumulus: job %s did not stop; killing it", job_id)
            self.backend.kill(handle)
        job.escalation = signal
        job.escalated_at = time.time()
        self.save(job)
        self.event(job, "escalation", signal=signal, message=f"{signal} sent")

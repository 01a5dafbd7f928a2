"""The server's record of one job (``job.json``) and the form the REST API shows.

One :class:`JobRecord` per job lives in the manager's memory; it is written to
``job.json`` on every change and read back at start. :meth:`JobRecord.public`
is the one place that builds what ``GET jobs/{id}`` answers.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..spec import SpecError, parse_gpu_memory
from ..states import ACTIVE, RUNNING_STATES, Action, JobState, actions

if TYPE_CHECKING:
    from .requests import Submission

#: Fields a record read from disk must have, with their JSON types.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "name": str,
    "state": str,
    "gpu_memory": (int, float),
    "run": int,
    "runs": list,
    "python": str,
}


@dataclass
class JobRecord:
    """Everything the server knows about a job between two of its runs and across restarts."""

    id: str
    name: str
    state: JobState
    gpu_memory: float
    python: str
    python_version: str = ""
    owner: str = ""
    created: float = 0.0
    #: The duration limit of each run, in seconds (None: no limit).
    duration: float | None = None
    #: How many processes (ranks) each run starts; a resume may change it.
    nprocs: int = 1
    queued_at: float | None = None
    #: How many runs have started; ``runs`` has one entry per run.
    run: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: The first device of the current (or last) run, as before runs had ranks.
    device: str | None = None
    #: Every device the current (or last) run holds: on a GPU host rank i runs
    #: on the i-th; on a host without GPUs all ranks share ``["cpu"]``.
    devices: list[str] = field(default_factory=list)
    #: The backend's handle of the current (or last) run's process.
    process: dict[str, Any] | None = None
    #: Where the current (or last) run runs, when the backend places runs (a Ray node).
    node: str | None = None
    #: When the current run was handed to a backend that places runs itself
    #: (Ray): it stays queued until the engine starts it; None once placed.
    submitted_at: float | None = None
    started: float | None = None
    ended: float | None = None
    message: str = ""
    #: The checkpoint the job was last resumed from, and when that was asked.
    resume_checkpoint: str | None = None
    resume_requested: float | None = None
    pause_requested: float | None = None
    #: Why the pause was asked: "user", or "duration" for a reached time limit.
    pause_reason: str | None = None
    cancel_requested: float | None = None
    #: The signal the server had to send to stop the run ("sigterm", "sigkill").
    escalation: str | None = None
    escalated_at: float | None = None
    #: How many times a run that dies without being asked (killed from outside,
    #: out of memory, its host lost) is started again from the newest checkpoint.
    max_restarts: int = 0
    #: Every such restart: the run that was lost, when, and why.
    restarts: list[dict[str, Any]] = field(default_factory=list)
    #: Whether its changes are announced (JupyterLab notifications, webhooks).
    notify: bool = True
    #: Set when job.json could not be read: the job can only be deleted.
    damaged: bool = False
    #: Fields this version does not know (written by another one), kept as they were.
    extra: dict[str, Any] = field(default_factory=dict)

    # -- state ---------------------------------------------------------------------

    @property
    def cancelling(self) -> bool:
        """A cancel was asked and the run's process has not ended yet."""
        return bool(self.cancel_requested) and self.state in ACTIVE

    def actions(self) -> list[Action]:
        """What the user may do to this job now (see :func:`cumulus_jupyter.states.actions`)."""
        return actions(self.state, cancelling=self.cancelling, damaged=self.damaged)

    def elapsed(self, now: float) -> float | None:
        """Seconds the current run has been running, or the last run ran."""
        if not self.started:
            return None
        end = None if self.state in RUNNING_STATES else self.ended
        return round((end or now) - self.started, 3)

    # -- JSON ------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """What ``job.json`` holds."""
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "damaged"):
                out[f.name] = getattr(self, f.name)
        out["state"] = self.state.value
        if self.damaged:
            out["damaged"] = True
        return out

    def public(self, now: float) -> dict[str, Any]:
        """The job as the REST API shows it: the record, ``elapsed`` and ``actions``."""
        out = self.to_json()
        out["elapsed"] = self.elapsed(now)
        out["actions"] = [a.value for a in self.actions()]
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobRecord:
        """A record read from ``job.json``; :class:`ValueError` saying what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("job.json is not a JSON object")
        for key, kind in _REQUIRED.items():
            if not isinstance(data.get(key), kind):
                raise ValueError(f"job.json has no valid {key!r}")
        try:
            parse_gpu_memory(data["gpu_memory"])
        except SpecError as e:
            raise ValueError(f"job.json: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "damaged"}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = JobState(data["state"])  # ValueError for an unknown state
        values["gpu_memory"] = float(data["gpu_memory"])
        nprocs = data.get("nprocs", 1)
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"job.json has no valid 'nprocs' ({nprocs!r})")
        max_restarts = data.get("max_restarts", 0)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"job.json has no valid 'max_restarts' ({max_restarts!r})")
        if not isinstance(data.get("notify", True), bool):
            raise ValueError(f"job.json has no valid 'notify' ({data.get('notify')!r})")
        if not isinstance(data.get("restarts", []), list):
            raise ValueError("job.json has no valid 'restarts'")
        devices = data.get("devices")
        if devices is None:
            # Written before jobs had ranks: the one device was the run's only one.
            device = data.get("device")
            values["devices"] = [device] if isinstance(device, str) else []
        elif not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise ValueError(f"job.json has no valid 'devices' ({devices!r})")
        if values.get("message") is None:
            values["message"] = ""
        extra = {k: v for k, v in data.items() if k not in known and k != "damaged"}
        return cls(**values, extra=extra)

    @classmethod
    def submitted(cls, job_id: str, submission: Submission, owner: str, message: str) -> JobRecord:
        """The record of a job just submitted: queued, no run yet."""
        now = time.time()
        return cls(
            id=job_id,
            name=submission.name,
            state=JobState.QUEUED,
            gpu_memory=submission.gpu_memory,
            python=submission.python,
            python_version=submission.python_version,
            owner=owner,
            created=now,
            duration=submission.duration,
            nprocs=submission.nprocs,
            max_restarts=submission.max_restarts,
            notify=submission.notify,
            queued_at=now,
            message=message,
        )

    @classmethod
    def damaged_job(cls, job_id: str, error: BaseException, created: float) -> JobRecord:
        """Stands for a job whose ``job.json`` cannot be read; its files stay for inspection."""
        return cls(
            id=job_id,
            name=job_id,
            state=JobState.LOST,
            gpu_memory=0.0,
            python="",
            created=created,
            damaged=True,
            message=(
                f"this job's record is damaged ({error}); it cannot be controlled. Its files "
                "are kept for inspection: delete the job to remove them"
            ),
        )

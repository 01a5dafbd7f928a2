"""What clients send, checked: a submission and a resume, or a :class:`BadRequestError`.

Every message says what to send instead. Nothing here unpickles the payload:
the server looks at its framing only.
"""

from __future__ import annotations

import base64
import os
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import BadRequestError, PayloadTooLargeError
from ..shipping import parse_modules
from ..spec import SpecError, parse_duration, parse_gpu_memory, parse_name, python_version

SUBMIT_FIELDS = frozenset(
    {
        "payload",
        "modules",
        "name",
        "gpu_memory",
        "duration",
        "nprocs",
        "max_restarts",
        "notify",
        "python",
        "python_version",
    }
)
RESUME_FIELDS = frozenset({"checkpoint", "duration", "nprocs"})


@dataclass(frozen=True)
class RankLimit:
    """How many ranks (processes) one job may ask for on this server, and why no more."""

    most: int
    #: Why no more, as the end of a sentence: "this server has 2 GPUs and ...".
    reason: str

    def check(self, value: Any) -> int:
        """``value`` as a number of ranks, or :class:`BadRequestError` saying what to send."""
        # bool is an int subclass, but `"nprocs": true` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequestError(
                f"nprocs must be a whole number of processes (ranks), 1 or more, got {value!r}"
            )
        if value < 1:
            raise BadRequestError(f"nprocs must be 1 or more (the number of ranks), got {value}")
        if value > self.most:
            raise BadRequestError(
                f"nprocs={value} is more ranks than this server can run at once: "
                f"{self.reason}; ask for at most {self.most}"
            )
        return value


@dataclass(frozen=True)
class Submission:
    """A valid ``POST jobs`` body."""

    payload: bytes
    files: dict[str, bytes]
    origins: dict[str, str]
    name: str
    gpu_memory: float
    duration: float | None
    #: How many processes (ranks) each run starts.
    nprocs: int
    #: The interpreter runs use: the submitter's own when it is on this host.
    python: str
    python_version: str
    #: How many times a run that dies unasked starts again from its newest checkpoint.
    max_restarts: int = 0
    #: Whether the job's changes are announced (JupyterLab notifications, webhooks).
    notify: bool = True


@dataclass(frozen=True)
class ResumeRequest:
    """A valid ``POST jobs/{id}/resume`` body."""

    #: The checkpoint to resume from; None: the newest good one.
    checkpoint: str | None = None
    #: A new duration limit; None keeps the job's.
    duration: float | None = None
    #: A new number of ranks for the next runs; None keeps the job's.
    nprocs: int | None = None


def _object(body: Any, allowed: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise BadRequestError(f"unknown field(s) {sorted(unknown)}; {what}")
    return body


def parse_submission(body: Any, max_payload_bytes: int, ranks: RankLimit) -> Submission:
    """Check a submission; :class:`PayloadTooLargeError` past ``max_payload_bytes``.

    ``ranks`` bounds ``nprocs`` (see :attr:`JobManager.rank_limit`).
    """
    body = _object(body, SUBMIT_FIELDS, f"known fields: {sorted(SUBMIT_FIELDS)}")
    payload = _decode_payload(body.get("payload"), max_payload_bytes)
    try:
        files, origins = parse_modules(body.get("modules"), max_payload_bytes - len(payload))
    except OverflowError:
        raise PayloadTooLargeError(_too_large(max_payload_bytes)) from None
    except ValueError as e:
        raise BadRequestError(str(e)) from None
    try:
        gpu_memory = parse_gpu_memory(body.get("gpu_memory", 1.0))
        duration = parse_duration(body.get("duration"))
        name = parse_name(body.get("name"), default="job")
    except SpecError as e:
        raise BadRequestError(str(e)) from None
    nprocs = ranks.check(body.get("nprocs", 1))
    max_restarts = parse_max_restarts(body.get("max_restarts", 0))
    notify = body.get("notify", True)
    if not isinstance(notify, bool):
        raise BadRequestError(
            f"notify must be true or false (announce the job's end or not), got {notify!r}"
        )
    version = body.get("python_version")
    if not isinstance(version, str) or not version:
        raise BadRequestError(
            "python_version is required (e.g. '3.11'): jobs are pickled with cloudpickle, "
            "which needs the same Python version on both ends"
        )
    return Submission(
        payload=payload,
        files=files,
        origins=origins,
        name=name,
        gpu_memory=gpu_memory,
        duration=duration,
        nprocs=nprocs,
        python=_choose_python(body.get("python"), version),
        python_version=version,
        max_restarts=max_restarts,
        notify=notify,
    )


#: The most restarts one job may ask for: past that, a run that keeps dying
#: needs someone to look at it.
MAX_RESTARTS = 100


def parse_max_restarts(value: Any) -> int:
    """``max_restarts`` as a count, or :class:`BadRequestError` saying what to send."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RESTARTS:
        raise BadRequestError(
            f"max_restarts must be a whole number from 0 to {MAX_RESTARTS}: how many times a "
            f"run that dies without being asked starts again from its newest checkpoint; "
            f"got {value!r}"
        )
    return value


def parse_resume(body: Any, ranks: RankLimit) -> ResumeRequest:
    """Check a resume body (empty: the newest checkpoint, the same limit and ranks)."""
    body = _object(body, RESUME_FIELDS, "resume takes 'checkpoint', 'duration' and 'nprocs'")
    checkpoint = body.get("checkpoint")
    if checkpoint is not None and (not isinstance(checkpoint, str) or not checkpoint):
        raise BadRequestError("checkpoint must be the name of one of the job's checkpoints")
    try:
        duration = parse_duration(body.get("duration"))
    except SpecError as e:
        raise BadRequestError(str(e)) from None
    nprocs = body.get("nprocs")
    if nprocs is not None:
        nprocs = ranks.check(nprocs)
    return ResumeRequest(checkpoint=checkpoint, duration=duration, nprocs=nprocs)


def _decode_payload(value: Any, limit: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise BadRequestError(
            "payload is required: the base64 of cloudpickle.dumps((func, args, kwargs))"
        )
    if len(value) * 3 // 4 > limit:
        raise PayloadTooLargeError(_too_large(limit))
    try:
        payload = base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequestError("payload is not valid base64") from None
    if len(payload) > limit:
        raise PayloadTooLargeError(_too_large(limit))
    # Look at the framing only (protocol 2+ opens with PROTO, every pickle
    # closes with STOP); the server never unpickles what it was sent.
    if len(payload) < 3 or payload[0] != 0x80 or payload[-1:] != b".":
        raise BadRequestError("payload is not a complete pickle (empty or truncated?)")
    return payload


def _too_large(limit: int) -> str:
    return (
        f"the pickled function and arguments exceed the server's limit of "
        f"{limit / (1 << 20):.0f} MiB: load large data inside the job instead of shipping it, "
        "or raise CumulusApp.max_payload_bytes"
    )


def _choose_python(python: Any, version: str) -> str:
    if isinstance(python, str) and os.path.isabs(python) and os.access(python, os.X_OK):
        return python  # the submitter's own interpreter, with its packages
    if version != python_version():
        raise BadRequestError(
            f"the job was pickled by Python {version}, but its interpreter is not on this "
            f"host and the server's Python is {python_version()}: submit from "
            f"Python {python_version()}"
        )
    return sys.executable  # the server's own


FOLLOW_FIELDS = frozenset({"jobs", "wait"})
#: The most jobs one ``POST follow`` may name: a notebook's widgets, with room to spare.
MAX_FOLLOWED = 256


@dataclass(frozen=True)
class Position:
    """How far a follower has read one job: its output's bytes, its metrics' records."""

    offset: int = 0
    metrics: int = 0
    #: The version of the job's record the follower has (None: it has none).
    record: str | None = None


def parse_follow(body: Any, max_wait: float) -> tuple[dict[str, Position], float]:
    """Check a follow body: ``{"jobs": {id: {"offset": N, "metrics": M}}, "wait": S}``."""
    body = _object(body, FOLLOW_FIELDS, "follow takes 'jobs' and 'wait'")
    jobs = body.get("jobs")
    if not isinstance(jobs, dict) or not jobs:
        raise BadRequestError(
            "jobs must be an object of job ids to positions, e.g. "
            '{"jobs": {"<id>": {"offset": 0, "metrics": 0}}}'
        )
    if len(jobs) > MAX_FOLLOWED:
        raise BadRequestError(
            f"follow at most {MAX_FOLLOWED} jobs per request ({len(jobs)} given); split them"
        )
    positions = {}
    for job_id, where in jobs.items():
        if not isinstance(where, dict):
            raise BadRequestError(
                f"job {job_id!r}: its position must be an object, e.g. "
                '{"offset": 0, "metrics": 0}'
            )
        where = _object(
            where,
            frozenset({"offset", "metrics", "record"}),
            f"job {job_id!r}: give 'offset', 'metrics' and 'record'",
        )
        for field in ("offset", "metrics"):
            value = where.get(field, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequestError(
                    f"job {job_id!r}: {field} must be a whole number, 0 or more, got {value!r}"
                )
        record = where.get("record")
        if record is not None and not isinstance(record, str):
            raise BadRequestError(
                f"job {job_id!r}: record must be the version of its record an answer gave,"
                f" got {record!r}"
            )
        positions[job_id] = Position(where.get("offset", 0), where.get("metrics", 0), record)
    wait = body.get("wait", 0)
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= max_wait:
        raise BadRequestError(f"wait must be a number of seconds from 0 to {max_wait:g}")
    return positions, float(wait)

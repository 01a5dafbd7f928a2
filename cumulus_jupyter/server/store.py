"""The job root on disk: one private directory per job, the source of truth.

::

    <job_root>/<job_id>/
      job.json        the spec and the server's record (written by the server)
      func.pkl        the cloudpickled (function, args, kwargs); never unpickled here
      modules/        the submitter's own modules that travel with the job (source files)
      modules.json    their list, and where the submitter imported each module from
      control.json    the pause / cancel flags and the chosen resume checkpoint
      state.json      written by the job process itself: pid, start time, outcome
      output.log      stdout and stderr, appended across runs
      metrics.jsonl   what report() recorded
      result.pkl      the last run's return value or exception
      checkpoints/    checkpoint files and their manifest
"""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from ..errors import JobNotFoundError
from ..fileio import FILE_MODE, atomic_write_bytes, atomic_write_json, make_private_dir, read_json
from ..shipping import write_modules

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def valid_job_id(job_id: str) -> bool:
    """Ids are plain names: no separators, dots or NULs can reach the filesystem."""
    return bool(_ID_RE.match(job_id))


class JobStore:
    """Reads and writes job directories under ``root``."""

    def __init__(self, root: str | Path):
        self.root = make_private_dir(Path(root).expanduser()).resolve()

    def new_id(self) -> str:
        while True:
            job_id = secrets.token_hex(6)
            if not (self.root / job_id).exists():
                return job_id

    def path(self, job_id: str) -> Path:
        """The directory of ``job_id``; refuses anything that is not a plain id."""
        if not valid_job_id(job_id):
            raise JobNotFoundError(f"no job {job_id!r}")
        return self.root / job_id

    def create(
        self,
        job_id: str,
        record: dict[str, Any],
        payload: bytes,
        files: dict[str, bytes] | None = None,
        origins: dict[str, str] | None = None,
    ) -> Path:
        """Make the job's directory: its payload, the modules that travel with it, its record."""
        d = self.path(job_id)
        d.mkdir(mode=0o700)
        atomic_write_bytes(d / "func.pkl", payload)
        write_modules(d, files or {}, origins or {})
        atomic_write_json(d / "control.json", {"pause": False, "cancel": False})
        (d / "output.log").touch(mode=FILE_MODE)
        # A job the client was told exists must survive a power loss.
        self.write_record(job_id, record, durable=True)
        return d

    def job_ids(self) -> list[str]:
        """Ids of every job directory (in no particular order)."""
        ids = []
        for entry in self.root.iterdir():
            if valid_job_id(entry.name) and entry.is_dir() and not entry.is_symlink():
                ids.append(entry.name)
        return ids

    def read_record(self, job_id: str) -> dict[str, Any]:
        """The server's record; :class:`ValueError` if it is damaged or missing."""
        data = read_json(self.path(job_id) / "job.json")
        if not isinstance(data, dict) or "id" not in data:
            raise ValueError(f"{self.path(job_id) / 'job.json'} is missing or not a job record")
        return data

    def write_record(self, job_id: str, record: dict[str, Any], durable: bool = False) -> None:
        # Not fsynced: written on every state change from the event loop. After
        # a power loss the job's own state.json settles what happened.
        atomic_write_json(self.path(job_id) / "job.json", record, durable=durable)

    def _read_object(self, job_id: str, name: str) -> dict[str, Any]:
        """A JSON object file of the job; empty when missing or damaged."""
        try:
            data = read_json(self.path(job_id) / name, default={})
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def read_state(self, job_id: str) -> dict[str, Any]:
        """What the job process last wrote about itself (empty if nothing readable)."""
        return self._read_object(job_id, "state.json")

    def read_control(self, job_id: str) -> dict[str, Any]:
        """The server's instructions to the job (empty if nothing readable)."""
        return self._read_object(job_id, "control.json")

    def write_control(self, job_id: str, **changes: Any) -> None:
        control = self.read_control(job_id)
        control.update(changes)
        atomic_write_json(self.path(job_id) / "control.json", control, durable=False)

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.path(job_id))

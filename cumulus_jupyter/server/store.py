"""The job root on disk: one private directory per job (see :mod:`cumulus_jupyter.jobdir`).

The server reads and writes job directories only through :class:`JobStore`.
What the event loop changes (records, ``control.json``, a deleted job's
directory) is written by a :class:`FileWriter` thread, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import JobNotFoundError
from ..fileio import (
    FILE_MODE,
    atomic_write_bytes,
    atomic_write_json,
    json_bytes,
    make_private_dir,
    read_json,
)
from ..jobdir import JobDir
from ..manifest import CheckpointIndex
from ..metrics import newest_per_step, with_run
from ..shipping import write_modules
from .record import JobRecord

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
#: The most log bytes one read returns.
LOG_CHUNK = 1 << 20


def valid_job_id(job_id: str) -> bool:
    """Ids are plain names: no separators, dots or NULs can reach the filesystem."""
    return bool(_ID_RE.match(job_id))


class FileWriter:
    """Runs the server's file changes in one thread, in the order they were asked for.

    A rename on a filesystem that other processes are fsyncing can wait for
    the journal for hundreds of milliseconds (measured: a burst of 50 job
    starts held the event loop up to 1.4 s in ``os.replace`` of a record).
    On the event loop every request would wait as long; here only the
    requests that changed a job wait, in :meth:`settled`.

    A change given a ``path`` replaces the whole file: when several wait for
    one path, only the newest is written.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._newest: dict[Path, Callable[[], None]] = {}  # path -> its newest waiting write
        self._last: dict[str, Future[None]] = {}  # key -> the future of its latest change

    def submit(
        self,
        key: str,
        change: Callable[[], None],
        *,
        path: Path | None = None,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        """Run ``change`` after every change submitted before it (``key`` names the job)."""
        loop = None
        if on_error is not None:
            with contextlib.suppress(RuntimeError):  # no loop (tests, tools): errors unheard
                loop = asyncio.get_running_loop()

        def run() -> None:
            todo: Callable[[], None] | None = change
            if path is not None:
                with self._lock:
                    todo = self._newest.pop(path, None)  # None: a newer one ran already
            if todo is None:
                return
            try:
                todo()
            except OSError as e:
                if loop is not None and on_error is not None:
                    with contextlib.suppress(RuntimeError):  # the loop is closed: no one to tell
                        loop.call_soon_threadsafe(on_error, e)

        with self._lock:
            if path is not None:
                self._newest[path] = change
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="cumulus-files")
            self._last[key] = future = self._executor.submit(run)
        future.add_done_callback(lambda f: self._forget(key, f))

    def _forget(self, key: str, future: Future[None]) -> None:
        with self._lock:
            if self._last.get(key) is future:
                del self._last[key]

    async def settled(self, key: str) -> None:
        """Return once every change submitted for ``key`` so far is done."""
        with self._lock:
            future = self._last.get(key)
        if future is not None:
            await asyncio.wrap_future(future)

    def drain(self) -> None:
        """Finish every change submitted (blocking); the next one starts a new thread."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


class JobStore:
    """Reads and writes job directories under ``root``."""

    def __init__(self, root: str | Path):
        self.root = make_private_dir(Path(root).expanduser()).resolve()
        self.writer = FileWriter()
        # Where the last read of each job's metrics ended: (records, bytes).
        # Followers ask again from there, so a long run's file is read from
        # that byte on, not from its start at every refresh.
        self._metrics_ends: dict[str, tuple[int, int]] = {}

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

    def dir(self, job_id: str) -> JobDir:
        """The files of ``job_id``."""
        return JobDir(self.path(job_id))

    def job_ids(self) -> list[str]:
        """Ids of every job directory (in no particular order)."""
        ids = []
        for entry in self.root.iterdir():
            if valid_job_id(entry.name) and entry.is_dir() and not entry.is_symlink():
                ids.append(entry.name)
        return ids

    # -- the job's lifetime ----------------------------------------------------------

    def create(
        self,
        job_id: str,
        record: dict[str, Any],
        payload: bytes,
        files: dict[str, bytes] | None = None,
        origins: dict[str, str] | None = None,
    ) -> Path:
        """Make the job's directory: its payload, the modules that travel with it, its record."""
        d = self.dir(job_id)
        d.path.mkdir(mode=0o700)
        atomic_write_bytes(d.payload, payload)
        write_modules(d.path, files or {}, origins or {})
        atomic_write_json(d.control, {"pause": False, "cancel": False})
        d.output.touch(mode=FILE_MODE)
        # A job the client was told exists must survive a power loss.
        atomic_write_json(d.record, record, durable=True)
        return d.path

    def read_job(self, job_id: str) -> JobRecord:
        """The job's record from ``job.json``.

        One that cannot be read gives a *damaged* stand-in saying why (see
        :meth:`JobRecord.damaged_job`): the job is listed, can be deleted, and
        its files stay as they are for inspection.
        """
        path = self.dir(job_id).record
        try:
            data = read_json(path)
            if data is None:
                raise ValueError(f"{path} is missing")
            job = JobRecord.from_json(data)
        except (ValueError, TypeError) as e:
            created = 0.0
            with contextlib.suppress(OSError):
                created = self.path(job_id).stat().st_mtime
            return JobRecord.damaged_job(job_id, e, created)
        job.id = job_id  # the directory's name is the id
        return job

    def write_record(
        self,
        job_id: str,
        record: dict[str, Any],
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        """Replace ``job.json`` soon (in the writer thread); ``on_error`` hears of a failure."""
        # Serialised now: the record goes on changing. Not fsynced: written on
        # every state change. After a power loss the job's own state.json
        # settles what happened.
        data = json_bytes(record)
        path = self.dir(job_id).record
        self.writer.submit(
            job_id,
            lambda: atomic_write_bytes(path, data, durable=False),
            path=path,
            on_error=on_error,
        )

    def write_control(self, job_id: str, **changes: Any) -> None:
        """Change some of the job's instructions soon, in order with its other changes."""
        files = self.dir(job_id)
        self.writer.submit(job_id, lambda: files.write_control(**changes))

    def remove(self, job_id: str, on_error: Callable[[OSError], None] | None = None) -> None:
        """Delete the job's directory once the changes waiting for it are done."""
        path = self.path(job_id)
        self._metrics_ends.pop(job_id, None)
        self.writer.submit(job_id, lambda: shutil.rmtree(path), on_error=on_error)

    async def settled(self, job_id: str) -> None:
        """Return once the changes asked for ``job_id`` so far are on disk."""
        await self.writer.settled(job_id)

    # -- what the job wrote ------------------------------------------------------------

    def checkpoints(self, job_id: str) -> CheckpointIndex:
        return CheckpointIndex(self.dir(job_id).checkpoints)

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
        out: list[dict[str, Any]] = []
        path = self.dir(job_id).metrics
        count, end = self._metrics_ends.get(job_id, (0, 0))
        if count > since:
            count, end = 0, 0
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if size < end:  # not the file last read (it only grows): read it whole
            count, end = 0, 0
        if size > end:
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                f.seek(end)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # being written right now: next time
                    count += 1
                    end += len(line)
                    if count <= since:
                        continue
                    with contextlib.suppress(ValueError):  # UnicodeDecodeError too
                        record = json.loads(line)
                        if isinstance(record, dict):
                            out.append(with_run(record))
        self._metrics_ends[job_id] = (count, end)
        if run is not None:
            return [r for r in out if r["run"] == run], count
        if every:
            return out, count
        return newest_per_step(out), count

    def read_log(self, job_id: str, offset: int, limit: int = LOG_CHUNK) -> tuple[bytes, int]:
        """Bytes of ``output.log`` from ``offset`` (at most ``LOG_CHUNK``) and its total size."""
        try:
            with open(self.dir(job_id).output, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                return f.read(max(0, min(limit, LOG_CHUNK))), size
        except FileNotFoundError:
            return b"", 0

    def log_size(self, job_id: str) -> int:
        """How many bytes ``output.log`` holds (0 before the first)."""
        try:
            return os.stat(self.dir(job_id).output).st_size
        except OSError:
            return 0

    def last_metrics(self, job_id: str) -> dict[str, Any]:
        """The job's last reported metrics record ({} if none)."""
        for line in reversed(_tail(self.dir(job_id).metrics, 8192).splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # cut by the seek, or by a crash mid-write
            if isinstance(record, dict):
                return record
        return {}

    def last_log_line(self, job_id: str) -> str:
        """The job's last line of output: often the reason it died."""
        data = _tail(self.dir(job_id).output, 4096)
        lines = [ln for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else ""

    def free_bytes(self, job_id: str) -> int | None:
        """Free space on the disk that holds the job's directory."""
        try:
            return shutil.disk_usage(self.path(job_id)).free
        except OSError:
            return None


def _tail(path: Path, size: int) -> bytes:
    """The last ``size`` bytes of a file (b"" if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - size))
            return f.read()
    except OSError:
        return b""

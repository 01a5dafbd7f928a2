"""The on-disk checkpoint index of a job, shared by the job process and the server.

``<job_dir>/checkpoints/manifest.json`` lists every committed checkpoint with
its epoch, step, time, size and content hash. A checkpoint file exists before
its manifest entry (it is renamed into place first), so the manifest never
lists a partial file, and the manifest write is the commit.

A listed file is never overwritten. Saving again under a listed name (a run
resumed from an earlier checkpoint passes the same epoch and step again)
writes a new file (``file`` in the entry; the ``name`` stays) and removes the
old one only after the manifest points at the new one: a kill at any moment
leaves the name listed with a file that matches its recorded hash.

Both writers, the job (saving) and the server (deleting), take an exclusive
``flock`` on ``.lock`` so neither loses the other's update.

This module must not import torch: the server uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, make_private_dir, read_json

MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def valid_checkpoint_name(name: str) -> bool:
    """A bare file name: no separators, no leading dot, nothing like ``..``."""
    return bool(_NAME_RE.match(name)) and ".." not in name


class CheckpointIndex:
    """The checkpoints of one job directory and their manifest."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the manifest lock (blocking) for a read-modify-write."""
        make_private_dir(self.dir)
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        data = read_json(self.dir / MANIFEST, default=None)
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            return {"version": 1, "seq": 0, "checkpoints": []}
        return data

    def entries(self) -> list[dict[str, Any]]:
        """Committed checkpoints, oldest first, each with its absolute ``path``.

        Entries whose file has disappeared are left out.
        """
        try:
            data = self._read()
        except ValueError:
            return []
        out = []
        for entry in data["checkpoints"]:
            if not isinstance(entry, dict) or not valid_checkpoint_name(str(entry.get("name"))):
                continue
            filename = _file_of(entry)
            if not valid_checkpoint_name(filename):
                continue
            path = self.dir / filename
            # A link could point anywhere: only real files of this directory count.
            if path.is_file() and not path.is_symlink():
                out.append({**entry, "path": str(path)})
        return out

    def get(self, name: str) -> dict[str, Any] | None:
        """The entry called ``name``, or ``None``."""
        for entry in self.entries():
            if entry["name"] == name:
                return entry
        return None

    def latest(self) -> dict[str, Any] | None:
        """The most recently saved checkpoint, or ``None``."""
        entries = self.entries()
        return entries[-1] if entries else None

    def file_for(self, name: str) -> str:
        """The file a new save called ``name`` should be written to.

        ``name`` itself unless a listed entry uses that file; then the first
        free ``<stem>.r<N><suffix>``. A file no entry lists is a leftover of a
        killed save and may be replaced.
        """
        try:
            used = {_file_of(e) for e in self._read()["checkpoints"] if isinstance(e, dict)}
        except ValueError:
            used = set()
        if name not in used:
            return name
        stem, dot, suffix = name.rpartition(".")
        if not dot:
            stem, suffix = name, ""
        n = 1
        while True:
            candidate = f"{stem}.r{n}.{suffix}" if suffix else f"{stem}.r{n}"
            if candidate not in used:
                return candidate
            n += 1

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a checkpoint whose file is already in place.

        An entry of the same name is replaced, and its file removed once the
        manifest no longer lists it.
        """
        with self.locked():
            data = self._read_or_reset()
            data["seq"] = int(data.get("seq", 0)) + 1
            entry = {**entry, "seq": data["seq"]}
            entry.pop("path", None)
            if entry.get("file") == entry["name"]:
                entry.pop("file")
            replaced = [e for e in data["checkpoints"] if e.get("name") == entry["name"]]
            data["checkpoints"] = [e for e in data["checkpoints"] if e.get("name") != entry["name"]]
            data["checkpoints"].append(entry)
            atomic_write_json(self.dir / MANIFEST, data)
            self._unlink_unlisted(replaced, data)
        return entry

    def remove(self, name: str) -> bool:
        """Delete a checkpoint file and its entry; ``False`` if there was none."""
        if not valid_checkpoint_name(name):
            return False
        with self.locked():
            data = self._read_or_reset()
            removed = [e for e in data["checkpoints"] if e.get("name") == name]
            if removed:
                data["checkpoints"] = [e for e in data["checkpoints"] if e.get("name") != name]
                # Entry first, file second: a crash in between leaves an
                # unlisted file (harmless), never a listed missing one.
                atomic_write_json(self.dir / MANIFEST, data)
                self._unlink_unlisted(removed, data)
        return bool(removed)

    def _unlink_unlisted(self, entries: list[Any], data: dict[str, Any]) -> None:
        """Delete the files of ``entries`` that no entry of ``data`` still uses."""
        still_used = {_file_of(e) for e in data["checkpoints"] if isinstance(e, dict)}
        for old in entries:
            filename = _file_of(old) if isinstance(old, dict) else ""
            if valid_checkpoint_name(filename) and filename not in still_used:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / filename).unlink()

    def _read_or_reset(self) -> dict[str, Any]:
        try:
            return self._read()
        except ValueError:
            # A damaged manifest is rebuilt from nothing rather than blocking
            # every future save; the files themselves are left on disk.
            return {"version": 1, "seq": 0, "checkpoints": []}


def _file_of(entry: dict[str, Any]) -> str:
    """The file that holds an entry's checkpoint (its name unless it was saved again)."""
    return str(entry.get("file") or entry.get("name"))

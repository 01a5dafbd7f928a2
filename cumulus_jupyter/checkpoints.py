"""The on-disk checkpoint index of a job, shared by the job process and the server.

``<job_dir>/checkpoints/manifest.json`` lists every committed checkpoint with
its epoch, step, time, size and SHA-256. A checkpoint file exists before its
manifest entry (it is renamed into place first), so the manifest never lists a
partial file. Both writers, the job (saving) and the server (deleting), take
an exclusive ``flock`` on ``.lock`` so neither loses the other's update.

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
            path = self.dir / entry["name"]
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

    def add(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a checkpoint whose file is already in place (replacing one of the same name)."""
        with self.locked():
            data = self._read_or_reset()
            data["seq"] = int(data.get("seq", 0)) + 1
            entry = {**entry, "seq": data["seq"]}
            entry.pop("path", None)
            data["checkpoints"] = [e for e in data["checkpoints"] if e.get("name") != entry["name"]]
            data["checkpoints"].append(entry)
            atomic_write_json(self.dir / MANIFEST, data)
        return entry

    def remove(self, name: str) -> bool:
        """Delete a checkpoint file and its entry; ``False`` if there was none."""
        if not valid_checkpoint_name(name):
            return False
        with self.locked():
            data = self._read_or_reset()
            before = len(data["checkpoints"])
            data["checkpoints"] = [e for e in data["checkpoints"] if e.get("name") != name]
            found = len(data["checkpoints"]) != before
            if found:
                # Entry first, file second: a crash in between leaves an
                # unlisted file (harmless), never a listed missing one.
                atomic_write_json(self.dir / MANIFEST, data)
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
        return found

    def _read_or_reset(self) -> dict[str, Any]:
        try:
            return self._read()
        except ValueError:
            # A damaged manifest is rebuilt from nothing rather than blocking
            # every future save; the files themselves are left on disk.
            return {"version": 1, "seq": 0, "checkpoints": []}

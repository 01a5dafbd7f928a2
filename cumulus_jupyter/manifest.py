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
``flock`` on ``.lock`` so neither loses the other's update. Every write of a
manifest or a sidecar happens under that lock, so a temporary file of theirs
seen by a holder of the lock was left by a writer that died.

Each committed file also has a sidecar, ``.<file>.json``, holding its entry
(written before the manifest, under the lock). A damaged or deleted manifest
is rebuilt from the sidecars whose file still matches its recorded hash, so
damage to one small file never unlists the checkpoints it described.

A checkpoint saved by the ranks of one job is a directory of files (see
``runtime/sharded.py``), listed with ``format: "dcp"``: its size is its files'
total and its hash covers the list of their names, sizes and hashes
(:func:`content_hash`). It is renamed into place, listed, rebuilt from its
sidecar and deleted exactly as a file is.

This module must not import torch: the server uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

from .fileio import atomic_write_json, make_private_dir, read_json

MANIFEST = "manifest.json"
#: Where a damaged manifest is kept for inspection after it was rebuilt.
DAMAGED_MANIFEST = "manifest.json.damaged"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
#: ``.<file>.<pid>.<hex>.tmp``: a checkpoint being written by process ``pid``.
_CHECKPOINT_TMP_RE = re.compile(r"^\.(?P<file>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

log = logging.getLogger(__name__)


def temporary_path(final: Path) -> Path:
    """Where a checkpoint is written before it is renamed to ``final``.

    The name carries the writer's pid, so a later run can tell a temporary
    file of a save still in progress (its process is alive) from one a
    killed save left behind.
    """
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _sidecar(directory: Path, filename: str) -> Path:
    return directory / f".{filename}.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    # A killed process whose parent died too stays a zombie until whoever
    # inherits it reaps it: it exists, but it writes nothing any more.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: existing is all we can tell
    return state not in (b"Z", b"X")


#: The content hash of new checkpoints: XXH3-128 runs at memory bandwidth, so
#: verifying costs one pass over the file's pages (about 0.2 s for 1.6 GB in
#: benchmarks/checkpoint.py), far less than writing them. It guards against
#: corruption and truncation, not against an attacker who can write the files.
HASH = "xxh3_128"


def hasher(algorithm: str) -> Any:
    """A new hash object for ``algorithm`` (``xxh3_128``, or a hashlib name)."""
    return xxhash.xxh3_128() if algorithm == HASH else hashlib.new(algorithm)


def file_hash(path: Path, algorithm: str) -> str:
    """``algorithm:hexdigest`` of a file's content (memory-mapped, one pass)."""
    h = hasher(algorithm)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                h.update(mapped)
    return f"{algorithm}:{h.hexdigest()}"


def content_hash(path: Path, algorithm: str) -> str:
    """``algorithm:hexdigest`` of a checkpoint: a file's content, or a sharded one's files.

    A sharded checkpoint (a directory written by several ranks) hashes the
    list of its files, each as ``name, size, hash of its content``, in name
    order: changing, truncating, adding or removing any shard changes it.
    """
    if not path.is_dir():
        return file_hash(path, algorithm)
    return tree_hash(file_listing(path, algorithm))


def file_listing(
    directory: Path, algorithm: str, names: list[str] | None = None
) -> dict[str, tuple[int, str]]:
    """``{name: (size, "alg:hex")}`` of a sharded checkpoint's files (or of ``names`` only)."""
    if names is None:
        names = [f.name for f in checkpoint_files(directory)]
    return {n: ((directory / n).stat().st_size, file_hash(directory / n, algorithm)) for n in names}


def tree_hash(files: dict[str, tuple[int, str]]) -> str:
    """The hash of a sharded checkpoint from its files' ``{name: (size, "alg:hex")}``."""
    algorithm = next(iter(files.values()))[1].split(":", 1)[0] if files else HASH
    h = hasher(algorithm)
    for name in sorted(files):
        size, digest = files[name]
        h.update(f"{name}\t{size}\t{digest}\n".encode())
    return f"{algorithm}:{h.hexdigest()}"


def content_size(path: Path) -> int:
    """Bytes a checkpoint takes: its file, or all the files of a sharded one."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(f.stat().st_size for f in checkpoint_files(path))


def checkpoint_files(directory: Path) -> list[Path]:
    """The regular files of a sharded checkpoint's directory (links are not followed)."""
    return sorted(
        (f for f in directory.iterdir() if f.is_file() and not f.is_symlink()),
        key=lambda f: f.name,
    )


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint's file or a sharded checkpoint's directory, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


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

    def changed_ns(self) -> int | None:
        """When the manifest last changed (ns), None without one: a cheap "anything new?"."""
        try:
            return os.stat(self.dir / MANIFEST).st_mtime_ns
        except OSError:
            return None

    def _read(self) -> dict[str, Any]:
        """The manifest; :class:`ValueError` when it is damaged or missing with sidecars."""
        data = read_json(self.dir / MANIFEST, default=None)
        if data is None:
            if any(self.dir.glob(".*.json")):
                raise ValueError(f"{self.dir / MANIFEST} is missing")
            return {"version": 1, "seq": 0, "checkpoints": []}
        if not isinstance(data, dict) or not isinstance(data.get("checkpoints"), list):
            raise ValueError(f"{self.dir / MANIFEST} is not a checkpoint manifest")
        return data

    def clean_stale_temporaries(self) -> list[Path]:
        """Remove temporary files that killed writers left behind; return them.

        A checkpoint's temporary file goes only when the process named in it
        is gone (a save in progress elsewhere keeps its file). Manifest and
        sidecar temporaries are written under the lock, so while this holds
        the lock any of them is stale.
        """
        removed: list[Path] = []
        if not self.dir.is_dir():
            return removed
        with self.locked():
            for path in self.dir.glob(".*.tmp"):
                match = _CHECKPOINT_TMP_RE.match(path.name)
                if match is not None:
                    pid = int(match["pid"])
                    if pid == os.getpid() or _alive(pid):
                        continue
                if path.exists() or path.is_symlink():
                    remove_checkpoint(path)
                    removed.append(path)
        return removed

    def entries(self) -> list[dict[str, Any]]:
        """Committed checkpoints, oldest first, each with its absolute ``path``.

        Entries whose file has disappeared are left out. A damaged or missing
        manifest is rebuilt first (see :meth:`rebuild`).
        """
        try:
            data = self._read()
        except ValueError:
            with self.locked():
                data = self._read_or_rebuild()
        out = []
        for entry in data["checkpoints"]:
            if not isinstance(entry, dict) or not valid_checkpoint_name(str(entry.get("name"))):
                continue
            filename = _file_of(entry)
            if not valid_checkpoint_name(filename):
                continue
            path = self.dir / filename
            # A link could point anywhere: only real files of this directory count.
            if _present(path, entry):
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
        # A file that only a sidecar describes may be listed again by a rebuild.
        used |= {p.name[1:-5] for p in self.dir.glob(".*.json")}
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
            data = self._read_or_rebuild()
            data["seq"] = int(data.get("seq", 0)) + 1
            entry = {**entry, "seq": data["seq"]}
            entry.pop("path", None)
            if entry.get("file") == entry["name"]:
                entry.pop("file")
            replaced = [e for e in data["checkpoints"] if e.get("name") == entry["name"]]
            data["checkpoints"] = [e for e in data["checkpoints"] if e.get("name") != entry["name"]]
            data["checkpoints"].append(entry)
            # The sidecar first: a manifest lost later can be rebuilt from it.
            atomic_write_json(_sidecar(self.dir, _file_of(entry)), entry)
            atomic_write_json(self.dir / MANIFEST, data)
            self._unlink_unlisted(replaced, data)
        return entry

    def remove(self, name: str) -> bool:
        """Delete a checkpoint file and its entry; ``False`` if there was none."""
        if not valid_checkpoint_name(name):
            return False
        with self.locked():
            data = self._read_or_rebuild()
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
                # The file before its sidecar: a sidecar without a file is ignored.
                for path in (self.dir / filename, _sidecar(self.dir, filename)):
                    remove_checkpoint(path)

    def _read_or_rebuild(self) -> dict[str, Any]:
        """The manifest, rebuilt and written first if it is damaged (hold the lock)."""
        try:
            return self._read()
        except ValueError as e:
            return self.rebuild(str(e))

    def rebuild(self, reason: str = "rebuild requested") -> dict[str, Any]:
        """Write the manifest anew from the sidecars whose file still verifies (hold the lock).

        Each sidecar names a file, its size and its content hash; a file that
        is missing, has another size or does not match the hash is left out
        (and left on disk). The damaged manifest is kept as
        ``manifest.json.damaged``. Returns the new manifest.
        """
        manifest = self.dir / MANIFEST
        with contextlib.suppress(FileNotFoundError):
            os.replace(manifest, self.dir / DAMAGED_MANIFEST)
        found: dict[str, dict[str, Any]] = {}
        for sidecar in self.dir.glob(".*.json"):
            entry = self._verified_sidecar(sidecar)
            if entry is None:
                continue
            current = found.get(entry["name"])
            if current is None or int(entry.get("seq", 0)) > int(current.get("seq", 0)):
                found[entry["name"]] = entry
        entries = sorted(found.values(), key=lambda e: (int(e.get("seq", 0)), e.get("time") or 0))
        data = {
            "version": 1,
            "seq": max((int(e.get("seq", 0)) for e in entries), default=0),
            "checkpoints": entries,
            "rebuilt": {"time": time.time(), "reason": reason},
        }
        atomic_write_json(manifest, data)
        log.warning(
            "cumulus: rebuilt %s (%s): %d checkpoint(s) verified and listed again",
            manifest,
            reason,
            len(entries),
        )
        return data

    def _verified_sidecar(self, sidecar: Path) -> dict[str, Any] | None:
        try:
            entry = read_json(sidecar)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not valid_checkpoint_name(str(entry.get("name"))):
            return None
        filename = _file_of(entry)
        path = self.dir / filename
        recorded = str(entry.get("hash") or "")
        if (
            sidecar.name != f".{filename}.json"
            or not valid_checkpoint_name(filename)
            or ":" not in recorded
            or not _present(path, entry)
        ):
            return None
        try:
            if (
                content_size(path) != entry.get("size")
                or content_hash(path, recorded.split(":", 1)[0]) != recorded
            ):
                return None
        except (OSError, ValueError):
            return None
        return entry


#: ``format`` of a manifest entry whose checkpoint is a directory of shards
#: written with ``torch.distributed.checkpoint`` by the ranks of one job.
SHARDED = "dcp"


def _present(path: Path, entry: dict[str, Any]) -> bool:
    """Whether an entry's checkpoint is there: a real file, or a real directory if sharded."""
    if path.is_symlink():
        return False
    return path.is_dir() if entry.get("format") == SHARDED else path.is_file()


def _file_of(entry: dict[str, Any]) -> str:
    """The file that holds an entry's checkpoint (its name unless it was saved again)."""
    return str(entry.get("file") or entry.get("name"))

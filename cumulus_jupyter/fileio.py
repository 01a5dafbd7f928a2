"""Small, durable file primitives shared by the server, the SDK and the job process.

Every file in a job directory is written with :func:`atomic_write_bytes` so a
crash or a kill never leaves a half-written ``state.json`` or manifest behind:
readers see either the old content or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import tempfile
from pathlib import Path
from typing import Any

#: Files and directories of a job are private to the user running the server.
FILE_MODE = 0o600
DIR_MODE = 0o700


def readable_now(fd: Any) -> bool:
    """Whether a descriptor (or an object with ``fileno()``) can be read without waiting.

    ``poll``, not ``select``: a server or a kernel may hold descriptors
    numbered above 1024, which ``select`` refuses.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    The bytes go to a temporary file in the same directory (same filesystem,
    so the rename is atomic) and are renamed into place: a reader, or a
    process that crashes and starts again, sees the old content or the new.
    With ``durable`` the file and its directory are also fsynced, so the
    write survives a power loss; the server's records skip that, because an
    fsync can take tens of milliseconds and the event loop must not wait.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the JSON our files hold (indented, keys sorted, anything else as text)."""
    return json.dumps(obj, indent=1, sort_keys=True, default=str).encode()


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> None:
    """Serialise ``obj`` as JSON and write it atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, json_bytes(obj), durable=durable)


def read_json(path: str | os.PathLike[str], default: Any = None) -> Any:
    """Read a JSON file, returning ``default`` if it is missing.

    A file that exists but does not parse raises :class:`ValueError` naming the
    file, so callers can report a damaged job instead of crashing.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return default
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def make_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and parents) readable only by the current user."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path

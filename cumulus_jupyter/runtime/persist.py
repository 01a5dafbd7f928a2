"""Checkpoint files on disk: atomic, durable, verified.

A save is two steps, so the slow one can run beside training:

1. *snapshot*: copy the state to CPU memory (the only part training waits
   for when saving asynchronously);
2. *persist*: serialise to a temporary file in the same directory, fsync it,
   rename it into place, fsync the directory, then list it in the manifest.

A crash, a kill or a full disk at any moment leaves the previous checkpoints
intact and no partial file listed. Reads check the SHA-256 recorded at save.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import secrets
from pathlib import Path
from typing import Any

import torch

from ..fileio import FILE_MODE, fsync_dir

FORMAT = "cumulus-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file."""


def snapshot(obj: Any) -> Any:
    """A deep copy of ``obj`` whose tensors live in CPU memory and share nothing.

    Training may go on changing its parameters in place while the copy is
    written out.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = {k: snapshot(v) for k, v in obj.items()}
        if type(obj) is dict:
            return copied
        # A module's state dict is an OrderedDict whose _metadata (versions)
        # load_state_dict reads.
        out = type(obj)(copied)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through, so nothing is read back."""

    def __init__(self, f: Any):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        # torch's writer turns a failed write into an unrelated RuntimeError;
        # keep the real cause (e.g. "File too large") to report it.
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.size += mv.nbytes
        try:
            self._f.write(mv)
        except OSError as e:
            self.error = self.error or e
            raise
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()


def _tmp_path(final: Path) -> Path:
    # The pid tells a later run which temporary files are stale.
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove temporary files that a killed save left behind (not this process's)."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for path in directory.glob(".*.tmp"):
            parts = path.name.split(".")
            pid = parts[-3] if len(parts) >= 4 else ""
            if pid != str(os.getpid()):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def write_checkpoint(state: dict[str, Any], final: Path) -> tuple[int, str]:
    """Persist ``state`` at ``final`` atomically; return (size, sha256 hex)."""
    tmp = _tmp_path(final)
    writer: _HashingWriter | None = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)  # type: ignore[arg-type]  # a write-only file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError):
            reason = cause.strerror or str(cause)
            raise CheckpointError(
                f"could not save checkpoint {final}: {reason} (is the disk full?); "
                "the previous checkpoints are unchanged"
            ) from cause
        raise
    assert writer is not None
    return writer.size, writer.sha.hexdigest()


def read_checkpoint(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file, checking its hash when one is known."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: its content does not match the "
            "hash recorded when it was saved"
        )
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # `extra` may hold objects weights_only refuses; the file passed the
        # hash check, so it is the job's own, written by Checkpointer.save.
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cumulus checkpoint")
    return state

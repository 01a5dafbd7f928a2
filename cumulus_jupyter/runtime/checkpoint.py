"""``Checkpointer``: save and restore a training run, RNG states included."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointIndex
from ..fileio import FILE_MODE, fsync_dir
from ..jobcontext import job_dir, read_control
from .rng import capture_rng_state, restore_rng_state

_FORMAT = "cumulus-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file."""


def checkpoint_dir() -> Path:
    """Where the current job keeps its checkpoints."""
    return job_dir() / "checkpoints"


def list_checkpoints() -> list[dict[str, Any]]:
    """All committed checkpoints of the current job, oldest first.

    Each entry has ``name``, ``path``, ``epoch``, ``step``, ``time``, ``size``
    and ``sha256``.
    """
    return CheckpointIndex(checkpoint_dir()).entries()


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes what passes through, so saving reads nothing back."""

    def __init__(self, f: Any):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.size += mv.nbytes
        return self._f.write(mv)

    def flush(self) -> None:
        self._f.flush()


class Checkpointer:
    """Saves and restores model, optimizer, epoch, step and every RNG state.

    Inside a job, checkpoints live in the job's ``checkpoints/`` directory and
    are listed in its manifest, so the server, the widgets and
    :func:`list_checkpoints` see them. Each :meth:`save` writes a new file named
    after ``fname`` and the position (``checkpoint-e3-s120.pt``); :meth:`load`
    reads the newest one, or the one a resume asked for.

    ``fname`` may also be the path of an existing checkpoint file (for example
    one listed by another job): :meth:`load` then reads that file, while
    :meth:`save` still writes into this job's own directory, so nothing that
    was saved elsewhere is ever overwritten.

    Example::

        ckpt = Checkpointer()
        if ckpt.exists():
            state = ckpt.load(model, optimizer)
            start_epoch, start_step = state["epoch"], state["step"] + 1
    """

    def __init__(self, fname: str | os.PathLike[str] = "checkpoint.pt"):
        fname = os.fspath(fname)
        candidate = Path(fname).expanduser()
        self._source: Path | None = None
        if candidate.is_absolute() or os.sep in fname:
            # A path names one specific checkpoint to load from.
            self._source = candidate.resolve()
        self._stem = Path(fname).stem or "checkpoint"
        self._suffix = Path(fname).suffix or ".pt"
        self.index = CheckpointIndex(checkpoint_dir())
        self._last_saved: Path | None = None
        self._last_save_time = time.monotonic()

    # -- where -----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file last saved, else the one :meth:`load` would read, else where saves go."""
        if self._last_saved is not None:
            return str(self._last_saved)
        target = self._load_target()
        if target is not None:
            return str(target)
        return str(self.index.dir / f"{self._stem}{self._suffix}")

    def _load_target(self) -> Path | None:
        if self._last_saved is not None:
            return self._last_saved
        if self._source is not None:
            return self._source
        wanted = read_control().get("resume_checkpoint")
        if wanted:
            entry = self.index.get(str(wanted))
            if entry is None:
                raise CheckpointError(
                    f"the resume asked for checkpoint {wanted!r}, which is not in "
                    f"{self.index.dir}; list them with list_checkpoints()"
                )
            return Path(entry["path"])
        latest = self.index.latest()
        return Path(latest["path"]) if latest else None

    def exists(self) -> bool:
        """Whether there is a checkpoint to load."""
        target = self._load_target()
        return target is not None and target.is_file()

    # -- save ------------------------------------------------------------------

    def time_to_checkpoint(
        self, step: int, every_steps: int | None = None, every_seconds: float | None = None
    ) -> bool:
        """Whether a periodic checkpoint is due at ``step``.

        True every ``every_steps`` steps (not at step 0) or when
        ``every_seconds`` have passed since the last save (or since this
        Checkpointer was made).
        """
        if every_steps is not None and every_steps <= 0:
            raise ValueError("every_steps must be a positive number of steps")
        if every_steps and step > 0 and step % every_steps == 0:
            return True
        if every_seconds:
            return time.monotonic() - self._last_save_time >= every_seconds
        return False

    def save(
        self,
        model: Any,
        optimizer: Any = None,
        epoch: int = 0,
        step: int = 0,
        extra: Any = None,
    ) -> str:
        """Save a checkpoint and return its path.

        The file is written to a temporary name, fsynced, renamed into place
        and only then listed in the manifest: a crash at any moment leaves the
        previous checkpoints intact and no partial file listed.
        """
        state = {
            "format": _FORMAT,
            "version": 1,
            "model": _state_dict(model),
            "optimizer": _state_dict(optimizer),
            "epoch": int(epoch),
            "step": int(step),
            "extra": extra,
            "rng": capture_rng_state(),
            "time": time.time(),
        }
        directory = self.index.dir
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"{self._stem}-e{int(epoch)}-s{int(step)}{self._suffix}"
        final = directory / name
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(state, writer)  # type: ignore[arg-type]  # a write-only file
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, final)
            fsync_dir(directory)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise CheckpointError(
                    f"could not save checkpoint {final}: {e.strerror or e}; "
                    "the previous checkpoints are unchanged"
                ) from e
            raise
        self.index.add(
            {
                "name": name,
                "epoch": int(epoch),
                "step": int(step),
                "time": state["time"],
                "size": writer.size,
                "sha256": writer.sha.hexdigest(),
            }
        )
        self._last_saved = final
        self._last_save_time = time.monotonic()
        return str(final)

    # -- load ------------------------------------------------------------------

    def load(
        self, model: Any = None, optimizer: Any = None, checkpoint: str | None = None
    ) -> dict[str, Any]:
        """Restore ``model``, ``optimizer`` and the RNG states from a checkpoint.

        Reads ``checkpoint`` (a name from :func:`list_checkpoints` or a path)
        when given, else the file this Checkpointer was made for, else the one
        the resume asked for, else the newest. Returns ``{'epoch', 'step',
        'extra', 'path', 'name', 'time'}``; ``step`` is the step the checkpoint
        was saved at, so training continues at ``step + 1``.
        """
        if checkpoint is not None:
            entry = self.index.get(checkpoint)
            path = Path(entry["path"]) if entry else Path(checkpoint).expanduser()
        else:
            target = self._load_target()
            if target is None:
                raise CheckpointError(
                    f"no checkpoint to load in {self.index.dir}; check exists() first"
                )
            path = target
        state = _read_checkpoint(path, self.index)
        if model is not None and state.get("model") is not None:
            model.load_state_dict(state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state.get("rng") or {})
        return {
            "epoch": state.get("epoch", 0),
            "step": state.get("step", 0),
            "extra": state.get("extra"),
            "path": str(path),
            "name": path.name,
            "time": state.get("time"),
        }


def _state_dict(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__}: pass a torch module or optimizer "
        "(anything with state_dict() and load_state_dict())"
    )


def _read_checkpoint(path: Path, index: CheckpointIndex) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    entry = index.get(path.name) if path.parent == index.dir else None
    if entry and entry.get("sha256") and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match the hash "
            "recorded when it was saved"
        )
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # `extra` may hold objects weights_only refuses; this file is the
        # job's own, written by Checkpointer.save, so a full load is allowed.
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a cumulus checkpoint")
    return state

"""Checkpoint files on disk: atomic, durable, listed, verified; finding the one to load.

A save is two steps, so the slow one can run beside training:

1. *snapshot*: copy the state to CPU memory (the only part training waits
   for when saving asynchronously; CUDA tensors are copied on a side stream
   that the training's stream waits for, so not even that);
2. *persist*: serialise to a temporary file in the same directory, fsync it,
   rename it into place, fsync the directory, then list it in the manifest.

:func:`commit_checkpoint` does step 2. A crash, a kill or a full disk at any
moment leaves the previous checkpoints intact and no partial file listed.
Reads check the XXH3-128 hash recorded at save (or the SHA-256 of checkpoints
listed before the switch to XXH3).
:func:`read_newest_good` falls back past corrupt files to the newest one that
reads back.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..fileio import FILE_MODE, fsync_dir
from ..manifest import HASH, CheckpointIndex, file_hash, hasher, temporary_path

FORMAT = "cumulus-checkpoint"


def entry_hash(entry: dict[str, Any] | None) -> str | None:
    """The ``algorithm:hexdigest`` recorded for a manifest entry, if any."""
    if not entry:
        return None
    if entry.get("hash"):
        return str(entry["hash"])
    if entry.get("sha256"):  # manifests written before the switch to XXH3
        return f"sha256:{entry['sha256']}"
    return None


@contextlib.contextmanager
def _no_zip_crc() -> Iterator[None]:
    """Skip torch's per-record CRC32 while saving: the content hash covers the file."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # older torch: CRC32 it is
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the file."""


def snapshot(obj: Any, staging: Any = None) -> Any:
    """A deep copy of ``obj`` whose tensors live in CPU memory and share nothing.

    Training may go on changing its parameters in place while the copy is
    written out. ``staging`` is the previous snapshot of the same structure:
    its tensors are reused when shapes match, because copying into memory
    that is already mapped is several times faster than into fresh pages.
    """
    copier = _Copier(background=False)
    with copier.all_cores():
        return copier.tree(obj, staging)


def snapshot_for_write(obj: Any, staging: Any = None) -> tuple[Any, Callable[[], None]]:
    """Like :func:`snapshot`, for a background write: the copy and a ``ready`` to call.

    CPU tensors are copied before this returns, with every core this process
    may use (training waits for this part, so it may as well be short). CUDA
    tensors are copied into pinned host buffers on a side stream of their
    device, and this returns once those copies are queued: the device's
    current stream waits for them before any later work (so nothing the
    training does next can change a tensor before it is copied), and the
    writer calls ``ready()`` before it reads the copy.
    """
    copier = _Copier(background=True)
    with copier.all_cores():
        copy = copier.tree(obj, staging)
    return copy, copier.queued()


# One side stream per CUDA device for the copies of asynchronous saves.
_COPY_STREAMS: dict[Any, Any] = {}


class _Copier:
    """Copies a state's tensors to CPU memory, reusing a previous copy's buffers."""

    def __init__(self, background: bool):
        self.background = background
        self._streams: dict[Any, Any] = {}  # device -> side stream used by this copy

    @contextlib.contextmanager
    def all_cores(self) -> Iterator[None]:
        """Copy with every core the process may use (torch's copy is parallel, memory-bound)."""
        before = torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        more = cores > before
        if more:
            torch.set_num_threads(cores)
        try:
            yield
        finally:
            if more:
                torch.set_num_threads(before)

    def tree(self, obj: Any, staging: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj.detach(), staging)
        if isinstance(obj, dict):
            previous = staging if isinstance(staging, dict) else {}
            copied = {k: self.tree(v, previous.get(k)) for k, v in obj.items()}
            if type(obj) is dict:
                return copied
            # A module's state dict is an OrderedDict whose _metadata (versions)
            # load_state_dict reads.
            out = type(obj)(copied)
            if hasattr(obj, "_metadata"):
                out._metadata = obj._metadata  # type: ignore[attr-defined]
            return out
        if isinstance(obj, list | tuple):
            same = isinstance(staging, list | tuple) and len(staging) == len(obj)
            old = staging if same else None
            items = [self.tree(v, old[i] if old else None) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    def tensor(self, src: torch.Tensor, staging: Any) -> torch.Tensor:
        side = self.background and src.is_cuda
        reusable = (
            isinstance(staging, torch.Tensor)
            and staging.shape == src.shape
            and staging.dtype == src.dtype
            and staging.is_contiguous()
            and (not side or staging.is_pinned())
        )
        if not side:
            if reusable:
                return staging.copy_(src)
            return src.to("cpu", copy=True)
        target = (
            staging
            if reusable
            else torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=True)
        )
        with torch.cuda.stream(self._stream(src.device)):
            target.copy_(src, non_blocking=True)
        return target

    def _stream(self, device: Any) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = _COPY_STREAMS.get(device)
            if stream is None:
                stream = _COPY_STREAMS[device] = torch.cuda.Stream(device)
            # The copies see everything queued so far: the step that made the values.
            stream.wait_stream(torch.cuda.current_stream(device))
            self._streams[device] = stream
        return stream

    def queued(self) -> Callable[[], None]:
        """Order later work after the queued copies; return what waits for them."""
        events = []
        for device, stream in self._streams.items():
            event = torch.cuda.Event()
            event.record(stream)
            # In-place updates queued from now on (optimizer.step) run after the copy.
            torch.cuda.current_stream(device).wait_event(event)
            events.append(event)

        def ready() -> None:
            for event in events:
                event.synchronize()

        return ready


class _HashingWriter:
    """A write-only file that hashes what passes through, so nothing is read back."""

    def __init__(self, f: Any):
        self._f = f
        self.hash = hasher(HASH)
        self.size = 0
        # torch's writer turns a failed write into an unrelated RuntimeError;
        # keep the real cause (e.g. "File too large") to report it.
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.hash.update(mv)
        self.size += mv.nbytes
        try:
            self._f.write(mv)
        except OSError as e:
            self.error = self.error or e
            raise
        return mv.nbytes

    def flush(self) -> None:
        self._f.flush()


def write_checkpoint(state: dict[str, Any], final: Path) -> tuple[int, str]:
    """Persist ``state`` at ``final`` atomically; return (size, "algorithm:hexdigest")."""
    tmp = temporary_path(final)
    writer: _HashingWriter | None = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            writer = _HashingWriter(f)
            with _no_zip_crc():
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
    return writer.size, f"{HASH}:{writer.hash.hexdigest()}"


def read_checkpoint(path: Path, expected_hash: str | None = None) -> dict[str, Any]:
    """Load a checkpoint file, checking its content hash when one is known.

    Tensors are memory-mapped from the file (no copy is made here), and the
    hash is computed over those same mapped pages, so a verified read costs
    one pass over the file. Copy what must outlive the file (``load`` copies
    into the model and optimizer).
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if expected_hash:
        algorithm = expected_hash.split(":", 1)[0]
        try:
            actual = file_hash(path, algorithm)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
        if actual != expected_hash:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: its content does not match the "
                "hash recorded when it was saved"
            )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        if not expected_hash:
            raise CheckpointError(
                f"checkpoint {path} holds objects that only a full unpickling can load, and "
                "no recorded hash vouches for it: refusing to load it. Load it by its name "
                "inside the job that saved it, or, if you trust the file, with "
                "torch.load(path, weights_only=False)"
            ) from None
        # `extra` holds objects weights_only refuses; the hash shows the file
        # is the one Checkpointer.save wrote for this job.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} could not be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a cumulus checkpoint")
    return state


def entry_at(index: CheckpointIndex, path: Path) -> dict[str, Any] | None:
    """The entry of ``index`` whose file is ``path``, if it is one of that index's."""
    if path.parent != index.dir:
        return None
    return next((e for e in index.entries() if e["path"] == str(path)), None)


def read_newest_good(
    index: CheckpointIndex,
    read: Callable[[Path, str | None], dict[str, Any]] | None = None,
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The newest checkpoint of ``index`` that reads back: its path, entry and state.

    ``read(path, expected_hash)`` reads one (:func:`read_checkpoint` when not given).

    Corrupt newer ones are skipped, and said so on stderr; raises
    :class:`CheckpointError` when there is none or none can be read.
    """
    entries = index.entries()
    if not entries:
        raise CheckpointError(f"no checkpoint to load in {index.dir}; check exists() first")
    failures = []
    for entry in reversed(entries):
        path = Path(entry["path"])
        try:
            state = (read or read_checkpoint)(path, entry_hash(entry))
        except CheckpointError as e:
            failures.append(str(e))
            continue
        if failures:
            print(
                f"cumulus: {'; '.join(failures)}. Loaded the newest good checkpoint "
                f"instead: {entry['name']}",
                file=sys.stderr,
                flush=True,
            )
        return path, entry, state
    raise CheckpointError("no checkpoint could be loaded: " + "; ".join(failures))


def commit_checkpoint(
    index: CheckpointIndex, state: dict[str, Any], name: str, final: Path, metrics: dict[str, Any]
) -> None:
    """Write ``state`` at ``final`` and list it in ``index`` as ``name`` with ``metrics``.

    Raises :class:`CheckpointError` if either step fails; the file is then
    not left behind, and the previous checkpoints are unchanged.
    """
    size, content_hash = write_checkpoint(state, final)
    entry = {
        "name": name,
        "file": final.name,
        "epoch": state["epoch"],
        "step": state["step"],
        "time": state["time"],
        "size": size,
        "hash": content_hash,
        "metrics": metrics,
    }
    try:
        index.add(entry)
    except OSError as e:  # listed or not at all: never a file the manifest lacks
        final.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not record checkpoint {final} in the manifest: {e.strerror or e}; "
            "the previous checkpoints are unchanged"
        ) from e

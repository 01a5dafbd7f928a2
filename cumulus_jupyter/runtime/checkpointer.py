"""``Checkpointer``: save and restore a training run exactly, RNG states included."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, overload

from ..jobdir import JobDir
from ..manifest import CheckpointIndex
from ..metrics import POSITION_FIELDS
from . import context, sharded
from .context import job_dir, read_control
from .loop import ExactLoop
from .persist import (
    CheckpointError,
    commit_checkpoint,
    entry_at,
    entry_hash,
    read_checkpoint,
    read_newest_good,
    snapshot,
    snapshot_for_write,
)
from .reporting import last_reported
from .retention import Retention
from .rng import restore_rng_state
from .sharded import SUFFIX, ShardedSaver
from .state import check_schedulers, saved_global_step, scheduler_list, training_state

__all__ = ["CheckpointError", "Checkpointer", "checkpoint_dir", "list_checkpoints"]


def _read(path: Path, expected_hash: str | None) -> dict[str, Any]:
    """A checkpoint's state: a file's, or this rank's of a sharded directory (checked whole)."""
    if path.is_dir():
        return sharded.read_rank_state(path, expected_hash)
    return read_checkpoint(path, expected_hash)


def checkpoint_dir() -> Path:
    """Where the current job keeps its checkpoints."""
    return JobDir(job_dir()).checkpoints


def list_checkpoints() -> list[dict[str, Any]]:
    """All committed checkpoints of the current job, oldest first.

    Each entry has ``name``, ``path``, ``epoch``, ``step``, ``time``, ``size``,
    ``hash`` (``xxh3_128:<hex>``) and the ``metrics`` last reported before it
    was saved.
    """
    return CheckpointIndex(checkpoint_dir()).entries()


class Checkpointer:
    """Saves and restores model, optimizer, epoch, step and every RNG state.

    Inside a job, checkpoints live in the job's ``checkpoints/`` directory and
    are listed in its manifest, so the server, the widgets and
    :func:`list_checkpoints` see them. Each :meth:`save` writes a new file named
    after ``fname`` and the position (``checkpoint-e3-s120.pt``); :meth:`load`
    reads the newest good one, or the one a resume asked for.

    ``fname`` may also be the path of an existing checkpoint file (for example
    one listed by another job): :meth:`load` then reads that file, while
    :meth:`save` still writes into this job's own directory, so nothing saved
    elsewhere is ever overwritten.

    Retention (all off by default): ``keep_last`` newest checkpoints,
    every checkpoint whose step is a multiple of ``keep_every``, and the
    ``keep_best`` best by ``best_metric`` (``best_mode`` ``'min'`` or ``'max'``,
    from ``metrics=`` or the last :func:`report`). The newest checkpoint and
    the one a resume asked for are never deleted.

    ``blocking=False`` makes saves asynchronous by default: training waits
    only for a copy of the state in CPU memory (for CUDA tensors, not even
    that: they are copied on a side stream that training's stream waits for).

    Example, exact resume with :meth:`loop`::

        ckpt = Checkpointer(keep_last=3)
        if ckpt.exists():
            ckpt.load(model, optimizer)
        for epoch, step, (x, y) in ckpt.loop(loader, epochs=10):
            ...
            if should_pause():
                ckpt.save(model, optimizer, epoch, step)
                return {"status": "paused"}

    Counters and schedulers: the global step (batches done over all epochs)
    is saved with every checkpoint and returned by :meth:`load`; :meth:`loop`
    yields it with ``with_global_step=True``; ``scheduler=`` saves and
    restores ``torch.optim.lr_scheduler`` state::

        if ckpt.exists():
            ckpt.load(model, optimizer, scheduler=scheduler)
        for epoch, step, it, batch in ckpt.loop(loader, 10, with_global_step=True):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it)  # warmup + cosine from the global step, or:
            ...
            scheduler.step()  # a torch scheduler, saved and restored with scheduler=
            if should_pause():
                ckpt.save(model, optimizer, epoch, step, scheduler=scheduler)
                return {"status": "paused"}
    """

    def __init__(
        self,
        fname: str | os.PathLike[str] = "checkpoint.pt",
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        keep_best: int | None = None,
        best_metric: str = "loss",
        best_mode: str = "min",
        blocking: bool = True,
    ):
        fname = os.fspath(fname)
        candidate = Path(fname).expanduser()
        self._source: Path | None = None
        if candidate.is_absolute() or os.sep in fname:
            # A path names one specific checkpoint to load from.
            self._source = candidate.resolve()
        # Saves are named after fname without a position: loading from
        # "checkpoint-e4-s299.pt" must not name the next save "...-s299-e5-s300.pt".
        self._stem = re.sub(r"-e\d+-s\d+$", "", Path(fname).stem) or "checkpoint"
        self._suffix = Path(fname).suffix or ".pt"
        # The names this Checkpointer's saves get: retention prunes among these only.
        self._series = re.compile(
            rf"{re.escape(self._stem)}-e\d+-s\d+({re.escape(self._suffix)}|{re.escape(SUFFIX)})"
        )
        self.retention = Retention(keep_last, keep_every, keep_best, best_metric, best_mode)
        self.blocking = blocking
        self.index = CheckpointIndex(checkpoint_dir())
        self._last_saved: Path | None = None
        self._last_save_time = time.monotonic()
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._staging: dict[str, Any] | None = None  # last async snapshot, reused
        self._sharded: ShardedSaver | None = None  # saves of a job of several ranks
        self._loop = ExactLoop()  # loop()'s position: what save() records, load() sets
        self.index.clean_stale_temporaries()

    # -- where -----------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file last saved, else the one :meth:`load` would read, else where saves go."""
        if self._last_saved is not None:
            return str(self._last_saved)
        target = self._explicit_target() or self._newest()
        if target is not None:
            return str(target)
        return str(self.index.dir / f"{self._stem}{self._suffix}")

    def _explicit_target(self) -> Path | None:
        """The checkpoint this run was told to load: a path, or the resume's choice."""
        if self._source is not None:
            return self._source
        wanted = read_control().get("resume_checkpoint")
        if wanted and self._last_saved is None:
            entry = self.index.get(str(wanted))
            if entry is None:
                raise CheckpointError(
                    f"the resume asked for checkpoint {wanted!r}, which is not in "
                    f"{self.index.dir}; list them with list_checkpoints()"
                )
            return Path(entry["path"])
        return None

    def _newest(self) -> Path | None:
        latest = self.index.latest()
        return Path(latest["path"]) if latest else None

    def exists(self) -> bool:
        """Whether there is a checkpoint to load."""
        target = self._explicit_target() or self._newest()
        return target is not None and (target.is_file() or target.is_dir())

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
        *,
        metrics: dict[str, Any] | None = None,
        blocking: bool | None = None,
        global_step: int | None = None,
        scheduler: Any = None,
    ) -> str:
        """Save a checkpoint and return its path.

        With ``blocking=False`` (or the Checkpointer's default) this returns
        once the state's CPU tensors are copied and its CUDA tensors' copies
        are queued (the device runs them before anything queued later); the
        file is written beside training (one save at a time: the next save,
        :meth:`wait`, and the job's pause or exit wait for it). A crash at any moment leaves the
        previous checkpoints intact and no partial file listed.

        ``global_step`` is the number of batches done over all epochs, the
        counter a schedule such as nanoGPT's ``get_lr(iter_num)`` is computed
        from; :meth:`load` returns it. Inside (or after) :meth:`loop` it is
        recorded by itself: the batches the loop has yielded, the current one
        included. Pass it to record something else (for example optimizer
        steps under gradient accumulation; the loop still continues its own
        batch count), or when training without :meth:`loop`. A checkpoint
        saved without :meth:`loop` and without ``global_step=`` does not
        record one (see :meth:`load`).

        ``scheduler`` is a learning-rate scheduler (anything with
        ``state_dict()`` and ``load_state_dict()``, such as a
        ``torch.optim.lr_scheduler.LambdaLR``), or a list of them; pass the
        same to :meth:`load` to restore them.
        """
        self.wait()  # one save in flight at most, and surface its error now
        blocking = self.blocking if blocking is None else blocking
        if global_step is None:
            global_step = self._loop.global_step
        elif int(global_step) < 0:
            raise ValueError(f"global_step counts batches done: got {global_step}")
        several = context.world_size() > 1
        # A job of several ranks shards model and optimizer with
        # torch.distributed.checkpoint; the rest is each rank's own.
        state = training_state(
            None if several else model,
            None if several else optimizer,
            epoch,
            step,
            extra,
            global_step=global_step,
            scheduler=scheduler,
        )
        if (loop_state := self._loop.saved_state()) is not None:
            state["loop"] = loop_state
        if metrics is None:
            metrics = last_reported()
        entry_metrics = {k: v for k, v in (metrics or {}).items() if k not in POSITION_FIELDS}
        suffix = SUFFIX if several else self._suffix
        name = f"{self._stem}-e{int(epoch)}-s{int(step)}{suffix}"
        self._last_save_time = time.monotonic()
        if several:
            if self._sharded is None:
                self._sharded = ShardedSaver()
            final, complete = self._sharded.save(
                self.index,
                name,
                model,
                optimizer,
                state,
                entry_metrics,
                self._apply_retention,
                blocking=blocking,
            )
            self._last_saved = final
            if blocking:
                complete()
            else:
                self._start_background(complete, name)
            return str(final)
        self.index.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Saving again at a listed epoch and step must not overwrite its file
        # before the manifest moves on: a kill in between would leave the
        # listed hash describing other bytes.
        final = self.index.dir / self.index.file_for(name)
        self._last_saved = final
        if blocking:
            self._persist(state, name, final, entry_metrics)
        else:
            state, ready = snapshot_for_write(state, self._staging)
            self._staging = state

            def complete() -> None:
                ready()  # the copies from the GPU have landed
                self._persist(state, name, final, entry_metrics)

            self._start_background(complete, name)
        return str(final)

    def _start_background(self, complete: Callable[[], None], name: str) -> None:
        self._pending = threading.Thread(
            target=self._in_background, args=(complete,), name=f"cumulus-save-{name}", daemon=True
        )
        context.track_save(self)
        self._pending.start()

    def _persist(
        self, state: dict[str, Any], name: str, final: Path, metrics: dict[str, Any]
    ) -> None:
        commit_checkpoint(self.index, state, name, final, metrics)
        self._apply_retention()

    def _in_background(self, complete: Callable[[], None]) -> None:
        # No lower priority for this thread: measured, a niced writer persists
        # about half as fast (nice also lowers its I/O priority) and training
        # gains nothing it can measure (benchmarks/checkpoint.py).
        try:
            complete()
        except BaseException as e:  # handed to the training thread by wait()
            self._pending_error = e

    def _apply_retention(self) -> None:
        if self.retention.active:
            protected = {str(n) for n in [read_control().get("resume_checkpoint")] if n}
            self.retention.prune(self.index, self._series, protected)

    def wait(self) -> None:
        """Block until the last asynchronous save is durable; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()
        error, self._pending_error = self._pending_error, None
        if error is not None:
            raise error

    # -- load ------------------------------------------------------------------

    def load(
        self,
        model: Any = None,
        optimizer: Any = None,
        checkpoint: str | None = None,
        *,
        scheduler: Any = None,
    ) -> dict[str, Any]:
        """Restore ``model``, ``optimizer`` and the RNG states from a checkpoint.

        Reads ``checkpoint`` (a name from :func:`list_checkpoints` or a path)
        when given, else the file this Checkpointer was made for, else the one
        the resume asked for, else the newest good one (a corrupt newest file
        is skipped, and said so on stderr). Returns ``{'epoch', 'step',
        'global_step', 'extra', 'path', 'name', 'time'}``; ``step`` is the step
        the checkpoint was saved at, so training continues at ``step + 1``
        (:meth:`loop` does that by itself).

        ``global_step`` is the number of batches done over all epochs when the
        checkpoint was saved (see :meth:`save`), which is also the global step
        of the next batch: a schedule computed from it continues where it
        was, and ``loop(..., with_global_step=True)`` yields it next. A
        checkpoint that does not record it (saved outside :meth:`loop` without
        ``global_step=``, or by an older version) gives ``step + 1``: right
        when ``step`` counts batches from the start of training, as in a loop
        over one range of steps.

        ``scheduler`` (one, or a list, as given to :meth:`save`) gets its saved
        state back. A checkpoint saved without scheduler state cannot restore
        one: that raises :class:`CheckpointError`, before anything is
        restored, rather than silently restarting the schedule.
        """
        self.wait()
        if checkpoint is not None:
            entry = self.index.get(checkpoint)
            path = Path(entry["path"]) if entry else Path(checkpoint).expanduser()
            entry = entry or entry_at(self.index, path)
            state = _read(path, entry_hash(entry))
        elif (explicit := self._explicit_target()) is not None:
            path, entry = explicit, entry_at(self.index, explicit)
            state = _read(path, entry_hash(entry))
        else:
            path, entry, state = read_newest_good(self.index, _read)
        name = entry["name"] if entry else path.name
        global_step = saved_global_step(state)
        schedulers = scheduler_list(scheduler)
        saved_schedulers = state.get("schedulers")
        if schedulers is not None:  # checked first: a refused load changes nothing
            check_schedulers(name, schedulers, saved_schedulers, global_step)
        if path.is_dir():
            # Model and optimizer from the shards, resharded onto the ranks there are now.
            sharded.load_shards(path, state, model, optimizer)
        elif context.world_size() > 1:
            # A checkpoint of one process, resumed on several ranks: each takes it whole.
            sharded.load_whole(state, model, optimizer)
        else:
            # The state is memory-mapped from the file: load_state_dict copies the
            # model's tensors; the optimizer would keep references, so it gets a
            # copy (the file may be deleted by retention while training goes on).
            if model is not None and state.get("model") is not None:
                model.load_state_dict(state["model"])
            if optimizer is not None and state.get("optimizer") is not None:
                optimizer.load_state_dict(snapshot(state["optimizer"]))
        if schedulers is not None:
            # After the optimizer: a scheduler's state matches the restored lr.
            for sched, saved in zip(schedulers, saved_schedulers or [], strict=True):
                sched.load_state_dict(snapshot(saved))
        restore_rng_state(state.get("rng") or {})
        self._loop.resume_after(state, global_step)
        return {
            "epoch": state.get("epoch", 0),
            "step": state.get("step", 0),
            "global_step": global_step,
            "extra": state.get("extra"),
            "path": str(path),
            "name": name,
            "time": state.get("time"),
        }

    # -- exact iteration ---------------------------------------------------------

    @overload
    def loop(
        self, loader: Iterable[Any], epochs: int, *, with_global_step: Literal[False] = False
    ) -> Iterator[tuple[int, int, Any]]: ...

    @overload
    def loop(
        self, loader: Iterable[Any], epochs: int, *, with_global_step: Literal[True]
    ) -> Iterator[tuple[int, int, int, Any]]: ...

    @overload
    def loop(
        self, loader: Iterable[Any], epochs: int, *, with_global_step: bool
    ) -> Iterator[tuple[Any, ...]]: ...

    def loop(
        self, loader: Iterable[Any], epochs: int, *, with_global_step: bool = False
    ) -> Iterator[tuple[Any, ...]]:
        """Iterate ``epochs`` epochs of ``loader``, yielding ``(epoch, step, batch)``.

        ``step`` counts batches within the epoch. On a fresh run this is a
        plain nested loop. After :meth:`load` it continues right after the
        batch the checkpoint was saved at, with the interrupted epoch's shuffle
        order and DataLoader worker seeds reproduced and every RNG as it was
        at the save: no batch is skipped or repeated, and the continuation is
        bitwise identical to a run that was never interrupted.

        With ``with_global_step=True`` it yields ``(epoch, step, global_step,
        batch)``: ``global_step`` counts batches over all epochs, from 0 on a
        fresh run, and after :meth:`load` from the ``global_step`` that load
        returned, so a schedule computed from it does not restart::

            for epoch, step, it, (x, y) in ckpt.loop(loader, 10, with_global_step=True):
                lr = get_lr(it)  # nanoGPT's iter_num
        """
        yield from self._loop.iterate(loader, epochs, with_global_step=with_global_step)

"""Checkpoints of a job of several ranks, written with ``torch.distributed.checkpoint``.

A checkpoint saved by the N ranks of a job is one directory,
``<stem>-e<epoch>-s<step>.dcp``, listed in the manifest as one entry
(``format: dcp``, ``ranks: N``, the total size, one hash over every file):

- ``torch.distributed.checkpoint``'s files: ``.metadata`` and the shards
  (``__<rank>_<n>.distcp``). The model's and optimizer's state dicts are
  taken with ``get_state_dict``: fully qualified names without DDP's
  ``module.`` prefix, DTensor shards for FSDP. Each rank writes its own part
  (a tensor every rank holds, as in DDP, is written once, by one of them).
- ``rank-<r>.pt``: what belongs to rank ``r`` alone: epoch, step, global step,
  its RNG states, ``Checkpointer.loop``'s position, schedulers and ``extra``.

Saving (every rank calls ``Checkpointer.save`` at the same step, as after an
agreed ``should_pause()``): rank 0 picks the directory and a temporary one
beside it and tells the others; each rank writes its rank file and its
shards into the temporary directory (``dcp.save``; an asynchronous save first
copies the state to CPU memory, into the previous save's buffers, or with
torch's stager for FSDP's DTensors, and writes in the background). Once every
shard is written, rank 0 fsyncs and hashes every file, renames the directory into
place, and adds the manifest entry; every rank then learns the outcome, so
``Checkpointer.wait()`` returns, or raises the same error, on all of them.
A kill at any moment before the manifest write leaves the previous
checkpoints listed and loadable (the temporary directory is removed later,
as a dead writer's).

Loading works on any number of ranks, and in a job of one process:
``dcp.load`` reshards the model and optimizer onto the ranks there are now.
The ranks first check the recorded hash together, each hashing a share of
the files. Rank ``r`` takes ``rank-<r>.pt``, or, on more ranks than saved,
that of rank ``r mod N``.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from ..fileio import fsync_dir
from ..manifest import (
    HASH,
    SHARDED,
    CheckpointIndex,
    checkpoint_files,
    file_listing,
    remove_checkpoint,
    temporary_path,
    tree_hash,
)
from . import context
from .persist import (
    CheckpointError,
    read_checkpoint,
    snapshot,
    snapshot_for_write,
    write_checkpoint,
)

#: The suffix of a sharded checkpoint's directory.
SUFFIX = ".dcp"
_RANK_FILE = re.compile(r"^rank-(\d+)\.pt$")


def rank_file(rank: int) -> str:
    """The file of a sharded checkpoint that holds rank ``rank``'s own state."""
    return f"rank-{rank}.pt"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def distributed() -> bool:
    """Whether this process is one of several ranks with a process group."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _group() -> Any:
    return context.checkpoint_group() if distributed() else None


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (on the checkpoint group)."""
    if not distributed():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0, group=_group())
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not distributed():
        return [value]
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_group())
    return out


def _unwrapped(model: Any) -> Any:
    """The module under DDP's and ``torch.compile``'s wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def _is_dtensor(obj: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(obj, DTensor)


def _has_dtensors(model: Any) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def state_dicts(model: Any, optimizer: Any) -> dict[str, Any]:
    """The model's and optimizer's state dicts as ``get_state_dict`` gives them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if model is None:
        if optimizer is not None:
            raise CheckpointError(
                "a sharded checkpoint keys the optimizer's state by parameter name: "
                "pass the model too, Checkpointer.save(model, optimizer, ...)"
            )
        return {}
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optimizer_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optimizer_sd}


class ShardedSaver:
    """One Checkpointer's sharded saves: where they go, and their staging memory."""

    def __init__(self) -> None:
        self._stager: Any = None
        self._staging: Any = None  # the last asynchronous save's CPU copy, reused

    def _stager_for(self, tensors: dict[str, Any]) -> Any:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:
            cuda = any(
                isinstance(t, torch.Tensor) and t.is_cuda for t in _leaves(tensors)
            )  # pinned staging memory only where there are CUDA tensors to copy
            self._stager = DefaultStager(StagingOptions(cuda, False, False, False))
        return self._stager

    def save(
        self,
        index: CheckpointIndex,
        name: str,
        model: Any,
        optimizer: Any,
        rank_state: dict[str, Any],
        metrics: dict[str, Any],
        after_commit: Callable[[], None],
        *,
        blocking: bool,
    ) -> tuple[Path, Callable[[], None]]:
        """Start a sharded save; return its final directory and what completes it.

        Every rank must call this at the same point. For an asynchronous save
        it returns once this rank's state is copied to CPU memory (CUDA
        tensors: queued, as for a file); calling the returned function (in
        the background, or at once for a blocking save) writes the shards and
        waits until the checkpoint is listed, or raises
        :class:`CheckpointError` on every rank if any part of it failed.
        """
        import torch.distributed.checkpoint as dcp

        tensors = state_dicts(model, optimizer)
        rank_state["sharded"] = sorted(tensors)  # what load() can restore from the shards
        final, tmp = self._begin(index, name)
        me = context.rank()
        write_checkpoint(rank_state, tmp / rank_file(me))

        def writer() -> Any:
            return dcp.FileSystemWriter(tmp, sync_files=True)

        write: Callable[[], None]
        if blocking:  # straight from the tensors: nothing to copy first

            def write() -> None:
                dcp.save(tensors, storage_writer=writer(), process_group=_group())

        elif not any(_is_dtensor(t) for t in _leaves(tensors)):
            # Plain tensors (DDP): copied into the previous save's buffers, as
            # a one-process save does; several times faster than fresh pages.
            staged, ready = snapshot_for_write(tensors, self._staging)
            self._staging = staged

            def write() -> None:
                ready()
                dcp.save(staged, storage_writer=writer(), process_group=_group())

        else:  # DTensors (FSDP): torch's stager knows how to copy them
            started = dcp.async_save(
                tensors,
                storage_writer=writer(),
                process_group=_group(),
                async_stager=self._stager_for(tensors),
            )
            # Staging is synchronous here, so this is the upload's future.
            future = started if isinstance(started, Future) else started.upload_completion

            def write() -> None:
                future.result()

        world = context.world_size()
        base = {
            "name": name,
            "file": final.name,
            "epoch": rank_state["epoch"],
            "step": rank_state["step"],
            "time": rank_state["time"],
            "metrics": metrics,
            "format": SHARDED,
            "ranks": world,
        }

        def complete() -> None:
            error: str | None = None
            try:
                write()
            except BaseException as e:  # told to every rank below
                error = f"could not save checkpoint {final}: {e}"
            if me == 0:
                if error is None:
                    try:
                        _commit(index, tmp, final, base)
                        after_commit()
                    except (OSError, CheckpointError) as e:
                        error = str(e) if isinstance(e, CheckpointError) else _disk_error(final, e)
                if error is not None:
                    remove_checkpoint(tmp)
            error = _broadcast(error)
            if error is not None:
                raise CheckpointError(f"{error}; the previous checkpoints are unchanged")

        return final, complete

    def _begin(self, index: CheckpointIndex, name: str) -> tuple[Path, Path]:
        """Rank 0 picks the directory and its temporary; every rank learns them."""
        choice: tuple[str, str] | str
        if context.rank() == 0:
            try:
                index.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                final = index.dir / index.file_for(name)
                tmp = temporary_path(final)
                tmp.mkdir(mode=0o700)
                choice = (str(final), str(tmp))
            except OSError as e:
                choice = _disk_error(index.dir / name, e)
        else:
            choice = ""
        choice = _broadcast(choice)
        if isinstance(choice, str):
            raise CheckpointError(f"{choice}; the previous checkpoints are unchanged")
        return Path(choice[0]), Path(choice[1])


@contextlib.contextmanager
def _alone() -> Iterator[None]:
    """Without a process group, torch warns that it assumes one process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"torch\.distributed is .*single process", UserWarning)
        yield


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [leaf for v in obj.values() for leaf in _leaves(v)]
    if isinstance(obj, list | tuple):
        return [leaf for v in obj for leaf in _leaves(v)]
    return [obj]


def _disk_error(path: Path, e: OSError) -> str:
    return f"could not save checkpoint {path}: {e.strerror or e} (is the disk full?)"


def _commit(index: CheckpointIndex, tmp: Path, final: Path, base: dict[str, Any]) -> None:
    """Rank 0, every shard written: make the directory durable, then list it."""
    for f in checkpoint_files(tmp):
        # torch's writer fsyncs the shards; this covers .metadata and the rank files too.
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    files = file_listing(tmp, HASH)
    fsync_dir(tmp)
    if final.exists():  # renamed by a save killed before it was listed: not a checkpoint
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    entry = {**base, "size": sum(size for size, _ in files.values()), "hash": tree_hash(files)}
    try:
        index.add(entry)
    except OSError as e:  # listed or not at all
        remove_checkpoint(final)
        raise CheckpointError(
            f"could not record checkpoint {final} in the manifest: {e.strerror or e}"
        ) from e


# -- loading -------------------------------------------------------------------


def verified_files(path: Path, expected_hash: str | None) -> dict[str, tuple[int, str]]:
    """Check a sharded checkpoint against its recorded hash; return its files' hashes.

    The ranks share the work (each hashes every N-th file) and all get the
    same answer, so all load or all raise.
    """
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    algorithm = expected_hash.split(":", 1)[0] if expected_hash else HASH
    mine: dict[str, tuple[int, str]] | str
    ranks, me = (context.world_size(), context.rank()) if distributed() else (1, 0)
    try:
        names = [f.name for f in checkpoint_files(path)]
        mine = file_listing(path, algorithm, names[me::ranks])
    except (OSError, ValueError) as e:
        mine = f"checkpoint {path} could not be read: {e}"
    parts = _gather(mine)
    failed = next((p for p in parts if isinstance(p, str)), None)
    if failed is not None:
        raise CheckpointError(failed)
    files = {n: v for part in parts for n, v in part.items()}
    if expected_hash and tree_hash(files) != expected_hash:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: its files do not match the hash "
            "recorded when it was saved"
        )
    return files


def saved_ranks(files: dict[str, Any]) -> list[int]:
    """The ranks a sharded checkpoint holds a state for."""
    return sorted(int(m[1]) for n in files if (m := _RANK_FILE.match(n)))


def read_rank_state(path: Path, expected_hash: str | None) -> dict[str, Any]:
    """This rank's state from a sharded checkpoint, after checking the whole checkpoint.

    On more ranks than saved, rank ``r`` gets rank ``r mod N``'s state.
    The model and optimizer are restored by :func:`load_shards`.
    """
    files = verified_files(path, expected_hash)
    ranks = saved_ranks(files)
    if not ranks or ".metadata" not in files:
        raise CheckpointError(f"{path} is not a sharded cumulus checkpoint")
    chosen = rank_file(ranks[context.rank() % len(ranks)])
    state = read_checkpoint(path / chosen, files[chosen][1] if expected_hash else None)
    state["ranks"] = len(ranks)
    return state


def load_shards(path: Path, state: dict[str, Any], model: Any, optimizer: Any) -> None:
    """Restore model and optimizer from a sharded checkpoint, resharded onto this run.

    ``state`` is this rank's, from :func:`read_rank_state`: it says what the shards hold.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    saved = state["sharded"]

    if optimizer is not None and "optimizer" not in saved:
        raise CheckpointError(
            f"checkpoint {path.name} was saved without an optimizer: load it without one"
        )
    wanted = state_dicts(model, optimizer if "optimizer" in saved else None)
    if not wanted:
        return
    try:
        with _alone():
            dcp.load(wanted, checkpoint_id=path, process_group=_group())
    except Exception as e:  # a model of another shape, a missing key...
        raise CheckpointError(f"checkpoint {path.name} could not be loaded: {e}") from e
    set_state_dict(
        model,
        optimizer if optimizer is not None else [],
        model_state_dict=wanted["model"],
        optim_state_dict=wanted.get("optimizer", {}),
    )


def load_whole(state: dict[str, Any], model: Any, optimizer: Any) -> None:
    """Restore a one-process checkpoint into every rank of this job (a resume onto more ranks).

    Each rank reads the whole file. A DDP model gets it as its module's;
    an FSDP model takes its shards of it.
    """
    saved_model = state.get("model")
    saved_optimizer = state.get("optimizer")
    if model is not None and saved_model is not None:
        saved_model = {_plain_name(k): v for k, v in saved_model.items()}
    if model is not None and _has_dtensors(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            model,
            optimizer if optimizer is not None and saved_optimizer is not None else [],
            model_state_dict=saved_model or {},
            optim_state_dict=(
                _by_name(model, optimizer, saved_optimizer)
                if optimizer is not None and saved_optimizer is not None
                else {}
            ),
            options=StateDictOptions(full_state_dict=True),
        )
        return
    if model is not None and saved_model is not None:
        _unwrapped(model).load_state_dict(saved_model)
    if optimizer is not None and saved_optimizer is not None:
        # The file is memory-mapped; the optimizer would keep references into it.
        optimizer.load_state_dict(snapshot(saved_optimizer))


def _plain_name(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _by_name(model: Any, optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index, keyed by parameter name instead."""
    names = {id(p): n for n, p in _unwrapped(model).named_parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(params) != len(ids):
        raise CheckpointError(
            f"the checkpoint's optimizer has {len(ids)} parameters, this one {len(params)}"
        )
    name_of = {i: names[id(p)] for i, p in zip(ids, params, strict=True)}
    return {
        "state": {name_of[i]: snapshot(v) for i, v in saved["state"].items()},
        "param_groups": [
            {**g, "params": [name_of[i] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }


def read_whole(path: Path, expected_hash: str | None) -> dict[str, Any]:
    """Everything a sharded checkpoint holds, in this one process (no ranks needed).

    Rank 0's state at the top (as a one-process checkpoint has it), the model
    and optimizer gathered whole, and every rank's own state under ``ranks``.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    files = verified_files(path, expected_hash)
    per_rank = [
        read_checkpoint(path / rank_file(r), files[rank_file(r)][1]) for r in saved_ranks(files)
    ]
    if not per_rank:
        raise CheckpointError(f"{path} is not a sharded cumulus checkpoint")
    with _alone():
        tensors = _load_state_dict_from_keys(checkpoint_id=str(path))
    return {**per_rank[0], **tensors, "ranks": per_rank}

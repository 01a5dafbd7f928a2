"""``Checkpointer.loop``'s exact iteration: the loop's position and how it replays an epoch.

A DataLoader draws its randomness when an epoch's iterator is created: the
sampler's shuffle seed and the workers' base seed come from the global torch
generator (or the loader's / sampler's own generator). Capturing those states
at the epoch's start, and restoring them before re-creating the iterator after
a resume, reproduces the same order and the same worker seeds.

:class:`ExactLoop` holds what a Checkpointer needs for that: the resume point
``load`` leaves, the current epoch's start states and the global step, and
the generator ``Checkpointer.loop`` delegates to.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import context
from .rng import capture_rng_state, restore_rng_state


def _generators(loader: Any) -> dict[str, torch.Generator]:
    found = {}
    for name, owner in (
        ("loader", loader),
        ("sampler", getattr(loader, "sampler", None)),
        ("batch_sampler", getattr(getattr(loader, "batch_sampler", None), "sampler", None)),
    ):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            found[name] = gen
    return found


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell an epoch-seeded sampler (``DistributedSampler``) which epoch comes.

    It shuffles with ``seed + epoch``, not a generator; training loops call
    ``sampler.set_epoch(epoch)`` before each epoch, and the loop does it for them.
    """
    for owner in (
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        set_epoch = getattr(owner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
            return


def capture_epoch_start(loader: Any) -> dict[str, Any]:
    """Every generator state that decides the coming epoch's order and worker seeds."""
    return {
        "rng": capture_rng_state(),
        "generators": {name: g.get_state() for name, g in _generators(loader).items()},
    }


def restore_epoch_start(loader: Any, state: dict[str, Any]) -> None:
    restore_rng_state(state["rng"])
    generators = _generators(loader)
    for name, saved in state.get("generators", {}).items():
        if name in generators:
            generators[name].set_state(saved)


@dataclass
class ResumePoint:
    """Where ``load`` left the run: ``loop`` continues right after this batch."""

    epoch: int
    step: int
    global_step: int
    epoch_start: dict[str, Any] | None
    rng: dict[str, Any]


# Frames from a warning in ExactLoop.iterate to the user's code: iterate, then
# Checkpointer.loop's `yield from`, then the loop that drives it.
_USER_FRAME = 3


class ExactLoop:
    """The state of one Checkpointer's exact iteration, and the iteration itself.

    ``Checkpointer.load`` calls :meth:`resume_after`; ``Checkpointer.save`` records
    :attr:`global_step` and :meth:`saved_state`; ``Checkpointer.loop``
    delegates to :meth:`iterate`.
    """

    def __init__(self) -> None:
        #: Where the next :meth:`iterate` continues; it takes it (sets None) when it starts.
        self.resume: ResumePoint | None = None
        #: The generator states at the current epoch's start; None outside :meth:`iterate`.
        self.epoch_start: dict[str, Any] | None = None
        # Batches iterate() has yielded over all epochs (continued from a load);
        # None until iterate() starts, because only the loop can count them.
        self.global_step: int | None = None

    def saved_state(self) -> dict[str, Any] | None:
        """What a save records under ``state["loop"]``: None outside :meth:`iterate`."""
        if self.epoch_start is None:
            return None
        return {"epoch_start": self.epoch_start, "global_step": self.global_step}

    def resume_after(self, state: dict[str, Any], global_step: int) -> None:
        """Make the next :meth:`iterate` continue right after the batch ``state`` was saved at.

        ``state`` is a loaded checkpoint; ``global_step`` is the one ``load``
        returns, used when the checkpoint was not saved inside the loop.
        """
        loop = state.get("loop") or {}
        self.resume = ResumePoint(
            epoch=int(state.get("epoch", 0)),
            step=int(state.get("step", 0)),
            # The loop continues its own batch count, which an explicit
            # global_step= (optimizer steps, say) may differ from.
            global_step=int(loop.get("global_step", global_step)),
            epoch_start=loop.get("epoch_start"),
            rng=state.get("rng") or {},
        )

    def iterate(
        self, loader: Iterable[Any], epochs: int, *, with_global_step: bool = False
    ) -> Iterator[tuple[Any, ...]]:
        """``Checkpointer.loop``'s body: yield ``(epoch, step[, global_step], batch)``.

        Continues from :attr:`resume` when set. Its warnings name the line
        that iterates ``Checkpointer.loop``, so it is meant to be reached
        through that method only.
        """
        if getattr(loader, "persistent_workers", False):
            warnings.warn(
                "Checkpointer.loop cannot replay the RNG of persistent DataLoader workers: "
                "set persistent_workers=False for an exact resume",
                stacklevel=_USER_FRAME,
            )
        resume, self.resume = self.resume, None
        pause_at = context.pause_at_step()
        epoch = 0
        if resume is not None:
            epoch = resume.epoch
            self.global_step = resume.global_step
            if resume.epoch_start is None:
                warnings.warn(
                    "the checkpoint was not saved inside Checkpointer.loop: the data order "
                    "of the interrupted epoch cannot be replayed",
                    stacklevel=_USER_FRAME,
                )
        elif self.global_step is None:  # a second loop() goes on counting
            self.global_step = 0
        while epoch < epochs:
            _set_epoch(loader, epoch)
            if resume is not None and resume.epoch_start is not None:
                # Same generator states as at the epoch's start: same order, same
                # worker seeds. Then skip what was done and put every RNG back
                # as it was when the checkpoint was saved.
                restore_epoch_start(loader, resume.epoch_start)
                self.epoch_start = resume.epoch_start
                batches = iter(loader)
                first = resume.step + 1
                for _ in itertools.islice(batches, first):
                    pass
                restore_rng_state(resume.rng)
            else:
                self.epoch_start = capture_epoch_start(loader)
                batches = iter(loader)
                first = resume.step + 1 if resume is not None else 0
                if resume is not None:  # no replay possible: skip by count
                    batches = itertools.islice(batches, first, None)
            resume = None
            for step, batch in enumerate(batches, first):
                global_step = self.global_step
                # Counted before the body runs: a save in it records this batch as done.
                self.global_step = global_step + 1
                if pause_at is not None and self.global_step >= pause_at:
                    context.request_pause()
                if with_global_step:
                    yield epoch, step, global_step, batch
                else:
                    yield epoch, step, batch
            epoch += 1
        self.epoch_start = None

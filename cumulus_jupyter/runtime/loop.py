"""What ``Checkpointer.loop`` needs to replay an epoch's data order exactly.

A DataLoader draws its randomness when an epoch's iterator is created: the
sampler's shuffle seed and the workers' base seed come from the global torch
generator (or the loader's / sampler's own generator). Capturing those states
at the epoch's start, and restoring them before re-creating the iterator after
a resume, reproduces the same order and the same worker seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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

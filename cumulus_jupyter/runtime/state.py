"""What a checkpoint holds: the state dict a save writes, and its counters read back.

``Checkpointer.save`` writes :func:`training_state` (the position, the
``state_dict()`` of the model, optimizer and schedulers, every RNG state) and,
inside its loop, ``ExactLoop.saved_state()``. ``Checkpointer.load`` reads the global step back with
:func:`saved_global_step` and, before restoring anything, checks with
:func:`check_schedulers` that the schedulers it is given match those saved.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .persist import FORMAT, CheckpointError
from .rng import capture_rng_state


def training_state(
    model: Any,
    optimizer: Any,
    epoch: int,
    step: int,
    extra: Any,
    *,
    global_step: int | None,
    scheduler: Any,
) -> dict[str, Any]:
    """The state a save writes, with every RNG state and the time taken now.

    ``scheduler`` is as given to ``save``: None, one, or a list (see
    :func:`scheduler_list`).
    """
    state: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "model": state_dict(model),
        "optimizer": state_dict(optimizer),
        "epoch": int(epoch),
        "step": int(step),
        "extra": extra,
        "rng": capture_rng_state(),
        "time": time.time(),
        # None: saved outside loop() without global_step=; load() says what then.
        "global_step": None if global_step is None else int(global_step),
    }
    schedulers = scheduler_list(scheduler)
    if schedulers is not None:
        state["schedulers"] = [state_dict(s) for s in schedulers]
    return state


def saved_global_step(state: dict[str, Any]) -> int:
    """The batches done over all epochs when ``state`` was saved; ``step + 1`` if not recorded."""
    global_step = state.get("global_step")
    if global_step is None:  # older checkpoints kept it in the loop's state only
        global_step = (state.get("loop") or {}).get("global_step")
    if global_step is None:
        global_step = int(state.get("step", 0)) + 1
    return int(global_step)


def state_dict(obj: Any) -> Any:
    """``obj.state_dict()``, or None for None; anything else cannot be checkpointed."""
    if obj is None:
        return None
    if hasattr(obj, "state_dict"):
        return obj.state_dict()
    raise TypeError(
        f"cannot checkpoint a {type(obj).__name__}: pass a torch module or optimizer "
        "(anything with state_dict() and load_state_dict())"
    )


def scheduler_list(scheduler: Any) -> list[Any] | None:
    """``scheduler=`` as a list: None, one scheduler, or a list/tuple of them."""
    if scheduler is None:
        return None
    if isinstance(scheduler, Sequence) and not isinstance(scheduler, str):
        found = list(scheduler)
    else:
        found = [scheduler]
    for s in found:
        if not (hasattr(s, "state_dict") and hasattr(s, "load_state_dict")):
            raise TypeError(
                f"cannot checkpoint a {type(s).__name__} as a scheduler: pass a "
                "torch.optim.lr_scheduler scheduler (anything with state_dict() and "
                "load_state_dict()), or a list of them"
            )
    return found


def check_schedulers(name: str, given: list[Any], saved: Any, global_step: int) -> None:
    """Raise unless checkpoint ``name``'s ``saved`` scheduler states fit ``given``.

    Raises :class:`CheckpointError` when the checkpoint holds none (restoring
    nothing would restart the schedule; the message says how to go on from
    ``global_step``) or a different number of them.
    """
    if saved is None:
        raise CheckpointError(
            f"checkpoint {name} holds no scheduler state: it was saved without scheduler= "
            "(or by an older version). Restoring nothing would restart the schedule. "
            "To go on from it, load it without scheduler= and bring the new scheduler to "
            f"where it was (for a per-batch schedule, call scheduler.step() {global_step} times); "
            "save with scheduler= from then on"
        )
    if len(saved) != len(given):
        raise CheckpointError(
            f"checkpoint {name} holds {len(saved)} scheduler state(s), but load() was given "
            f"{len(given)}: pass the same schedulers, in the same order, as to save()"
        )

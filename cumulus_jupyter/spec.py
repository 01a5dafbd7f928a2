"""Validation of what a client submits: durations, GPU shares, names."""

from __future__ import annotations

import math
import re
import sys
from typing import Any

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_NAME_MAX = 200


class SpecError(ValueError):
    """A submitted value is invalid; the message says what to send instead."""


def parse_duration(value: Any) -> float | None:
    """Turn ``300``, ``"300"``, ``"30m"``, ``"2h"`` or ``"1.5h"`` into seconds.

    ``None`` means no limit. Anything else raises :class:`SpecError`.

    >>> parse_duration("30m")
    1800.0
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecError("duration must be seconds (a number) or a string like '30m' or '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise SpecError(
                f"duration {value!r} is not understood: use seconds (300) or a number with "
                "a unit s, m, h or d ('30m', '2h')"
            )
        seconds = float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "s").lower()]
    else:
        raise SpecError("duration must be seconds (a number) or a string like '30m' or '2h'")
    if not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(f"duration must be a positive number of seconds, got {value!r}")
    return seconds


def parse_gpu_memory(value: Any) -> float:
    """Validate a GPU share: a number with ``0 < value <= 1`` of one device."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(
            f"gpu_memory must be a number between 0 and 1 (a share of one GPU), got {value!r}"
        )
    share = float(value)
    if not math.isfinite(share) or not 0 < share <= 1:
        raise SpecError(
            f"gpu_memory must be greater than 0 and at most 1 (a share of one GPU), got {value!r}"
        )
    return share


def parse_name(value: Any, default: str) -> str:
    """A job's display name: free text, one line, bounded length."""
    if value is None or value == "":
        return default
    if not isinstance(value, str):
        raise SpecError(f"name must be a string, got {type(value).__name__}")
    name = " ".join(value.split())
    if len(name) > _NAME_MAX:
        raise SpecError(f"name is longer than {_NAME_MAX} characters")
    return name


def format_duration(seconds: float | None) -> str:
    """Human form of a duration: ``90`` -> ``'1m30s'``."""
    if seconds is None:
        return "no limit"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    parts = [f"{h}h" if h else "", f"{m}m" if m else "", f"{s}s" if s or not (h or m) else ""]
    return "".join(parts)


def python_version() -> str:
    """This interpreter's ``major.minor``: cloudpickle needs the same on both ends."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"

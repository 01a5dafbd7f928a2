"""Which checkpoints to keep: the last N, every Mth step, the best K by a metric."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..manifest import CheckpointIndex


@dataclass(frozen=True)
class Retention:
    """A retention policy; with every field ``None`` nothing is ever deleted.

    The newest checkpoint is always kept (a paused job resumes from it), and so
    is any checkpoint named in ``protected`` (the one a resume asked for).
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str = "loss"
    best_mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive whole number or None, got {value!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.keep_last, self.keep_every, self.keep_best))

    def to_delete(self, entries: list[dict[str, Any]], protected: set[str]) -> list[str]:
        """Names of the checkpoints (oldest first in ``entries``) the policy drops."""
        if not self.active or not entries:
            return []
        keep = set(protected) | {entries[-1]["name"]}
        if self.keep_last:
            keep |= {e["name"] for e in entries[-self.keep_last :]}
        if self.keep_every:
            keep |= {e["name"] for e in entries if int(e.get("step", -1)) % self.keep_every == 0}
        if self.keep_best:
            scored = [
                e
                for e in entries
                if isinstance((e.get("metrics") or {}).get(self.best_metric), int | float)
            ]
            scored.sort(
                key=lambda e: e["metrics"][self.best_metric], reverse=self.best_mode == "max"
            )
            keep |= {e["name"] for e in scored[: self.keep_best]}
        return [e["name"] for e in entries if e["name"] not in keep]

    def prune(self, index: CheckpointIndex, series: re.Pattern[str], protected: set[str]) -> None:
        """Delete from ``index`` what the policy drops among the names ``series`` matches.

        Only one Checkpointer's own series counts: another fname has its own policy.
        """
        entries = [e for e in index.entries() if series.fullmatch(e["name"])]
        for name in self.to_delete(entries, protected):
            index.remove(name)

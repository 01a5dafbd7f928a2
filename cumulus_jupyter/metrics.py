"""One value per step: how the ``report()`` records of a job's runs are merged.

A job that resumes from a checkpoint runs the steps after it again, so
``metrics.jsonl`` holds two records for each of those steps, one per run. The
server, the notebook widget and the JupyterLab panel (``model.ts``, which
follows the same rules) show one record per step, the newest run's:

- A record's run is its ``run`` field; a record without one (written before
  runs were recorded) belongs to run 1.
- A record's step is its ``step`` field, within its ``epoch`` when it has a
  numeric one (``Checkpointer.loop`` counts steps within an epoch). A record
  without a numeric step cannot be placed: it is kept as it is.
- For each step, the records of the newest run that reported it are merged in
  the order they were written (a run may report a step twice, e.g. the loss
  then the validation loss); records of older runs for that step are dropped.

Applying the rules to records in the order they were written, page after page
(``?since=N``), gives the same view as applying them to all records at once:
a poller folds each new page into what it holds with :class:`StepMerger`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

#: The field ``report()`` stores the run in.
RUN_FIELD = "run"
#: Fields that place a record (which step of which run, when, out of how many)
#: rather than measure anything: charts do not plot them and a checkpoint's
#: metrics leave them out. ``labextension/src/metrics.ts`` holds the same list
#: (a test checks that they agree).
POSITION_FIELDS = frozenset({"step", "total", "time", "epoch", RUN_FIELD})

#: Sort key of a step: records without an epoch first, then by epoch and step.
StepKey = tuple[int, float, float]


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def run_of(record: Mapping[str, Any]) -> int:
    """The run that wrote ``record``: its ``run`` field, or 1 when it has none."""
    run = record.get(RUN_FIELD)
    if isinstance(run, int) and not isinstance(run, bool) and run >= 1:
        return run
    return 1


def step_key(record: Mapping[str, Any]) -> StepKey | None:
    """Where ``record`` sits in step order, or ``None`` when it has no numeric step."""
    step = _number(record.get("step"))
    if step is None:
        return None
    epoch = _number(record.get("epoch"))
    return (0, 0.0, step) if epoch is None else (1, epoch, step)


def with_run(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``record`` whose ``run`` field is its run (1 when it had none)."""
    return {**record, RUN_FIELD: run_of(record)}


class StepMerger:
    """Folds metric records, in the order they were written, into one record per step.

    ``max_steps`` bounds the steps held (every other one is dropped when it is
    exceeded, so a long run's shape stays); ``keep_unplaced=False`` holds no
    record without a step (they still count for :meth:`latest`).
    """

    def __init__(self, max_steps: int | None = None, keep_unplaced: bool = True):
        self.max_steps = max_steps
        self.keep_unplaced = keep_unplaced
        self._steps: dict[StepKey, dict[str, Any]] = {}
        self._unplaced: list[dict[str, Any]] = []
        # field -> ((run, time, arrival), value) of the newest record holding it
        self._latest: dict[str, tuple[tuple[int, float, int], Any]] = {}
        self._arrivals = 0

    def add(self, record: Mapping[str, Any]) -> None:
        """Fold one record in (records of one run must come in the order written)."""
        record = with_run(record)
        run = record[RUN_FIELD]
        self._arrivals += 1
        order = (run, _number(record.get("time")) or 0.0, self._arrivals)
        key = step_key(record)
        if key is None:
            if self.keep_unplaced:
                self._unplaced.append(record)
        else:
            held = self._steps.get(key)
            if held is None or run > held[RUN_FIELD]:
                self._steps[key] = record
            elif run == held[RUN_FIELD]:
                held.update(record)
            else:
                return  # a newer run already reported this step
            if self.max_steps is not None and len(self._steps) > self.max_steps:
                self._thin()
        for field, value in record.items():
            seen = self._latest.get(field)
            if seen is None or order >= seen[0]:
                self._latest[field] = (order, value)

    def extend(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Fold records in, in order."""
        for record in records:
            self.add(record)

    def records(self) -> list[dict[str, Any]]:
        """Records without a step (in the order written), then one record per step, in order."""
        return [*self._unplaced, *(self._steps[k] for k in sorted(self._steps))]

    def latest(self) -> dict[str, Any]:
        """Each field's value in the newest record that has it (newest run first, then
        newest ``time``): what a progress bar shows, whatever order pages came in."""
        return {field: value for field, (_, value) in self._latest.items()}

    def _thin(self) -> None:
        keys = sorted(self._steps)
        for key in keys[-2::-2]:  # every other step, keeping the newest
            del self._steps[key]


def newest_per_step(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the newest run's (see the module docstring for the rules)."""
    merger = StepMerger()
    merger.extend(records)
    return merger.records()

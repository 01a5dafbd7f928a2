"""``verify_resume``: check that a training function resumes bitwise exactly.

It runs the function twice in fresh processes, each in a scratch job
directory: once straight for ``steps`` steps, and once paused after
``pause_at`` steps and resumed in a *new* process. Both runs stop by pausing
at step ``steps`` (``Checkpointer.loop`` asks them to), so both end with a
checkpoint; the two are compared tensor by tensor, RNG by RNG, together with
everything the runs reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle
import torch

from ..fileio import atomic_write_bytes, atomic_write_json
from ..jobdir import PAUSE_AT_ENV, SEED_ENV, JobDir, job_environment, start_worker
from ..manifest import CheckpointIndex
from ..metrics import RUN_FIELD
from ..shipping import Shipment, write_modules
from ..spec import python_version
from ..states import JobState
from .persist import entry_hash, read_checkpoint
from .sharded import read_whole

#: Every generator starts from this state in both runs (see jobdir.SEED_ENV).
_SEED = 20_26_11


@dataclass
class ResumeReport:
    """What :func:`verify_resume` found. True when the resume is exact."""

    steps: int
    pause_at: int
    differences: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.differences

    def __bool__(self) -> bool:
        return self.exact

    def __str__(self) -> str:
        if self.exact:
            return (
                f"exact: {self.steps} steps straight and {self.steps} steps paused after step "
                f"{self.pause_at} and resumed in a fresh process end bitwise identical "
                "(model, optimizer, every RNG state, everything reported)"
            )
        return (
            f"NOT exact: the run paused after step {self.pause_at} and resumed differs from "
            f"the straight run of {self.steps} steps:\n  - " + "\n  - ".join(self.differences)
        )


class _Run:
    """One scratch job directory, run by the real worker in fresh processes."""

    def __init__(self, directory: Path, shipment: Shipment, nprocs: int):
        self.dir = directory
        self.nprocs = nprocs
        self.files = JobDir(directory)
        self.dir.mkdir(mode=0o700, parents=True)
        atomic_write_bytes(self.files.payload, shipment.payload)
        write_modules(self.dir, shipment.files, shipment.origins)
        atomic_write_json(self.files.record, {"python_version": python_version()})
        atomic_write_json(self.files.control, {})
        self.runs = 0

    def go(self, pause_at: int, timeout: float) -> None:
        self.runs += 1
        # As a job runs: in its own directory, importing what is installed and
        # what travelled with it, not the caller's working directory or path.
        env = job_environment(
            {k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            self.dir,
            f"verify-{self.dir.name}",
            self.runs,
            nprocs=self.nprocs,
            extra={PAUSE_AT_ENV: str(pause_at), SEED_ENV: str(_SEED)},
        )
        proc = start_worker(sys.executable, self.dir, env)
        try:
            proc.wait(timeout)
        finally:
            if proc.returncode is None:  # timed out, or the caller was interrupted
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        state = self.files.read_state()
        raw = self.files.read_result()
        if raw is None:
            output = self.files.output.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"run {self.runs} of verify_resume ended without an outcome; its output:\n{output}"
            )
        outcome = cloudpickle.loads(raw)
        if not outcome.get("ok"):
            raise RuntimeError(
                f"the function raised in run {self.runs} of verify_resume:\n"
                f"{outcome.get('traceback') or outcome.get('message')}"
            )
        if state.get("state") != JobState.PAUSED.value:
            raise RuntimeError(
                f"the function ended ({state.get('state')}) before step {pause_at}: it must "
                "iterate with Checkpointer.loop for at least that many steps, and save and "
                "return when should_pause() is true"
            )

    def final_state(self) -> dict[str, Any]:
        latest = CheckpointIndex(self.files.checkpoints).latest()
        if latest is None:
            raise RuntimeError("the function paused without saving a checkpoint")
        path = Path(latest["path"])
        if path.is_dir():  # saved by several ranks: every rank's state, under "ranks"
            return read_whole(path, entry_hash(latest))
        return read_checkpoint(path, entry_hash(latest))

    def reported(self) -> list[dict[str, Any]]:
        path = self.files.metrics
        if not path.exists():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        # When and in which run a value was reported is not part of the result.
        return [{k: v for k, v in r.items() if k not in ("time", RUN_FIELD)} for r in records]


def verify_resume(
    fn: Any,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    steps: int = 20,
    pause_at: int | None = None,
    nprocs: int = 1,
    timeout: float = 600,
) -> ResumeReport:
    """Check that ``fn`` continues bitwise exactly after a pause and a resume.

    ``fn`` is a training function written like a job: it iterates with
    ``Checkpointer.loop``, loads a checkpoint when one exists, and saves and
    returns when ``should_pause()`` is true. The report names every tensor,
    optimizer state, RNG and reported metric that differs::

        report = verify_resume(train, steps=30)
        assert report, report   # prints what differs when it is not exact

    With ``nprocs`` > 1 both runs are jobs of that many ranks (as
    ``run_async(..., nprocs=N)`` runs them): the model and optimizer are
    compared whole, and every rank's RNG states and position one by one.
    """
    from ..kernel.payload import ship_call

    pause_at = steps // 2 if pause_at is None else pause_at
    if not 1 <= pause_at < steps:
        raise ValueError(f"pause_at must be between 1 and steps - 1 ({steps - 1}), got {pause_at}")
    if nprocs < 1:
        raise ValueError(f"nprocs is a number of ranks, at least 1: got {nprocs}")
    shipment = ship_call(fn, tuple(args), dict(kwargs or {}))
    with tempfile.TemporaryDirectory(prefix="cumulus-verify-") as tmp:
        straight = _Run(Path(tmp) / "straight", shipment, nprocs)
        straight.go(steps, timeout)
        resumed = _Run(Path(tmp) / "resumed", shipment, nprocs)
        resumed.go(pause_at, timeout)
        resumed.go(steps, timeout)
        report = ResumeReport(steps, pause_at)
        a, b = straight.final_state(), resumed.final_state()
        report.differences += _compare_states(a, b)
        report.differences += _compare_reported(straight.reported(), resumed.reported(), pause_at)
    return report


def _differs(a: Any, b: Any) -> str | None:
    """Why two checkpoint values differ, or None when they are bitwise equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return "a tensor in one run only"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"shape/dtype {tuple(a.shape)}/{a.dtype} vs {tuple(b.shape)}/{b.dtype}"
        if torch.equal(a, b):
            return None
        if a.is_floating_point():
            return f"values differ (max |difference| {(a - b).abs().max().item():.3g})"
        return "values differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"keys differ: {sorted(map(str, set(a) ^ set(b)))}"
        for key in a:
            why = _differs(a[key], b[key])
            if why:
                return f"[{key!r}] {why}"
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            why = _differs(x, y)
            if why:
                return f"[{i}] {why}"
        return None
    return None if a == b else f"{a!r} vs {b!r}"


def _compare_states(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    out = []
    for key in ("epoch", "step", "global_step"):
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)} straight vs {b.get(key)} resumed")
    why = _differs(a.get("schedulers"), b.get("schedulers"))
    if why:
        out.append(f"learning-rate scheduler state: {why}")
    for name, value in (a.get("model") or {}).items():
        why = _differs(value, (b.get("model") or {}).get(name))
        if why:
            out.append(f"model tensor {name!r}: {why}")
    opt_a, opt_b = a.get("optimizer") or {}, b.get("optimizer") or {}
    for pid, per_param in (opt_a.get("state") or {}).items():
        for key, value in per_param.items():
            why = _differs(value, (opt_b.get("state") or {}).get(pid, {}).get(key))
            if why:
                out.append(f"optimizer state {key!r} of parameter {pid}: {why}")
    why = _differs(opt_a.get("param_groups"), opt_b.get("param_groups"))
    if why:
        out.append(f"optimizer param_groups: {why}")
    rng_diffs = []
    ranks_a, ranks_b = a.get("ranks"), b.get("ranks")
    if isinstance(ranks_a, list) and isinstance(ranks_b, list):  # a sharded checkpoint
        if len(ranks_a) != len(ranks_b):
            out.append(f"{len(ranks_a)} ranks straight vs {len(ranks_b)} resumed")
        pairs = [
            (f"rank {r}: ", x, y) for r, (x, y) in enumerate(zip(ranks_a, ranks_b, strict=False))
        ]
        for where, x, y in pairs[1:]:  # rank 0's position is compared above
            for key in ("epoch", "step", "global_step"):
                if x.get(key) != y.get(key):
                    out.append(f"{where}{key}: {x.get(key)} straight vs {y.get(key)} resumed")
    else:
        pairs = [("", a, b)]
    for where, x, y in pairs:
        rng_a, rng_b = x.get("rng") or {}, y.get("rng") or {}
        for name in sorted(set(rng_a) | set(rng_b)):
            why = _differs(rng_a.get(name), rng_b.get(name))
            if why:
                rng_diffs.append(name)
                out.append(f"{where}RNG state {name!r} ({_RNG_NAMES.get(name, name)}) differs")
    if out and not rng_diffs:
        out.append(
            "every RNG the checkpoint holds (Python, NumPy, torch, CUDA, DataLoader) ends equal, "
            "so the difference comes from state the checkpoint does not hold: a random "
            "generator of the function's own (random.Random, numpy.random.default_rng, a "
            "torch.Generator not given to the DataLoader) or data kept outside model and "
            "optimizer"
        )
    return out


_RNG_NAMES = {
    "python": "the random module",
    "numpy": "numpy.random's global generator",
    "torch": "torch's CPU generator",
    "cuda": "torch's CUDA generators",
}


def _compare_reported(a: list[dict[str, Any]], b: list[dict[str, Any]], pause_at: int) -> list[str]:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            return [
                f"reported {', '.join(keys)} differ first at report {i + 1} "
                f"({', '.join(f'{k}: {x.get(k)!r} vs {y.get(k)!r}' for k in keys)}); "
                f"the resume came after step {pause_at}"
            ]
    if len(a) != len(b):
        return [f"{len(a)} reports straight vs {len(b)} with the resume"]
    return []

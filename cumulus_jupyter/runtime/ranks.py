"""A job of N ranks: the worker starts N processes that run the function together.

With ``CUMULUS_NPROCS`` = N > 1 the worker process becomes the ranks' agent
(as torchrun's agent is): it forks one process per rank, each with the usual
``torch.distributed`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` on loopback, a free port per run) and, on a
GPU host, its own device. Each rank initialises the default process group
(``gloo`` on a CPU host; NCCL for CUDA with gloo for CPU tensors on a GPU
host) and calls the function. The agent

- passes the pause signal and SIGTERM on to every rank (the server signals
  only the job's main process, the agent);
- writes each rank's output to the job's log, each line prefixed ``[rank i]``;
- stops every rank when one fails (SIGTERM, then SIGKILL after the server's
  ``kill_grace``): a job of N ranks fails whole, and nothing waits forever in
  a collective for a rank that is gone;
- returns rank 0's outcome as the job's.

Every rank runs in the agent's process group, so the server's kill of the
job's group reaches them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from ..jobdir import KILL_GRACE_ENV, NPROCS_ENV, PAUSE_SIGNAL, SEED_ENV, JobDir
from . import context
from .context import JobInterrupted, request_pause

#: How long a rank waits in one collective before it fails (a backstop: the
#: agent stops the other ranks as soon as one fails).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
_DEFAULT_KILL_GRACE = 10.0
_PR_SET_PDEATHSIG = 1


def nprocs() -> int:
    """How many ranks this run has (``CUMULUS_NPROCS``; 1 when unset)."""
    try:
        return max(1, int(os.environ.get(NPROCS_ENV, "1")))
    except ValueError:
        return 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Output:
    """Copies a rank's output pipe to the job's log, a ``[rank i]`` before each line."""

    lock = threading.Lock()

    def __init__(self, rank: int, fd: int):
        self.prefix = f"[rank {rank}] ".encode()
        self.fd = fd
        self.thread = threading.Thread(target=self._copy, name=f"cumulus-rank-{rank}", daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            if lines:
                self._write(b"".join(self.prefix + line + b"\n" for line in lines))
        if pending:
            self._write(self.prefix + pending + b"\n")
        os.close(self.fd)

    def _write(self, data: bytes) -> None:
        with self.lock:  # whole lines: two ranks' lines never interleave
            while data:
                written = os.write(1, data)
                data = data[written:]


class _Rank:
    def __init__(self, rank: int, pid: int, output: _Output, outcome: Path):
        self.rank = rank
        self.pid = pid
        self.output = output
        self.outcome = outcome
        self.status: int | None = None  # as Popen.returncode: exit code, or minus the signal


def run_ranks(
    func: Callable[..., Any], args: Any, kwargs: Any, world: int, job_dir: Path
) -> tuple[dict[str, Any], bool, bool]:
    """Run ``func`` in ``world`` ranks; return rank 0's outcome, whether the run was
    interrupted (SIGTERM), and whether any rank was told to pause."""
    import cloudpickle

    port = _free_port()
    devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ranks: list[_Rank] = []
    interrupted = False
    grace = _kill_grace()
    stop_by: float | None = None  # when ranks still running get SIGKILL

    def forward(signum: int, _frame: Any) -> None:
        nonlocal interrupted, stop_by
        if signum == PAUSE_SIGNAL:
            request_pause()
        else:
            # A rank blocked in a collective (or in the rendezvous) cannot run
            # its handler: past the grace it is killed, as the server would.
            interrupted = True
            stop_by = stop_by or time.monotonic() + grace
        for r in ranks:
            if r.status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(r.pid, signum)

    signal.signal(PAUSE_SIGNAL, forward)
    signal.signal(signal.SIGTERM, forward)
    for rank in range(world):
        read_fd, write_fd = os.pipe()
        outcome_file = JobDir(job_dir).rank_outcome(rank)
        outcome_file.unlink(missing_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_fd)
                for r in ranks:  # the other ranks' pipes are the agent's
                    with contextlib.suppress(OSError):
                        os.close(r.output.fd)
                code = _rank_main(
                    rank, world, port, devices, write_fd, outcome_file, func, args, kwargs
                )
            finally:
                from .worker import exit_now

                exit_now(code)
        os.close(write_fd)
        ranks.append(_Rank(rank, pid, _Output(rank, read_fd), outcome_file))

    stopping = False  # the agent is stopping the ranks: their deaths are its doing
    killed_first: _Rank | None = None  # a rank a signal from outside ended
    while any(r.status is None for r in ranks):
        ended = []
        for r in ranks:
            if r.status is not None:
                continue
            done, status = os.waitpid(r.pid, os.WNOHANG)
            if done:
                r.status = os.waitstatus_to_exitcode(status)
                ended.append(r)
        # Judged once every rank that ended by now is seen: a rank killed from
        # outside is the cause even when a rank it left hanging in a
        # collective failed, and exited, within the same look.
        if ended and not stopping and not interrupted:
            if killed_first is None:
                killed_first = next((r for r in ended if (r.status or 0) < 0), None)
            if any(r.status != 0 for r in ended):
                # One rank failed: the job has failed; the others must not wait
                # for it in a collective until their timeout.
                stopping = True
                stop_by = time.monotonic() + grace
                for other in ranks:
                    if other.status is None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(other.pid, signal.SIGTERM)
        if stop_by is not None and time.monotonic() > stop_by:
            stopping = True
            for r in ranks:
                if r.status is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(r.pid, signal.SIGKILL)
            stop_by = None
        time.sleep(0.02)
    for r in ranks:
        r.output.thread.join(timeout=5)

    outcomes: dict[int, dict[str, Any]] = {}
    for r in ranks:
        with contextlib.suppress(OSError, EOFError, ValueError):
            outcomes[r.rank] = cloudpickle.loads(r.outcome.read_bytes())
        r.outcome.unlink(missing_ok=True)
    observed = any(o.get("paused") for o in outcomes.values())
    # Ranks the agent stopped because another failed were interrupted by it,
    # not the job: that run failed.
    interrupted = interrupted or (
        not stopping and any(o.get("interrupted") for o in outcomes.values())
    )
    if interrupted:
        first = outcomes.get(0)
        if first is not None and first["outcome"]["ok"]:
            return first["outcome"], True, observed
        from .worker import interrupted_outcome

        return interrupted_outcome(JobInterrupted(signal.SIGTERM)), True, observed
    # The cause, not its echoes: a rank killed from outside, else the rank
    # whose code raised first (the others then fail in their collectives).
    raised = sorted(
        (o["failed_at"], rank)
        for rank, o in outcomes.items()
        if not o["outcome"]["ok"] and o.get("failed_at")
    )
    culprit = killed_first
    if culprit is None and raised:
        culprit = ranks[raised[0][1]]
    if culprit is None:
        culprit = next((r for r in ranks if r.status != 0), None)
    if culprit is not None:
        reported = outcomes.get(culprit.rank)
        if reported and not reported["outcome"]["ok"]:
            outcome = dict(reported["outcome"])
            outcome["message"] = f"rank {culprit.rank}: {outcome['message']}"
        else:
            how = (
                f"was killed by {signal.Signals(-culprit.status).name}"
                if culprit.status is not None and culprit.status < 0
                else f"exited with status {culprit.status}"
            )
            outcome = {
                "ok": False,
                "exc_type": "RuntimeError",
                "message": f"rank {culprit.rank} of {world} {how}; the other ranks were stopped",
                "traceback": "",
            }
        return outcome, False, observed
    first = outcomes.get(0)
    if first is None:
        raise RuntimeError("rank 0 ended without an outcome")
    return first["outcome"], False, observed


def _kill_grace() -> float:
    try:
        return float(os.environ.get(KILL_GRACE_ENV, _DEFAULT_KILL_GRACE))
    except ValueError:
        return _DEFAULT_KILL_GRACE


def _rank_main(
    rank: int,
    world: int,
    port: int,
    devices: list[str],
    output_fd: int,
    outcome_path: Path,
    func: Callable[..., Any],
    args: Any,
    kwargs: Any,
) -> int:
    """In a rank's process: set it up, call ``func``, leave the outcome for the agent."""
    import cloudpickle

    # Gone with the agent, whatever killed it: a rank alone can only hang.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    signal.signal(PAUSE_SIGNAL, request_pause)

    def on_term(signum: int, _frame: Any) -> None:
        raise JobInterrupted(signum)

    signal.signal(signal.SIGTERM, on_term)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[rank % len(devices)]
    from .worker import failure_outcome, fresh_seeds, interrupted_outcome, settle_saves, setup_gpu

    if not os.environ.get(SEED_ENV):
        # Forked ranks must not share Python's and NumPy's streams; torch's
        # stays the agent's on every rank, as torch's own default seed is the
        # same in every process started cold.
        fresh_seeds(torch=False)
    context.set_rank(rank, world)

    interrupted = False
    failed_at: float | None = None
    group = None
    try:
        setup_gpu()
        import torch
        import torch.distributed as dist

        cuda = torch.cuda.is_available() and bool(devices)
        if cuda:
            torch.cuda.set_device(0)
        dist.init_process_group(
            backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
        # The pause agreement's own group: its collectives never interleave
        # with the training's on the default group.
        group = dist.new_group(backend="gloo")
        context.set_agreement(PauseAgreement(group))
        context.set_checkpoint_group(dist.new_group(backend="gloo"))
        outcome = {"ok": True, "value": func(*args, **kwargs)}
    except JobInterrupted as e:
        interrupted = True
        outcome = interrupted_outcome(e)
    except BaseException as e:  # the user's code may raise anything
        failed_at = time.time()
        outcome = failure_outcome(e, {})
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finished = outcome["ok"] and not interrupted
    if finished:
        # Every rank got here: their last collectives complete. A rank that
        # failed skips them, they could wait for ranks that never come; the
        # agent learns of the failure from its exit and stops the others.
        with contextlib.suppress(Exception):
            context.finish_agreement()
    outcome = settle_saves(outcome)
    if group is not None and finished:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0 and outcome["ok"]:
        outcome = {"ok": True, "value": None}  # only rank 0's value is the job's
    report: dict[str, Any] = {
        "outcome": outcome,
        "interrupted": interrupted,
        "paused": context.pause_observed(),
        "failed_at": failed_at,
    }
    try:
        data = cloudpickle.dumps(report)
    except Exception as e:  # the value, or the exception raised, does not pickle
        if outcome["ok"]:
            report["outcome"] = failure_outcome(
                TypeError(f"the job's return value cannot be pickled: {e}"), {}
            )
        report["outcome"].pop("exception", None)
        data = cloudpickle.dumps(report)
    outcome_path.write_bytes(data)
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if outcome["ok"] else 1


class PauseAgreement:
    """Makes ``should_pause()`` answer the same on every rank at the same call.

    Each call starts an all-reduce (max) of this rank's answer and returns the
    result of the one the previous call started, which has long finished by
    then: one step of delay, and no rank waits on the others in
    ``should_pause()``. Once the answer is yes it stays yes, on every rank.
    """

    def __init__(self, group: Any):
        import torch
        import torch.distributed as dist

        self._dist = dist
        self._torch = torch
        self._group = group
        self._pending: tuple[Any, Any] | None = None
        self._decided = False

    def __call__(self, asked: bool) -> bool:
        if self._decided:
            return True
        pending = self._pending
        if pending is not None:
            work, flag = pending
            work.wait()
            self._decided = bool(flag[0])
            if self._decided:
                self._pending = None
                return True
        flag = self._torch.tensor([1 if asked else 0], dtype=self._torch.int32)
        work = self._dist.all_reduce(
            flag, op=self._dist.ReduceOp.MAX, group=self._group, async_op=True
        )
        self._pending = (work, flag)
        return False

    def finish(self) -> None:
        """Wait for the last all-reduce started (every rank started as many)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

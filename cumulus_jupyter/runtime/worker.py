"""One run of a job: ``python -m cumulus_jupyter.runtime.worker JOB_DIR``.

It unpickles the function, calls it, and records the outcome itself
(``state.json``, ``result.pkl``; see :mod:`cumulus_jupyter.jobdir`), so a job
finishes correctly even when the server that started it is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from ..jobdir import GPU_FRACTION_ENV, NICE_ENV, PAUSE_SIGNAL, SEED_ENV, JobDir
from ..shipping import install_shipped_modules, missing_module_message
from ..spec import python_version
from ..states import run_outcome
from . import context, ranks
from .context import JobInterrupted, current_run, pause_observed, read_control, request_pause


def _process_start_time() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil is a dependency, but the job must not die for it
        return None


def setup_gpu() -> None:
    """Cap this process at its GPU share before any user code allocates memory.

    The backend already pinned the device with CUDA_VISIBLE_DEVICES, so the
    job's device is ``cuda:0``. Nothing happens on a host without CUDA.
    """
    fraction = os.environ.get(GPU_FRACTION_ENV)
    if not fraction or os.environ.get("CUDA_VISIBLE_DEVICES") in (None, ""):
        return
    import torch

    if torch.cuda.is_available() and float(fraction) < 1.0:
        torch.cuda.set_per_process_memory_fraction(float(fraction), 0)


def _dumps_result(outcome: dict[str, Any]) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps(outcome)
    except Exception as e:
        if outcome.get("ok"):
            failure = {
                "ok": False,
                "exc_type": "TypeError",
                "message": f"the job returned a {type(outcome['value']).__name__}, "
                f"which cannot be pickled: {e}",
                "traceback": traceback.format_exc(),
            }
        else:  # the exception itself does not pickle; keep its text
            failure = {k: v for k, v in outcome.items() if k != "exception"}
        return cloudpickle.dumps(failure)


def _seed_for_verification() -> None:
    """Under verify_resume, start every generator from the same state in every run.

    A real job starts from the OS's entropy like any Python process; the two
    runs verify_resume compares must not differ by that, only by what the
    function itself does.
    """
    seed = os.environ.get(SEED_ENV)
    if not seed:
        return
    import random

    random.seed(int(seed))
    try:
        import numpy as np

        np.random.seed(int(seed))
    except ImportError:
        pass
    import torch

    torch.manual_seed(int(seed))  # CUDA's generators too


def interrupted_outcome(e: JobInterrupted) -> dict[str, Any]:
    """The outcome of a run that SIGTERM or SIGINT stopped (after it saved, if guarded)."""
    return {
        "ok": True,
        "value": {
            "status": "interrupted",
            "signal": signal.Signals(e.signum).name,
            "checkpoint": e.checkpoint,
        },
    }


def failure_outcome(e: BaseException, origins: dict[str, str]) -> dict[str, Any]:
    """The outcome of a run whose code raised ``e`` (its traceback goes to stderr too)."""
    tb = "".join(traceback.format_exception(e))
    message = str(e)
    if isinstance(e, ModuleNotFoundError) and e.name:
        # Say which module, where the submitter had it from, and what to do.
        message = missing_module_message(e.name, origins)
        tb += f"\n{message}\n"
    sys.stderr.write(tb)
    return {
        "ok": False,
        "exc_type": f"{type(e).__module__}.{type(e).__qualname__}",
        "message": message,
        "traceback": tb,
        "exception": e,
    }


def settle_saves(outcome: dict[str, Any]) -> dict[str, Any]:
    """Wait for every asynchronous save; a failed one fails an outcome that was a success.

    A pause or an exit counts only once the last checkpoint is durable.
    """
    save_errors = context.wait_for_saves()
    if not (save_errors and outcome["ok"]):
        return outcome
    save_error = save_errors[-1]
    tb = "".join(traceback.format_exception(save_error))
    sys.stderr.write(tb)
    return {
        "ok": False,
        "exc_type": f"{type(save_error).__module__}.{type(save_error).__qualname__}",
        "message": f"the last checkpoint could not be saved: {save_error}",
        "traceback": tb,
    }


def fresh_seeds(torch: bool) -> None:
    """New seeds from the OS for ``random`` and NumPy (and torch too with ``torch``).

    A forked process starts with its parent's generator states; a process
    started cold draws its own.
    """
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if torch and "torch" in sys.modules:
        sys.modules["torch"].seed()


def warm_up() -> None:
    """Import what each run imports as it starts (psutil, ``numpy.random``).

    Called once by the warm template, so that the runs it forks find these
    imported instead of importing them each time.
    """
    _process_start_time()
    fresh_seeds(torch=True)


def lower_priority(nice: int) -> None:
    """Give this process, and the session it leads, the niceness ``nice``."""
    if nice <= 0:
        return
    # Absolute, not os.nice's increment: a run forked from the warm template
    # starts with the template's niceness already.
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) < nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    # With autogroup scheduling (on in most distributions' kernels) the CPU is
    # shared between sessions first, and a process's nice only ranks it inside
    # its own session: a job, which leads a session of its own, would compete
    # with the server as an equal. The session's group takes the nice as well.
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as group:
        group.write(str(nice))


def run(job_dir: Path) -> int:
    """Run the job in ``job_dir`` once; return the process exit status."""
    # The pause signal's default action would kill the process, so its
    # handler goes in before anything slow (torch) is imported; state.json
    # saying "running" for this run tells the server it may signal now.
    signal.signal(PAUSE_SIGNAL, request_pause)
    # Below the server that controls it: a pause or a status request must not
    # wait behind fifty jobs starting up on a few cores.
    with contextlib.suppress(ValueError):
        lower_priority(int(os.environ.get(NICE_ENV, "0")))

    def on_term(signum: int, _frame: Any) -> None:
        raise JobInterrupted(signum)

    signal.signal(signal.SIGTERM, on_term)
    # Past a file-size limit, writes must fail with an error the Checkpointer
    # reports, not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    os.chdir(job_dir)
    files = JobDir(job_dir)
    state: dict[str, Any] = {
        "state": "running",
        "pid": os.getpid(),
        "create_time": _process_start_time(),
        "run": current_run(),
        "started": time.time(),
        # Where it runs, as it sees it: a backend that places runs on other
        # machines (Ray) learns the host and the GPUs it was given from here.
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    files.write_state(state)

    outcome: dict[str, Any]
    interrupted = observed = False
    origins: dict[str, str] = {}
    try:
        # The seed's examples say `from runtime import Checkpointer, should_pause`.
        context.install_runtime_alias()
        want = files.read_spec().get("python_version")
        have = python_version()
        if want and want != have:
            raise RuntimeError(
                f"the job was pickled by Python {want} but runs under Python {have}: "
                "submit it from a Python of the same version as the job server's"
            )
        setup_gpu()
        import cloudpickle

        # The submitter's own modules come first, so unpickling and the
        # function import what the kernel imported.
        origins = install_shipped_modules(job_dir)
        _seed_for_verification()
        call = cloudpickle.loads(files.payload.read_bytes())
        if not (
            isinstance(call, tuple)
            and len(call) == 3
            and callable(call[0])
            and isinstance(call[1], tuple | list)
            and isinstance(call[2], dict)
        ):
            raise TypeError(
                "the job's payload must be cloudpickle.dumps((callable, args, kwargs)), "
                f"got a {type(call).__name__}"
            )
        func, args, kwargs = call
        world = ranks.nprocs()
        if world > 1:
            outcome, interrupted, observed = ranks.run_ranks(func, args, kwargs, world, job_dir)
        else:
            outcome = {"ok": True, "value": func(*args, **kwargs)}
    except JobInterrupted as e:
        interrupted = True
        outcome = interrupted_outcome(e)
    except BaseException as e:  # the user's code may raise anything, SystemExit included
        outcome = failure_outcome(e, origins)

    # Ignore further signals while recording the outcome: a second SIGTERM
    # must not leave result.pkl and state.json disagreeing.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outcome = settle_saves(outcome)
    final = run_outcome(
        ok=outcome["ok"],
        stopped=interrupted or observed or pause_observed(),
        control=read_control(),
    )
    files.write_result(_dumps_result(outcome))
    state.update(state=final.value, ended=time.time(), exit={"interrupted": interrupted})
    if not outcome["ok"]:
        state["error"] = f"{outcome['exc_type']}: {outcome['message']}"
    sys.stdout.flush()
    sys.stderr.flush()
    files.write_state(state)
    return 0 if outcome["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m cumulus_jupyter.runtime.worker JOB_DIR\n")
        return 2
    return run(Path(argv[0]).resolve())


def exit_now(code: int) -> NoReturn:
    """End the process once the run's outcome is durable, without interpreter teardown.

    Tearing down an interpreter that loaded torch takes a noticeable part of a
    second, and the server counts a pause or a cancel done only when the
    process is gone. What a normal exit does for user code still happens, in
    its order: threads that are not daemons are waited for, then the
    ``atexit`` handlers run (a logger flushing, a writer closing).
    """
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    with contextlib.suppress(Exception):  # a closed or broken stream changes nothing now
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

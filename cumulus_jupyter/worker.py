"""The job process: ``python -m cumulus_jupyter.worker JOB_DIR``.

It runs one *run* of a job: unpickles the function, calls it, and records the
outcome itself (``state.json``, ``result.pkl``), so a job finishes correctly
even when the server that started it is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes, atomic_write_json, read_json
from .jobcontext import RUN_ENV
from .shipping import install_shipped_modules, missing_module_message
from .spec import python_version

#: Environment the backend sets for the worker.
GPU_FRACTION_ENV = "CUMULUS_GPU_FRACTION"
NICE_ENV = "CUMULUS_JOB_NICE"
#: Set by verify_resume only: the seed every generator starts from in each run.
SEED_ENV = "CUMULUS_VERIFY_SEED"


def _process_start_time() -> float | None:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil is a dependency, but the job must not die for it
        return None


def _setup_gpu() -> None:
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


def run(job_dir: Path) -> int:
    """Run the job in ``job_dir`` once; return the process exit status."""
    # The pause signal's default action would kill the process, so its
    # handler goes in before anything slow (torch) is imported; state.json
    # saying "running" for this run tells the server it may signal now.
    from . import jobcontext
    from .jobcontext import (
        PAUSE_SIGNAL,
        JobInterrupted,
        pause_observed,
        read_control,
        request_pause,
    )

    signal.signal(PAUSE_SIGNAL, request_pause)
    # Below the server that controls it: a pause or a status request must not
    # wait behind fifty jobs starting up on a few cores.
    with contextlib.suppress(ValueError, OSError):
        os.nice(int(os.environ.get(NICE_ENV, "0")))

    def on_term(signum: int, _frame: Any) -> None:
        raise JobInterrupted(signum)

    signal.signal(signal.SIGTERM, on_term)
    # Past a file-size limit, writes must fail with an error the Checkpointer
    # reports, not kill the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    os.chdir(job_dir)
    state: dict[str, Any] = {
        "state": "running",
        "pid": os.getpid(),
        "create_time": _process_start_time(),
        "run": int(os.environ.get(RUN_ENV, "1")),
        "started": time.time(),
    }
    atomic_write_json(job_dir / "state.json", state)

    outcome: dict[str, Any]
    interrupted = False
    origins: dict[str, str] = {}
    try:
        # The seed's examples say `from runtime import Checkpointer, should_pause`.
        jobcontext.install_runtime_alias()
        spec = read_json(job_dir / "job.json", default={})
        want = spec.get("python_version")
        have = python_version()
        if want and want != have:
            raise RuntimeError(
                f"the job was pickled by Python {want} but runs under Python {have}: "
                "submit it from a Python of the same version as the job server's"
            )
        _setup_gpu()
        import cloudpickle

        # The submitter's own modules come first, so unpickling and the
        # function import what the kernel imported.
        origins = install_shipped_modules(job_dir)
        _seed_for_verification()
        call = cloudpickle.loads((job_dir / "func.pkl").read_bytes())
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
        value = func(*args, **kwargs)
        outcome = {"ok": True, "value": value}
    except JobInterrupted as e:
        interrupted = True
        outcome = {
            "ok": True,
            "value": {
                "status": "interrupted",
                "signal": signal.Signals(e.signum).name,
                "checkpoint": e.checkpoint,
            },
        }
    except BaseException as e:  # the user's code may raise anything, SystemExit included
        tb = traceback.format_exc()
        message = str(e)
        if isinstance(e, ModuleNotFoundError) and e.name:
            # Say which module, where the submitter had it from, and what to do.
            message = missing_module_message(e.name, origins)
            tb += f"\n{message}\n"
        sys.stderr.write(tb)
        outcome = {
            "ok": False,
            "exc_type": f"{type(e).__module__}.{type(e).__qualname__}",
            "message": message,
            "traceback": tb,
            "exception": e,
        }

    # Ignore further signals while recording the outcome: a second SIGTERM
    # must not leave result.pkl and state.json disagreeing.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A pause or an exit counts only once the last checkpoint is durable.
    save_errors = jobcontext.wait_for_saves()
    if save_errors and outcome["ok"]:
        save_error = save_errors[-1]
        outcome = {
            "ok": False,
            "exc_type": f"{type(save_error).__module__}.{type(save_error).__qualname__}",
            "message": f"the last checkpoint could not be saved: {save_error}",
            "traceback": "".join(traceback.format_exception(save_error)),
        }
        sys.stderr.write(outcome["traceback"])
    control = read_control()
    if not outcome["ok"]:
        final = "failed"
    elif control.get("cancel"):
        final = "cancelled"
    elif interrupted or pause_observed():
        final = "timed_out" if control.get("reason") == "duration" else "paused"
    else:
        final = "completed"
    atomic_write_bytes(job_dir / "result.pkl", _dumps_result(outcome))
    state.update(state=final, ended=time.time(), exit={"interrupted": interrupted})
    if not outcome["ok"]:
        state["error"] = f"{outcome['exc_type']}: {outcome['message']}"
    sys.stdout.flush()
    sys.stderr.flush()
    atomic_write_json(job_dir / "state.json", state)
    return 0 if outcome["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.stderr.write("usage: python -m cumulus_jupyter.worker JOB_DIR\n")
        return 2
    return run(Path(argv[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())

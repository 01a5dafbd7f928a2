"""The job directory: the one contract between the server, the job process and verify.

Every job is a private directory under the server's job root. It is the
source of truth: the server rebuilds its view from it after a restart, and a
job records its own outcome there, so it finishes correctly even when the
server that started it is gone. Nothing else in the package spells these file
names, environment names or the pause signal; they are all here.

::

    <job_root>/<job_id>/
      job.json        the server's record of the job (spec, state, runs); server writes
      func.pkl        cloudpickle.dumps((func, args, kwargs)); only the job unpickles it
      modules/        the submitter's own modules that travel with the job (source files)
      modules.json    their list, and where the submitter imported each module from
      control.json    the server's instructions: pause, cancel, reason, resume_checkpoint
      state.json      the job process's own account of a run: pid, run, start, outcome
      output.log      stdout and stderr of every run, appended
      metrics.jsonl   one JSON line per report() call, with its run
      result.pkl      the last run's outcome: {"ok": True, "value": ...} or the exception
      checkpoints/    checkpoint files, their sidecars and manifest.json (see manifest.py)

Who reads and writes what is tabled in docs/architecture.md.

A run is started as ``python -m cumulus_jupyter.runtime.worker <dir>`` (see
:func:`worker_command`) with the environment :func:`job_environment` builds:
where the directory is, which run this is, the GPU share. The server asks a
run to pause by setting ``pause`` in ``control.json`` and then sending
:data:`PAUSE_SIGNAL`; the job also looks at ``control.json`` now and then, in
case the signal was lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .connection import TOKEN_ENV
from .fileio import FILE_MODE, atomic_write_bytes, atomic_write_json, read_json

# -- files ---------------------------------------------------------------------
RECORD = "job.json"
PAYLOAD = "func.pkl"
MODULES = "modules"
MODULES_INDEX = "modules.json"
CONTROL = "control.json"
STATE = "state.json"
OUTPUT = "output.log"
METRICS = "metrics.jsonl"
RESULT = "result.pkl"
#: A rank's outcome for the worker that started it, in a job of several ranks.
RANK_OUTCOME = ".rank-{rank}-outcome.pkl"
CHECKPOINTS = "checkpoints"

# -- environment of a run --------------------------------------------------------
#: The job directory; its presence is what "inside a job" means.
JOB_DIR_ENV = "CUMULUS_JOB_DIR"
JOB_ID_ENV = "CUMULUS_JOB_ID"
#: Which run of the job this process is: 1, 2, ...
RUN_ENV = "CUMULUS_RUN"
#: The job's share of its GPU's memory (the worker caps torch's allocator at it).
GPU_FRACTION_ENV = "CUMULUS_GPU_FRACTION"
#: Niceness the worker gives itself.
NICE_ENV = "CUMULUS_JOB_NICE"
#: How many ranks (processes) run the job's function: "1" or absent is one
#: process, as always. With N > 1, ``CUDA_VISIBLE_DEVICES`` lists the N devices
#: placed for it on a GPU host (rank i gets the i-th), or is empty on a CPU host.
NPROCS_ENV = "CUMULUS_NPROCS"
#: Seconds between asking a process to stop and killing it (``CumulusApp.kill_grace``).
KILL_GRACE_ENV = "CUMULUS_KILL_GRACE"
#: How often (seconds) a run looks at control.json for a pause. A backend whose
#: runs get no signal from the server (they run on other machines) sets it low.
CONTROL_POLL_ENV = "CUMULUS_CONTROL_POLL"
#: verify_resume only: Checkpointer.loop asks for a pause at this global step.
PAUSE_AT_ENV = "CUMULUS_PAUSE_AT_STEP"
#: verify_resume only: the seed every generator starts from in each run.
SEED_ENV = "CUMULUS_VERIFY_SEED"
#: Variables a job must not inherit from the server: the server's own token,
#: and JupyterHub's API token under its current and its legacy name.
SECRET_ENV = (TOKEN_ENV, "JUPYTER_TOKEN", "JPY_API_TOKEN", "JUPYTERHUB_API_TOKEN")

#: What is particular to one run (set per run by :func:`job_environment`); a warm
#: template shares everything else of a run's environment.
RUN_ENV_KEYS = frozenset(
    {
        JOB_DIR_ENV,
        JOB_ID_ENV,
        RUN_ENV,
        GPU_FRACTION_ENV,
        NICE_ENV,
        NPROCS_ENV,
        KILL_GRACE_ENV,
        PAUSE_AT_ENV,
        SEED_ENV,
        "PYTHONUNBUFFERED",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
    }
)

# -- the process -----------------------------------------------------------------
#: The module a run executes (``python -m``).
WORKER_MODULE = "cumulus_jupyter.runtime.worker"
#: Sent by the server after it set ``pause`` in ``control.json``.
PAUSE_SIGNAL = signal.SIGUSR1


def worker_command(python: str, job_dir: Path) -> list[str]:
    """The command line of one run of the job in ``job_dir``."""
    return [python, "-m", WORKER_MODULE, str(job_dir)]


def start_worker(python: str, job_dir: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start one run of the job in ``job_dir``: the worker, in the directory, logging to it.

    Its own session and process group: the job survives whoever started it,
    and one ``killpg`` reaches its DataLoader workers too.
    """
    log = JobDir(job_dir).open_output()
    try:
        return subprocess.Popen(
            worker_command(python, job_dir),
            cwd=job_dir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(log)


def shared_environment(base: Mapping[str, str]) -> dict[str, str]:
    """What every run's environment takes from ``base``: all of it but the secrets."""
    return {k: v for k, v in base.items() if k not in SECRET_ENV}


def job_environment(
    base: Mapping[str, str],
    job_dir: Path,
    job_id: str,
    run: int,
    *,
    gpu_fraction: float | None = None,
    cuda_devices: str | None = None,
    nice: int | None = None,
    nprocs: int = 1,
    kill_grace: float | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one run: ``base`` without secrets, plus what the worker reads.

    ``cuda_devices`` is what ``CUDA_VISIBLE_DEVICES`` becomes (``""`` hides
    every GPU); ``None`` leaves it as ``base`` has it.
    """
    env = shared_environment(base)
    env.update(
        {
            JOB_DIR_ENV: str(job_dir),
            JOB_ID_ENV: job_id,
            RUN_ENV: str(run),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if gpu_fraction is not None:
        env[GPU_FRACTION_ENV] = repr(gpu_fraction)
    if nice is not None:
        env[NICE_ENV] = str(nice)
    if nprocs != 1:
        env[NPROCS_ENV] = str(nprocs)
    if kill_grace is not None:
        env[KILL_GRACE_ENV] = repr(kill_grace)
    if cuda_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_devices
        # Device numbers are nvidia-smi's (PCI bus order); CUDA's default
        # order (fastest first) may number the cards differently.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env.update(extra or {})
    return env


class JobDir:
    """Paths of one job directory and the readers and writers of its small files.

    Readers of JSON objects return ``{}`` for a file that is missing or
    damaged: a job half-created or killed mid-write must never crash the
    server that looks at it.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JobDir({str(self.path)!r})"

    @property
    def record(self) -> Path:
        return self.path / RECORD

    @property
    def payload(self) -> Path:
        return self.path / PAYLOAD

    @property
    def control(self) -> Path:
        return self.path / CONTROL

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def output(self) -> Path:
        return self.path / OUTPUT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def result(self) -> Path:
        return self.path / RESULT

    def rank_outcome(self, rank: int) -> Path:
        return self.path / RANK_OUTCOME.format(rank=rank)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def modules(self) -> Path:
        return self.path / MODULES

    @property
    def modules_index(self) -> Path:
        return self.path / MODULES_INDEX

    # -- JSON objects ------------------------------------------------------------

    def _read_object(self, path: Path) -> dict[str, Any]:
        try:
            data = read_json(path, default={})
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    def read_control(self) -> dict[str, Any]:
        """The server's instructions (``pause``, ``cancel``, ``reason``, ``resume_checkpoint``)."""
        return self._read_object(self.control)

    def write_control(self, **changes: Any) -> None:
        """Change some instructions, keeping the others (only the server calls this)."""
        control = self.read_control()
        control.update(changes)
        # Not fsynced: a lost pause flag after a power loss costs nothing,
        # the process it was meant for is gone too.
        atomic_write_json(self.control, control, durable=False)

    def read_state(self) -> dict[str, Any]:
        """What the job process last wrote about its run (empty if nothing readable)."""
        return self._read_object(self.state)

    def write_state(self, state: dict[str, Any]) -> None:
        """The job process's account of its run (durable: it settles how a run ended)."""
        atomic_write_json(self.state, state)

    def read_spec(self) -> dict[str, Any]:
        """The record as the job process needs it (its ``python_version``); ``{}`` if unreadable."""
        return self._read_object(self.record)

    # -- the outcome ---------------------------------------------------------------

    def read_result(self) -> bytes | None:
        """The pickled outcome of the last run, or ``None`` when it left none."""
        try:
            return self.result.read_bytes()
        except FileNotFoundError:
            return None

    def write_result(self, data: bytes) -> None:
        atomic_write_bytes(self.result, data)

    def clear_result(self) -> None:
        """Before a run starts: the last run's outcome must not pass for this one's."""
        with contextlib.suppress(FileNotFoundError):
            self.result.unlink()

    # -- output ----------------------------------------------------------------------

    def open_output(self) -> int:
        """A file descriptor appending to ``output.log``, for a run's stdout and stderr."""
        return os.open(self.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)

    def append_metrics(self, line: str) -> None:
        """Append one JSON line to ``metrics.jsonl`` (one ``write``: lines never interleave)."""
        fd = os.open(self.metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

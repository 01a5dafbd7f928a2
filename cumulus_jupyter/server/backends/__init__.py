"""Execution backends: how a job's runs are started, signalled and watched.

The manager only talks to :class:`Backend`, so another engine (Ray, a batch
scheduler) can replace :class:`~.local.LocalBackend` through the
``CumulusApp.backend_class`` trait without touching the lifecycle code. A
backend starts :func:`cumulus_jupyter.jobdir.worker_command` in the job's
directory with the environment it is given; everything else a run needs is
in that directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcessHandle:
    """Identifies one job process: its pid *and* start time, so a reused pid never matches."""

    pid: int
    create_time: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> ProcessHandle | None:
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            return None
        ct = data.get("create_time")
        return cls(pid=data["pid"], create_time=float(ct) if ct is not None else None)


class Backend(ABC):
    """Starts and controls job processes. Every method must be quick (no waiting)."""

    @abstractmethod
    def start(self, job_dir: Path, python: str, env: dict[str, str]) -> ProcessHandle:
        """Start one run (:func:`~cumulus_jupyter.jobdir.worker_command`) in ``job_dir``."""

    @abstractmethod
    def is_alive(self, handle: ProcessHandle) -> bool:
        """Whether the job's main process still runs."""

    @abstractmethod
    def exit_code(self, handle: ProcessHandle) -> int | None:
        """The exit status of a finished process, when this backend knows it."""

    @abstractmethod
    def notify_pause(self, handle: ProcessHandle) -> None:
        """Tell the process that ``control.json`` now asks it to pause."""

    @abstractmethod
    def terminate(self, handle: ProcessHandle) -> None:
        """Ask the job to stop now (SIGTERM): it may still save a checkpoint."""

    @abstractmethod
    def kill(self, handle: ProcessHandle) -> None:
        """Stop the job and everything it started, without delay (SIGKILL)."""

    @abstractmethod
    def adopt(self, handle: ProcessHandle) -> bool:
        """After a server restart: whether ``handle`` is still that very job process."""

    def cleanup(self, handle: ProcessHandle) -> None:  # noqa: B027 - optional hook
        """Remove what is left of a job whose main process has ended."""

    def watch(self, handle: ProcessHandle, on_exit: Callable[[], None]) -> None:  # noqa: B027
        """Call ``on_exit`` in the server's event loop as soon as the run's process ends.

        Optional: a backend that cannot tell leaves it to the monitor, which
        polls :meth:`is_alive` a few times a second.
        """

    def unwatch_all(self) -> None:  # noqa: B027 - optional hook
        """Stop every :meth:`watch` (the server is stopping; the jobs go on)."""


from .local import LocalBackend  # noqa: E402  (after Backend, which it subclasses)

__all__ = ["Backend", "LocalBackend", "ProcessHandle"]

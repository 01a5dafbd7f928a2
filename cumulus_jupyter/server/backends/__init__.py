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
from typing import Any, Generic, Protocol, TypeVar


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


class RunHandle(Protocol):
    """What a backend names one run by; kept in ``job.json`` (``process``) as JSON."""

    def to_json(self) -> dict[str, Any]: ...


H = TypeVar("H", bound=RunHandle)


class Backend(ABC, Generic[H]):
    """Starts and controls job processes. Every method must be quick (no waiting).

    ``start`` is the exception: the manager calls it in a thread.
    """

    #: True for an engine that decides itself where and when a run starts (Ray):
    #: the manager then submits every queued run at once, without GPU shares of
    #: its own, and the run stays queued until :meth:`placed` names where it runs.
    places_runs: bool = False

    @abstractmethod
    def handle(self, data: Any) -> H | None:
        """The handle that :meth:`RunHandle.to_json` gave ``data``, or None if it is not one."""

    @abstractmethod
    def start(self, job_dir: Path, python: str, env: dict[str, str]) -> H:
        """Start one run (:func:`~cumulus_jupyter.jobdir.worker_command`) in ``job_dir``."""

    @abstractmethod
    def is_alive(self, handle: H) -> bool:
        """Whether the run still runs, or still waits to be placed."""

    @abstractmethod
    def exit_code(self, handle: H) -> int | None:
        """The exit status of a finished process, when this backend knows it."""

    @abstractmethod
    def notify_pause(self, handle: H) -> None:
        """Tell the process that ``control.json`` now asks it to pause."""

    @abstractmethod
    def terminate(self, handle: H) -> None:
        """Ask the job to stop now (SIGTERM): it may still save a checkpoint."""

    @abstractmethod
    def kill(self, handle: H) -> None:
        """Stop the job and everything it started, without delay (SIGKILL)."""

    @abstractmethod
    def adopt(self, handle: H) -> bool:
        """After a server restart: whether ``handle`` is still that very job process."""

    def placed(self, handle: H) -> str | None:
        """Where a submitted run runs (a node), once it does; None while it waits.

        Only asked of a backend that :attr:`places_runs`.
        """
        return "here"

    def waiting_reason(self, handle: H) -> str:
        """Why a submitted run is not placed yet, in the engine's words."""
        return ""

    def end_note(self, handle: H) -> str:
        """What the engine says about how a run ended (e.g. "its node died"), or ""."""
        return ""

    def cleanup(self, handle: H) -> None:
        """Remove what is left of a job whose main process has ended."""

    def watch(self, handle: H, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` in the server's event loop as soon as the run's process ends.

        Optional: a backend that cannot tell leaves it to the monitor, which
        polls :meth:`is_alive` a few times a second.
        """

    def unwatch_all(self) -> None:
        """Stop every :meth:`watch` (the server is stopping; the jobs go on)."""


from .local import LocalBackend  # noqa: E402  (after Backend, which it subclasses)

__all__ = ["Backend", "LocalBackend", "ProcessHandle", "RunHandle"]

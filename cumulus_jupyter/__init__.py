"""cumulus-jupyter: run long GPU training from Jupyter as pausable, resumable jobs.

The client SDK (:class:`CumulusClient`, :class:`Job`) and the runtime API
(:class:`Checkpointer`, :func:`should_pause`, ...) are importable from here;
each loads on first use, so ``import cumulus_jupyter`` stays cheap (the
runtime pulls in torch, the server side does not).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .errors import (
        BadRequestError,
        CumulusError,
        InvalidStateError,
        JobFailedError,
        JobNotFoundError,
        JobStoppedError,
    )
    from .kernel.client import CumulusClient, Job
    from .kernel.widgets import CheckpointBrowser, JobWidget
    from .runtime import (
        Checkpointer,
        job_dir,
        list_checkpoints,
        report,
        save_on_interrupt,
        should_pause,
        verify_resume,
    )

_LAZY = {
    "CumulusClient": "kernel.client",
    "Job": "kernel.client",
    "CumulusError": "errors",
    "BadRequestError": "errors",
    "InvalidStateError": "errors",
    "JobFailedError": "errors",
    "JobNotFoundError": "errors",
    "JobStoppedError": "errors",
    "Checkpointer": "runtime",
    "should_pause": "runtime",
    "list_checkpoints": "runtime",
    "job_dir": "runtime",
    "report": "runtime",
    "save_on_interrupt": "runtime",
    "verify_resume": "runtime",
    "JobWidget": "kernel.widgets",
    "CheckpointBrowser": "kernel.widgets",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cumulus_jupyter' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server.app import CumulusApp

    return [{"module": "cumulus_jupyter", "app": CumulusApp}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the prebuilt JupyterLab panel lives (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "cumulus-jupyter"}]


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext cumulus_jupyter``: the ``%%cumulus`` and ``%cumulus`` magics."""
    from .kernel.magics import load_ipython_extension as load

    load(ip)

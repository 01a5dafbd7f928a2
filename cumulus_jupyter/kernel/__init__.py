"""The kernel side: the client SDK, the magics and the widgets.

Runs in a notebook kernel or any Python process that talks to a cumulus
server over HTTP (``client``, ``payload``), plus what only a notebook needs
(``magics``, ``widgets``, ``display``, ``logstream``). Nothing here imports
the server side. Imports go one way::

    display, logstream, payload  <-  client  <-  widgets  <-  magics

In a Jupyter kernel a ``Job`` displays as its ``JobWidget``. The client does
not know about widgets, so that display is registered here, where every
kernel-side import passes, before any ``Job`` exists.
"""

from importlib import import_module
from typing import Any

from .display import show_in_notebooks


def _job_widget(job: Any) -> Any:
    # The one deferred import of the kernel side: ipywidgets loads when the
    # first Job is shown, not in every process that uses the client.
    return import_module(f"{__name__}.widgets").JobWidget(job)


show_in_notebooks(f"{__name__}.client", "Job", _job_widget)

"""Where ``run_cell`` lived before the package was sorted by where code runs.

Jobs submitted then pickled it by this name, and a job paused under an older
version resumes by unpickling its payload again, so the name must keep
resolving. New code imports :mod:`cumulus_jupyter.runtime.cellrun`.
"""

from .runtime.cellrun import run_cell

__all__ = ["run_cell"]

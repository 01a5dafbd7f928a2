"""The original document's import path: ``from cumulus.sdk import CumulusClient``.

Importing it also makes ``runtime`` importable in this process (as it is in
every job), so the original examples, which say ``from runtime import
Checkpointer, should_pause`` beside it, run unchanged.
"""

import sys

from cumulus_jupyter import runtime as _runtime
from cumulus_jupyter.client import CumulusClient, Job
from cumulus_jupyter.errors import CumulusError, JobFailedError

sys.modules.setdefault("runtime", _runtime)

__all__ = ["CumulusClient", "CumulusError", "Job", "JobFailedError"]

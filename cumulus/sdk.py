"""The original document's import path: ``from cumulus.sdk import CumulusClient``.

Importing it also makes ``runtime`` importable in this process (as it is in
every job), so the original examples, which say ``from runtime import
Checkpointer, should_pause`` beside it, run unchanged.
"""

from cumulus_jupyter.errors import CumulusError, JobFailedError
from cumulus_jupyter.kernel.client import CumulusClient, Job
from cumulus_jupyter.runtime.context import install_runtime_alias

install_runtime_alias()

__all__ = ["CumulusClient", "CumulusError", "Job", "JobFailedError"]

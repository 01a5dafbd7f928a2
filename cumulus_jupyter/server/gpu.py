"""The GPU inventory of the host and the admission of jobs by memory share.

Each job asks for a share ``0 < gpu_memory <= 1`` of one device. A job starts
on a device whose shares, its own included, sum to at most 1; otherwise it
waits in the queue. A host without GPUs counts as one device named ``cpu``,
so queueing behaves the same everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

CPU_DEVICE = "cpu"
_EPS = 1e-9  # 0.6 + 0.4 must fit on one device despite float rounding


def detect_gpus() -> list[str]:
    """The CUDA devices jobs may use, without importing torch in the server.

    ``CUDA_VISIBLE_DEVICES`` wins when set; else ``nvidia-smi -L`` is asked.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


@dataclass
class ShareLedger:
    """Which job holds how much of which device."""

    devices: list[str]
    held: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.devices:
            self.devices = [CPU_DEVICE]
        self.held = {d: {} for d in self.devices}

    @property
    def has_gpus(self) -> bool:
        return self.devices != [CPU_DEVICE]

    def free(self, device: str) -> float:
        return 1.0 - sum(self.held[device].values())

    def place(self, share: float) -> str | None:
        """The device with the most room that fits ``share``, or ``None``."""
        best = max(self.devices, key=self.free)
        return best if self.free(best) + _EPS >= share else None

    def take(self, job_id: str, device: str, share: float) -> None:
        if device not in self.held:  # a re-adopted job on a device no longer listed
            self.held[device] = {}
        self.held[device][job_id] = share

    def release(self, job_id: str) -> None:
        for jobs in self.held.values():
            jobs.pop(job_id, None)

    def usage(self) -> list[dict[str, object]]:
        """Per device: the share taken and by which jobs."""
        return [
            {"device": d, "used": round(1.0 - self.free(d), 6), "jobs": dict(jobs)}
            for d, jobs in self.held.items()
        ]

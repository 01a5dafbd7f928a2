"""The GPU inventory of the host and the admission of jobs by memory share.

Each job asks for a share ``0 < gpu_memory <= 1`` of one device for each of
its ranks (processes). A job starts once it finds as many distinct devices as
it has ranks, each with room for its share (the shares on a device, its own
included, sum to at most 1); otherwise it waits in the queue. A host without
GPUs counts as one device named ``cpu``, so queueing behaves the same
everywhere; there every rank of a job shares that device, and the job takes
its share of it once.
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

    def place(self, share: float, ranks: int = 1) -> list[str] | None:
        """The devices for a job of ``ranks`` processes, each needing ``share``; else ``None``.

        On a GPU host: ``ranks`` distinct devices, those with the most room
        first (rank i runs on the i-th), or ``None`` while fewer than
        ``ranks`` devices have room. On a host without GPUs: ``["cpu"]``,
        which every rank shares, if it has room for ``share`` once.
        """
        if not self.has_gpus:
            ranks = 1
        # sorted() is stable: among devices with as much room, the first listed wins.
        roomiest = sorted(self.devices, key=self.free, reverse=True)[:ranks]
        if len(roomiest) < ranks or any(self.free(d) + _EPS < share for d in roomiest):
            return None
        return roomiest

    def take(self, job_id: str, devices: list[str], share: float) -> None:
        """Hold ``share`` of each of ``devices`` for ``job_id``."""
        for device in devices:
            if device not in self.held:  # a re-adopted job on a device no longer listed
                self.held[device] = {}
            self.held[device][job_id] = share

    def release(self, job_id: str) -> None:
        """Free every share ``job_id`` holds, on whichever devices."""
        for jobs in self.held.values():
            jobs.pop(job_id, None)

    def usage(self) -> list[dict[str, object]]:
        """Per device: the share taken and by which jobs."""
        return [
            {"device": d, "used": round(1.0 - self.free(d), 6), "jobs": dict(jobs)}
            for d, jobs in self.held.items()
        ]

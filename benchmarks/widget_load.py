"""What a notebook full of live JobWidgets costs the server, and how soon each shows a line.

    python benchmarks/widget_load.py [--rounds 3] [--widgets 20] [--every 0.05] [--window 5]

A real job server (the one the tests use) runs ``--widgets`` jobs that each
print a timestamped line every ``--every`` seconds. In each round, three
ways of following all of them run in turn (the order reversed every other
round), each for ``--window`` seconds, in this process as in one kernel:

- *refresh every 1 s*: what the widgets did before they followed output
  with long-polls, replayed with the SDK: one thread that, each second,
  asks every job for its record, its new output and its new metrics.
- *a long-poll per widget*: what they did next, replayed the same way: that
  refresh without the output, and one thread per widget that long-polls its
  job's output (``GET jobs/{id}/logs?wait=2``, at least 0.1 s apart).
- *JobWidgets*: real :class:`~cumulus_jupyter.JobWidget` objects, as this
  code makes them.

Measured: the server process's CPU time (user + system) per second of the
window, and the delay from each line's printing to its arrival in this
process. Printed: each way's median over the rounds, and the median of the
paired ratios of the JobWidgets' server CPU to the other two ways'. Goals
(the issue "Instant control"): a printed line seen within 0.1 s (median),
with no more server load than the 1 s refresh made.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess, wait_until

LINE_GOAL = 0.1


def chatter(every: float) -> None:
    """The followed job: a timestamped line every ``every`` seconds, until cancelled."""
    import time

    i = 0
    while True:
        print(f"line {i} {time.time():.6f}", flush=True)
        i += 1
        time.sleep(every)


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Arrivals:
    """Delays from printing to arrival of the lines printed inside the window."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffers: dict[str, str] = {}
        self.delays: list[float] = []
        self.start = self.end = float("inf")

    def feed(self, job_id: str, data: str) -> None:
        now = time.time()
        with self.lock:
            text = self.buffers.get(job_id, "") + data
            *lines, self.buffers[job_id] = text.split("\n")
            for line in lines:
                parts = line.split()
                if len(parts) == 3 and parts[0] == "line":
                    printed = float(parts[2])
                    if self.start <= printed <= self.end:
                        self.delays.append(now - printed)


class Replay:
    """Followers made of SDK calls, as the widgets used to make them."""

    def __init__(self, client: Any, jobs: list[Any], arrivals: Arrivals, long_polls: bool):
        self.client, self.jobs, self.arrivals = client, jobs, arrivals
        self.offsets = {job.id: job.client.get_logs(job.id)["size"] for job in jobs}
        self.metrics = dict.fromkeys(self.offsets, 0)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.refresh, args=(not long_polls,))]
        if long_polls:
            self.threads += [threading.Thread(target=self.follow, args=(j.id,)) for j in jobs]
        for thread in self.threads:
            thread.start()

    def refresh(self, with_output: bool) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            for job in self.jobs:
                job.info()
                if with_output:
                    part = self.client.get_logs(job.id, self.offsets[job.id])
                    self.take(job.id, part)
                page = self.client.metrics_page(job.id, since=self.metrics[job.id])
                self.metrics[job.id] = page["next"]
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def follow(self, job_id: str) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.take(job_id, self.client.get_logs(job_id, self.offsets[job_id], wait=2.0))
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def take(self, job_id: str, part: dict[str, Any]) -> None:
        self.offsets[job_id] = part["next_offset"]
        self.arrivals.feed(job_id, part["data"])

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


class Widgets:
    """Real JobWidgets, each one's arriving output noted as it is taken in."""

    def __init__(self, client: Any, jobs: list[Any], arrivals: Arrivals):
        from cumulus_jupyter import JobWidget

        self.widgets = []
        for job in jobs:
            widget = JobWidget(job)
            take = widget._add_output

            def noted(part: dict[str, Any], take: Callable = take, job_id: str = job.id) -> None:
                arrivals.feed(job_id, part["data"])
                take(part)

            widget._add_output = noted  # type: ignore[method-assign]
            self.widgets.append(widget)

    def close(self) -> None:
        for widget in self.widgets:
            widget.close()


WAYS: dict[str, Callable[[Any, list[Any], Arrivals], Any]] = {
    "refresh every 1 s": lambda c, j, a: Replay(c, j, a, long_polls=False),
    "a long-poll per widget": lambda c, j, a: Replay(c, j, a, long_polls=True),
    "JobWidgets": Widgets,
}


def measure(server: ServerProcess, jobs: list[Any], way: str, window: float) -> tuple[float, float]:
    """Server CPU per second, and the median line delay, while ``way`` follows ``jobs``."""
    arrivals = Arrivals()
    follower = WAYS[way](server.client(), jobs, arrivals)
    try:
        time.sleep(1.0)  # the followers settle (widgets draw what was printed before)
        cpu0, t0 = server_cpu(server.proc.pid), time.monotonic()
        arrivals.start = time.time()
        time.sleep(window)
        cpu, seconds = server_cpu(server.proc.pid) - cpu0, time.monotonic() - t0
        arrivals.end = time.time()
        time.sleep(1.5)  # the lines printed at the window's end arrive (1 s refresh)
    finally:
        follower.close()
    if not arrivals.delays:
        raise SystemExit(f"{way}: no line arrived in the window")
    return cpu / seconds, statistics.median(arrivals.delays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widgets", type=int, default=20)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between lines")
    parser.add_argument("--window", type=float, default=5.0, help="seconds measured per way")
    args = parser.parse_args()
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="cumulus-wl-"))).start()
    cpu: dict[str, list[float]] = {way: [] for way in WAYS}
    delay: dict[str, list[float]] = {way: [] for way in WAYS}
    try:
        client = server.client()
        jobs = [
            client.run_async(chatter, (args.every,), gpu_memory=0.01) for _ in range(args.widgets)
        ]
        wait_until(lambda: all(j.status() == "running" for j in jobs), timeout=180)
        for round_no in range(args.rounds):
            order = list(WAYS) if round_no % 2 == 0 else list(reversed(WAYS))
            for way in order:
                used, late = measure(server, jobs, way, args.window)
                cpu[way].append(used)
                delay[way].append(late)
        for job in jobs:
            job.cancel()
    finally:
        server.stop()
    print(
        f"{args.widgets} followed jobs, a line every {args.every:g} s each; {args.rounds} rounds of"
        f" {args.window:g} s per way"
    )
    mine = cpu["JobWidgets"]
    for way in WAYS:
        ratio = statistics.median(m / o for m, o in zip(mine, cpu[way], strict=True))
        print(
            f"  {way:24s} server CPU {100 * statistics.median(cpu[way]):5.1f}% of a core"
            f" ({', '.join(f'{100 * v:.1f}' for v in cpu[way])}); line seen after"
            f" {1000 * statistics.median(delay[way]):4.0f} ms (median); JobWidgets / this"
            f" {ratio:.2f}"
        )
    load = statistics.median(m / o for m, o in zip(mine, cpu["refresh every 1 s"], strict=True))
    late = statistics.median(delay["JobWidgets"])
    print(
        f"  JobWidgets: line seen after {1000 * late:.0f} ms, goal <= {1000 * LINE_GOAL:.0f} ms:"
        f" {'met' if late <= LINE_GOAL else 'NOT met'}; server CPU / refresh every 1 s"
        f" {load:.2f}, goal <= 1: {'met' if load <= 1 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

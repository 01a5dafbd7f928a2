"""What one short run costs the host's CPU: forked from the warm template, or started cold.

Against two real servers on this host (``jupyter server`` subprocesses), one
with warm workers (the default) and one without, used in turn in each round.
Each round submits the same short job (it imports torch, then sleeps 0.3 s,
checking ``should_pause()``) one at a time and waits for it to complete. Measured:

- *run CPU*: user + system time of the run's process, from the CPU time of
  reaped children of its parent (the template for a forked run, the server
  for a cold one), per run;
- *server CPU*: the server process's own time per run (submit, start, the
  status requests of the wait, collecting the end).

A burst of submits is a burst of runs starting; what each costs is CPU the
server, and everything else on the host, does not get then.

    python benchmarks/run_cost.py [--rounds 5] [--runs 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import psutil
from servers import ServerProcess, wait_until


def short_run(seconds):
    import time

    import torch  # as a training job does

    from cumulus_jupyter.runtime import should_pause

    torch.manual_seed(0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_pause():
            return "paused"
        time.sleep(0.02)
    return "completed"


def cpu(proc: psutil.Process) -> tuple[float, float]:
    """(reaped children's CPU, own CPU) in seconds."""
    t = proc.cpu_times()
    return t.children_user + t.children_system, t.user + t.system


def one_round(server: ServerProcess, parent: psutil.Process, runs: int) -> tuple[float, float]:
    """Per run, in ms: the run's CPU and the server's."""
    client = server.client()
    server_proc = psutil.Process(server.proc.pid)
    before_children, _ = cpu(parent)
    _, before_server = cpu(server_proc)
    for _ in range(runs):
        job = client.run_async(short_run, (0.3,), gpu_memory=0.02)
        wait_until(lambda j=job: j.status() == "completed", timeout=120)
        # Its CPU time is its parent's to count once the parent reaped it.
        pid = job.info()["process"]["pid"]
        wait_until(lambda p=pid: not psutil.pid_exists(p), timeout=60)
    after_children, _ = cpu(parent)
    _, after_server = cpu(server_proc)
    return (
        (after_children - before_children) / runs * 1000,
        (after_server - before_server) / runs * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10, help="runs per round and server")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cumulus-runcost-"))
    warm = ServerProcess(base / "warm", warm_workers=True)
    cold = ServerProcess(base / "cold", warm_workers=False)
    for server in (warm, cold):
        server.base.mkdir()
        server.start()
    try:
        client = warm.client()
        wait_until(lambda: client._json("GET", "gpus")["warm"] is not None, timeout=180)
        template = psutil.Process(client._json("GET", "gpus")["warm"]["pid"])
        # One run each first: what is imported once per server is not a run's cost.
        for server in (warm, cold):
            server.client().run(short_run, (0.0,), gpu_memory=0.02)
        rows = []
        for _ in range(args.rounds):
            forked = one_round(warm, template, args.runs)
            started_cold = one_round(cold, psutil.Process(cold.proc.pid), args.runs)
            rows.append((forked, started_cold))
    finally:
        for server in (warm, cold):
            server.stop()
    print(f"CPU per short run, {args.rounds} paired rounds of {args.runs} runs (median)")
    forked_run = statistics.median(r[0][0] for r in rows)
    cold_run = statistics.median(r[1][0] for r in rows)
    ratio = statistics.median(r[0][0] / r[1][0] for r in rows)
    print(
        f"  run's process: forked {forked_run:.0f} ms, cold {cold_run:.0f} ms;"
        f" median of paired ratios {ratio:.2f}"
    )
    forked_server = statistics.median(r[0][1] for r in rows)
    cold_server = statistics.median(r[1][1] for r in rows)
    print(f"  server per run: with warm workers {forked_server:.0f} ms, cold {cold_server:.0f} ms")


if __name__ == "__main__":
    main()

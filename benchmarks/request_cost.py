"""What one status request costs the server, by how the client connects.

    python benchmarks/request_cost.py [--rounds 5] [--requests 3000]

Against a real server (a ``jupyter server`` subprocess), 8 concurrent
clients send ``GET jobs/{id}`` for one running job, in three ways, in turn
in each round (the order reversed every other round):

- a new connection for every request and no cookie (the SDK before it kept
  either);
- one connection kept alive per client, no cookie;
- kept alive, and the server's login cookie sent back (the SDK now, and a
  browser).

Measured: the server process's CPU time (user + system) per request. The
ratios are per round, against the first way, and their median is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loadclients import StreamClient
from servers import ServerProcess, wait_until

WAYS = {
    "new connection, no cookie": (False, False),
    "kept alive, no cookie": (True, False),
    "kept alive, cookie": (True, True),
}


def held(seconds: float) -> None:
    """The job whose record is asked for: it runs until cancelled."""
    import time

    time.sleep(seconds)


def server_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def send(url: str, base: str, token: str, n: int, keep: bool, cookie: bool) -> None:
    http = StreamClient(base, keep)
    headers = {"Authorization": f"token {token}"}

    async def client(count: int) -> None:
        for _ in range(count):
            code, _ = await http.request("GET", url, b"", headers)
            assert code == 200, code
            if not cookie:
                http.cookies.clear()

    await asyncio.gather(*(client(n // 8) for _ in range(8)))
    http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="cumulus-rc-"))).start()
    try:
        client = server.client()
        job = client.run_async(held, (3600,), gpu_memory=0.02)
        wait_until(lambda: job.status() == "running", timeout=120)
        url = f"{server.url}cumulus/api/jobs/{job.id}"
        costs: dict[str, list[float]] = {way: [] for way in WAYS}
        for round_no in range(args.rounds):
            order = list(WAYS) if round_no % 2 == 0 else list(reversed(WAYS))
            for way in order:
                before = server_cpu(server.proc.pid)
                asyncio.run(send(url, server.url, server.token, args.requests, *WAYS[way]))
                spent = server_cpu(server.proc.pid) - before
                costs[way].append(1000 * spent / args.requests)
        job.cancel()
    finally:
        server.stop()
    first = costs[next(iter(WAYS))]
    print(
        f"server CPU per GET jobs/{{id}} (ms), {args.rounds} rounds of {args.requests} requests,"
        " 8 clients"
    )
    for way, values in costs.items():
        ratio = statistics.median(b / a for a, b in zip(first, values, strict=True))
        print(
            f"  {way:26s} {', '.join(f'{v:.2f}' for v in values)}; median"
            f" {statistics.median(values):.2f}; median of paired ratios to the first {ratio:.2f}"
        )


if __name__ == "__main__":
    main()

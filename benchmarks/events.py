"""How soon a follower of the event log hears of a change, and what a dead webhook costs.

Against a real server on this host (a ``jupyter server`` subprocess):

- *event -> long-poll answer*: a client holds ``GET events?since=N&wait=30``;
  a job is submitted; the time from the server adding the event (its
  ``time``) to the client having the answer. Goal: <= 0.1 s.
- *GET jobs/{id} with a hanging webhook*: the same request timed on a server
  whose ``notify_url`` never answers (every job's end queues a POST that
  hangs) and on one without webhooks, side by side in each round; the ratio
  of the medians shows whether delivery touches request handling.

    python benchmarks/events.py [--rounds 11]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import ServerProcess


def add(a, b):
    return a + b


def wake_delays(client, rounds: int) -> list[float]:
    delays = []
    for _ in range(rounds):
        last = client.events()["last"]
        got: list[float] = []
        answer: list[dict] = []

        def follow(last=last, got=got, answer=answer):
            answer.append(client.events(since=last, wait=30))
            got.append(time.time())

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(0.3)  # let the long-poll be waiting (this is what is measured)
        job = client.run_async(add, args=(1, 2))
        follower.join()
        event = answer[0]["events"][0]
        delays.append(got[0] - event["time"])
        job.result(timeout=60)
    return delays


def get_times(client, job_id: str, n: int = 50) -> float:
    """Median seconds of ``n`` GET jobs/{id}."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.get_job(job_id).info()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    args = parser.parse_args()
    # An endpoint that accepts connections and never answers.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    url = f"http://127.0.0.1:{hole.getsockname()[1]}/hook"
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        plain = ServerProcess(Path(a)).start()
        hooked = ServerProcess(Path(b), notify_url=url, notify_states="completed").start()
        try:
            delays = wake_delays(plain.client(), args.rounds)
            ratios = []
            pairs = []
            for _ in range(args.rounds):
                results = []
                for srv in (plain, hooked):
                    client = srv.client()
                    job = client.run_async(add, args=(1, 1))  # its end queues a POST to the hole
                    job.result(timeout=60)
                    results.append(get_times(client, job.id))
                pairs.append(results)
                ratios.append(results[1] / results[0])
        finally:
            plain.stop()
            hooked.stop()
            hole.close()
    median = statistics.median(delays)
    print(f"event log, {args.rounds} rounds (median, worst)")
    print(
        f"  event added -> long-poll answered: {median * 1e3:.1f} ms "
        f"(worst {max(delays) * 1e3:.1f} ms); goal <= 100 ms: "
        f"{'met' if median <= 0.1 else 'NOT met'}"
    )
    plain_ms = statistics.median(p[0] for p in pairs) * 1e3
    hooked_ms = statistics.median(p[1] for p in pairs) * 1e3
    print(
        f"  GET jobs/{{id}}: {hooked_ms:.2f} ms with a webhook that never answers, "
        f"{plain_ms:.2f} ms without; median of paired ratios {statistics.median(ratios):.2f}"
    )


if __name__ == "__main__":
    main()

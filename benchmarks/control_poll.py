"""How fast a run that gets no signal sees a pause, and what should_pause() costs it.

A run on another machine (the Ray backend) cannot be signalled by the server:
it learns of a pause by reading ``control.json`` every ``CUMULUS_CONTROL_POLL``
seconds (0.1 on Ray). Each round runs in a fresh interpreter set up as such a
run (job directory, run number, poll interval), so no state carries over:

- *notice*: a training loop calls ``should_pause()`` between steps of about
  10 us; another thread writes ``control.json`` the way the server does
  (``JobDir.write_control``, atomically) at a random moment; the delay from that write
  to the first ``should_pause()`` that returns True. Goal: <= 0.2 s.
- *per call*: ns per ``should_pause()`` call in such a run (polls included),
  beside an empty function call in the same interpreter. Goal: < 1000 ns.

Prints the median (and the worst) of ``--rounds`` rounds.

    python benchmarks/control_poll.py [--rounds 11] [--poll 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROUND = r"""
import json, os, random, sys, threading, time
from cumulus_jupyter.jobdir import JobDir
from cumulus_jupyter.runtime import should_pause

job_dir = os.environ["CUMULUS_JOB_DIR"]

def empty():
    return False

calls = 1_000_000
t = time.perf_counter()
for _ in range(calls):
    should_pause()
per_call = (time.perf_counter() - t) / calls * 1e9
t = time.perf_counter()
for _ in range(calls):
    empty()
per_empty = (time.perf_counter() - t) / calls * 1e9

written = []
def ask():
    time.sleep(random.uniform(0.05, 0.3))
    written.append(time.perf_counter())
    JobDir(job_dir).write_control(pause=True, reason="user")  # as the server writes it

threading.Thread(target=ask).start()
while not should_pause():
    end = time.perf_counter() + 10e-6  # one "step"
    while time.perf_counter() < end:
        pass
seen = time.perf_counter()
print(json.dumps({"notice": seen - written[0], "per_call": per_call, "empty": per_empty}))
"""


def one_round(poll: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as job_dir:
        env = dict(os.environ)
        env.update(
            CUMULUS_JOB_DIR=job_dir,
            CUMULUS_JOB_ID="bench",
            CUMULUS_RUN="1",
            CUMULUS_CONTROL_POLL=str(poll),
        )
        out = subprocess.run(
            [sys.executable, "-c", ROUND], env=env, capture_output=True, text=True, check=True
        ).stdout
        return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--poll", type=float, default=0.1, help="CUMULUS_CONTROL_POLL, seconds")
    args = parser.parse_args()
    rounds = [one_round(args.poll) for _ in range(args.rounds)]
    notice = [r["notice"] for r in rounds]
    per_call = [r["per_call"] for r in rounds]
    empty = [r["empty"] for r in rounds]
    print(f"control.json polled every {args.poll} s, {args.rounds} rounds (median, worst)")
    print(
        f"  pause written -> should_pause() True: {statistics.median(notice) * 1e3:.1f} ms "
        f"(worst {max(notice) * 1e3:.1f} ms); goal <= 200 ms: "
        f"{'met' if statistics.median(notice) <= 0.2 else 'NOT met'}"
    )
    print(
        f"  should_pause() per call: {statistics.median(per_call):.0f} ns "
        f"(worst {max(per_call):.0f} ns), an empty call {statistics.median(empty):.0f} ns; "
        f"goal < 1000 ns: {'met' if statistics.median(per_call) < 1000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()

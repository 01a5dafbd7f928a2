"""Control latency as a user meets it: start, resume, pause, cancel, should_pause, live output.

    python benchmarks/latency.py [--rounds 5] [--cold]

Starts a headless job server (the one the tests use) and measures each row
of the latency goals side by side with its baseline, in paired rounds: each
round measures the thing and then its baseline, so both see the same state
of this (noisy) machine. The verdict of each row is on the median of the
rounds' ratios.

Rows:

- *submit -> first line*: a job that imports torch and prints the time; from
  the client's submit to that time, over a cold ``python -c "import torch"``
  that prints the time, from its Popen.
- *resume -> first line*: the same job, paused and resumed, from the resume
  request to the new run's printed time, over the same cold import.
- *pause -> paused*: a job that steps every 10 ms, checks ``should_pause()``
  and saves 64 MB with a ``Checkpointer`` when told; from the pause request to
  the record saying ``paused`` (checkpoint durable, process gone, share free),
  over one step plus a plain ``torch.save`` + fsync of the same state here.
- *cancel -> cancelled*: from the cancel request to the record saying
  ``cancelled`` with the job's process gone, beside the teardown of a cold
  process that imported torch (SIGTERM to exit); goal: at most 0.15 s more.
- *should_pause() per call*, inside a job, beside an empty call.
- *printed line -> seen*: a job prints a timestamped line every 0.25 s; the
  delay until ``%%cumulus --wait``'s way of following (``GET logs?wait=``)
  and a ``JobWidget`` (its shared poller) show it.

``GET jobs/{id}`` under load and the async save's blocked time have their
own benchmarks (``control_plane.py``, ``checkpoint.py`` with the 500 MB
model, its state on the GPU where there is one); this one runs them last,
after its own server stopped, with as many rounds as its own rows (each
judged on the median of its rounds), and prints their verdicts with the rest
(``--skip-others``: not).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
STATE_MB = 64


# -- job functions (shipped by value) --------------------------------------------------


def first_line_then_hold():
    """Import torch, print when that was done, then wait (pausable) to be paused."""
    import time

    import torch  # noqa: F401 - the import is what is measured

    from runtime import should_pause

    print(f"first {time.time():.6f}", flush=True)
    while not should_pause():
        time.sleep(0.005)
    return {"status": "paused"}


def step_and_save(mb=STATE_MB):
    """Steps of 10 ms; on a pause, save the 64 MB state and return."""
    import time

    import torch

    from runtime import Checkpointer, should_pause

    model = torch.nn.Linear(1024, mb * 256, bias=False)  # mb MiB of float32
    ckpt = Checkpointer()
    print("ready", flush=True)
    step = 0
    while True:
        time.sleep(0.01)
        step += 1
        if should_pause():
            ckpt.save(model, None, 0, step)
            return {"status": "paused", "step": step}


def time_should_pause(calls=1_000_000):
    """ns per should_pause() call in a job, and per empty call, side by side."""
    import time

    from runtime import should_pause

    def empty():
        return False

    out = {}
    for name, fn in (("should_pause", should_pause), ("empty", empty)):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out[name] = (time.perf_counter() - t) / calls * 1e9
    return out


def print_lines(count=12, every=0.25):
    import time

    for i in range(count):
        print(f"line {i} {time.time():.6f}", flush=True)
        time.sleep(every)
    return count


# -- measuring -------------------------------------------------------------------------


def cold_import_torch() -> float:
    """Seconds from Popen to a cold interpreter's printed time after ``import torch``."""
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", "import time, torch; print(time.time())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[-1]) - t0


def cold_teardown() -> float:
    """Seconds from SIGTERM to exit of a process that imported torch (its teardown)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import torch, signal; print('up', flush=True); signal.pause()"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    return time.perf_counter() - t0


def plain_step_and_save(mb: int = STATE_MB) -> float:
    """One 10 ms step and a plain torch.save + fsync of the same state, here."""
    import torch

    model = torch.nn.Linear(1024, mb * 256, bias=False)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "plain.pt")
        t0 = time.perf_counter()
        time.sleep(0.01)
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "step": 1}, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0


def first_lines(client, job_id: str) -> list[float]:
    text = client.get_job(job_id).logs()
    return [float(line.split()[1]) for line in text.splitlines() if line.startswith("first ")]


def warm_template(server) -> dict | None:
    """The server's warm template (``GET gpus``'s ``warm``), or None while none is ready."""
    import json
    import urllib.request

    request = urllib.request.Request(
        server.url + "cumulus/api/gpus", headers={"Authorization": f"token {server.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["warm"]


def process_gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def run(rounds: int, warm: bool) -> None:
    sys.path.insert(0, str(TESTS))  # the server launcher the tests use
    from conftest import _kill_leftover_jobs
    from servers import ServerProcess, wait_until

    config = {"warm_workers": True} if warm else {}
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="cumulus-latency-")), **config).start()
    rows: dict[str, list[tuple[float, float]]] = {}

    def add(row: str, value: float, baseline: float) -> None:
        rows.setdefault(row, []).append((value, baseline))

    seen_rows: dict[str, list[tuple[float, float]]] = {}
    per_call: list[dict[str, float]] = []
    try:
        client = server.client()
        if warm:  # the template starts with the server: measure once it is ready
            wait_until(lambda: warm_template(server), timeout=120, what="the warm template")
        # Not measured: the first job.
        client.run(print_lines, args=(1, 0.0), gpu_memory=0.1)
        for _ in range(rounds):
            # submit -> first line; resume -> first line
            t0 = time.time()
            job = client.run_async(first_line_then_hold, gpu_memory=0.1)
            printed = wait_until(lambda j=job: first_lines(client, j.id), interval=0.01)[0]
            add("submit -> first line / cold import torch", printed - t0, cold_import_torch())
            job.pause()
            job.wait(timeout=60)
            t0 = time.time()
            job.resume()
            printed = wait_until(lambda j=job: first_lines(client, j.id)[1:], interval=0.01)[0]
            add("resume -> first line / cold import torch", printed - t0, cold_import_torch())
            job.cancel()

            # pause -> paused
            job = client.run_async(step_and_save, gpu_memory=0.1)
            wait_until(lambda j=job: "ready" in j.logs(), interval=0.01)
            t0 = time.perf_counter()
            job.pause()
            job.wait(timeout=60)
            elapsed = time.perf_counter() - t0
            assert job.status() == "paused", job.info()
            add("pause -> paused / (one step + torch.save+fsync)", elapsed, plain_step_and_save())

            # cancel -> cancelled, process gone
            job = client.run_async(first_line_then_hold, gpu_memory=0.1)
            wait_until(lambda j=job: first_lines(client, j.id), interval=0.01)
            pid = job.info()["process"]["pid"]
            t0 = time.perf_counter()
            job.cancel()
            wait_until(
                lambda j=job, p=pid: j.status() == "cancelled" and process_gone(p), interval=0.002
            )
            add(
                "cancel -> cancelled (s) | cold teardown (s)",
                time.perf_counter() - t0,
                cold_teardown(),
            )

            # should_pause per call, in a job
            per_call.append(client.run(time_should_pause, gpu_memory=0.1))

            # printed line -> seen
            seen_rows_round = follow_delays(client)
            for name, delay in seen_rows_round.items():
                seen_rows.setdefault(name, []).append((delay, 0.0))
    finally:
        server.stop()
        _kill_leftover_jobs(server.job_root)

    print(
        f"latency, {rounds} paired rounds (median of each round's value and ratio);"
        f" warm workers {'on' if warm else 'off'}"
    )
    goals = {
        "submit -> first line / cold import torch": 0.05,
        "resume -> first line / cold import torch": 0.05,
        "pause -> paused / (one step + torch.save+fsync)": 1.5,
    }
    for name, pairs in rows.items():
        values = [v for v, _ in pairs]
        bases = [b for _, b in pairs]
        if name.startswith("cancel"):
            extra = statistics.median(v - b for v, b in pairs)
            met = extra <= 0.15
            print(
                f"  {name}: {statistics.median(values):.3f} | {statistics.median(bases):.3f};"
                f" cancel minus teardown {extra:.3f} s, goal <= 0.15 s: "
                f"{'met' if met else 'NOT met'}"
            )
            continue
        ratio = statistics.median(v / b for v, b in pairs)
        goal = goals[name]
        print(
            f"  {name}: {statistics.median(values):.3f} s / {statistics.median(bases):.3f} s"
            f" = {ratio:.2f}, goal <= {goal}: {'met' if ratio <= goal else 'NOT met'}"
        )
    sp = statistics.median(r["should_pause"] for r in per_call)
    empty = statistics.median(r["empty"] for r in per_call)
    print(
        f"  should_pause() per call in a job: {sp:.0f} ns (an empty call: {empty:.0f} ns),"
        f" goal <= 1000 ns: {'met' if sp <= 1000 else 'NOT met'}"
    )
    for name, pairs in seen_rows.items():
        delay = statistics.median(v for v, _ in pairs)
        print(
            f"  printed line -> seen by {name}: median {delay * 1000:.0f} ms,"
            f" goal <= 100 ms: {'met' if delay <= 0.1 else 'NOT met'}"
        )


def other_rows(rounds: int) -> None:
    """The two goals with benchmarks of their own: run them, print their verdicts."""
    here = Path(__file__).resolve().parent
    n = str(rounds)
    for script, args, verdict in [
        ("control_plane.py", ["--rounds", n], "median of the rounds' p99"),
        # On a GPU host the state is on the GPU, as a training job's is there.
        ("checkpoint.py", ["--mb", "500", "--repeat", n, "--device", "auto"], "async blocked /"),
    ]:
        done = subprocess.run(
            [sys.executable, str(here / script), *args], capture_output=True, text=True
        )
        lines = [line.strip() for line in done.stdout.splitlines()]
        found = [line for line in lines if verdict in line]
        if done.returncode or not found:
            print(f"  {script} failed (exit status {done.returncode}):\n{done.stderr[-2000:]}")
            continue
        device = [line.removeprefix("device: ") for line in lines if line.startswith("device: ")]
        on = f" [{device[0]}]" if device else ""
        print(f"  {script} {' '.join(args)}{on}: {found[0]}")


def follow_delays(client) -> dict[str, float]:
    """Median delay from a line's printing to its arrival, for two followers of one job."""
    import threading

    from cumulus_jupyter import JobWidget

    job = client.run_async(print_lines, gpu_memory=0.1)
    delays: dict[str, list[float]] = {"--wait (GET logs?wait=1)": [], "JobWidget": []}

    def follow_logs() -> None:
        offset, buffer = 0, ""
        while True:
            part = client.get_logs(job.id, offset, wait=1.0)
            now = time.time()
            buffer += part["data"]
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.startswith("line "):
                    delays["--wait (GET logs?wait=1)"].append(now - float(line.split()[2]))
            offset = part["next_offset"]
            if not part["running"] and offset >= part["size"]:
                return

    follower = threading.Thread(target=follow_logs)
    follower.start()
    widget = JobWidget(job)
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 12 and time.monotonic() < deadline:
        for line in widget.log_text.splitlines():
            if line.startswith("line ") and line not in seen:
                seen.add(line)
                delays["JobWidget"].append(time.time() - float(line.split()[2]))
        time.sleep(0.005)
    widget.close()
    follower.join()
    return {name: statistics.median(values) for name, values in delays.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description="control latency benchmark")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="without warm workers")
    parser.add_argument(
        "--skip-others", action="store_true", help="without control_plane.py and checkpoint.py"
    )
    args = parser.parse_args()
    run(args.rounds, warm=not args.cold)
    if not args.skip_others:
        other_rows(args.rounds)


if __name__ == "__main__":
    main()

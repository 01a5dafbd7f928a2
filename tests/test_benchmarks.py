"""Every benchmark runs, at its smallest, and prints what its goals are judged on.

The benchmarks are how the speed goals are shown (docs/latency.md,
docs/checkpoints.md); none of them runs in the other tests, so a change to
the product or to a benchmark could leave one that no longer starts, or no
longer prints its verdict, unnoticed until someone needs its figures. These
run each one with the fewest rounds and the smallest sizes it takes and
check the lines it prints: that each measured row and its verdict is there.
Nothing here judges a timing: a goal met or not met both pass.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
VERDICT = r"(met|NOT met)$"


def run_benchmark(*argv: str, timeout: float = 240) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def assert_lines(out: str, patterns: list[str]) -> None:
    """Each pattern matches a line of ``out`` (stripped), in the order given."""
    lines = [line.strip() for line in out.splitlines()]
    at = 0
    for pattern in patterns:
        for i in range(at, len(lines)):
            if re.search(pattern, lines[i]):
                at = i + 1
                break
        else:
            raise AssertionError(f"no line matching {pattern!r} (in order) in:\n{out}")


def test_latency_rows() -> None:
    out = run_benchmark("latency.py", "--rounds", "1", "--skip-others")
    assert_lines(
        out,
        [
            r"^latency, 1 paired rounds",
            r"^submit -> first line / cold import torch: .* goal <= 0\.05: " + VERDICT,
            r"^resume -> first line / cold import torch: .* goal <= 0\.05: " + VERDICT,
            r"^pause -> paused / \(one step \+ torch\.save\+fsync\): .* goal <= 1\.5: " + VERDICT,
            r"^cancel -> cancelled .*cancel minus teardown .* goal <= 0\.15 s: " + VERDICT,
            r"^should_pause\(\) per call in a job: \d+ ns .* goal <= 1000 ns: " + VERDICT,
            r"^printed line -> seen by --wait .* goal <= 100 ms: " + VERDICT,
            r"^printed line -> seen by JobWidget: .* goal <= 100 ms: " + VERDICT,
        ],
    )


def test_control_plane() -> None:
    out = run_benchmark("control_plane.py", "--rounds", "1", "--clients", "5")
    assert_lines(
        out,
        [
            r"^round 1, idle server: load window",
            r"^probe +GET jobs/\{id\}: n=\d+, p50 [\d.]+ ms, p99 [\d.]+ ms",
            r"^server's main thread in the window: on a CPU",
            r"^round 1, 2 jobs training: load window",
            r"^probe +GET jobs/\{id\}: n=\d+, .* codes \{200: \d+\}$",
            r"^median of the rounds' p99 with 2 jobs training: [\d.]+ ms, goal <= 100 ms: "
            + VERDICT,
        ],
    )


def test_checkpoint_single_process() -> None:
    out = run_benchmark("checkpoint.py", "--mb", "4", "--repeat", "1", "--device", "auto")
    device = "cuda" if "device: cuda" in out else "cpu"
    assert_lines(
        out,
        [
            rf"^device: {device} \(",
            r"^cumulus async save: training blocked +[\d.]+ s",
            r"^goals judged on the median of the per-round paired ratios",
            r"^async blocked / plain torch\.save\+fsync +[\d.]+ +1 +<= 0\.05 +(yes|NO)$",
            r"^persist bandwidth / raw write bandwidth +[\d.]+ +1 +>= 0\.80 +(yes|NO)$",
            r"^steps/s inside persist window / idle +[\d.na]+ +[01] +>= 0\.85 +(yes|NO)$",
            r"^verified read / torch\.load\(mmap=True\) +[\d.]+ +1 +<= 1\.00 +(yes|NO)$",
        ],
    )


def test_checkpoint_cuda_without_a_gpu_is_refused() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: --device cuda is accepted here")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "checkpoint.py"), "--device", "cuda", "--mb", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--device cuda: torch" in done.stderr and "sees no CUDA device" in done.stderr


def test_checkpoint_ranks() -> None:
    out = run_benchmark("checkpoint.py", "--nprocs", "2", "--mb", "4", "--repeat", "1")
    assert_lines(
        out,
        [
            r"^checkpoint: [\d.]+ GB as one file, [\d.]+ GB sharded",
            r"^2 ranks: async save, training blocked",
            r"^sharded async blocked / plain dcp\.save +[\d.]+",
        ],
    )


#: (command line, the lines its output must have) of the benchmarks that need no more.
SMALLER = [
    (
        ["control_poll.py", "--rounds", "1"],
        [
            r"^pause written -> should_pause\(\) True: .* goal <= 200 ms: " + VERDICT,
            r"^should_pause\(\) per call: .* goal < 1000 ns: " + VERDICT,
        ],
    ),
    (
        ["events.py", "--rounds", "1"],
        [
            r"^event added -> long-poll answered: .* goal <= 100 ms: " + VERDICT,
            r"^GET jobs/\{id\}: [\d.]+ ms with a webhook that never answers, [\d.]+ ms without",
        ],
    ),
    (
        ["ranks.py", "--calls", "200"],
        [
            r"^job of 1 process: [\d.]+ us per call",
            r"^rank 0 of 2: [\d.]+ us per call, step [\d.]+ ms",
            r"^rank 1 of 2: [\d.]+ us per call, step [\d.]+ ms",
        ],
    ),
    (
        ["request_cost.py", "--rounds", "1", "--requests", "100"],
        [
            r"^new connection, no cookie +[\d.]+; median",
            r"^kept alive, no cookie +[\d.]+; median",
            r"^kept alive, cookie +[\d.]+; median .* to the first [\d.]+$",
        ],
    ),
    (
        ["widget_load.py", "--rounds", "1", "--widgets", "2", "--window", "1"],
        [
            r"^2 followed jobs, a line every 0\.05 s each; 1 rounds of 1 s per way$",
            r"^refresh every 1 s +server CPU +[\d.]+% of a core .* line seen after +\d+ ms",
            r"^a long-poll per widget +server CPU +[\d.]+% of a core",
            r"^JobWidgets +server CPU +[\d.]+% of a core .* JobWidgets / this 1\.00$",
            r"^JobWidgets: line seen after \d+ ms, goal <= 100 ms: (met|NOT met); server CPU"
            r" / refresh every 1 s [\d.]+, goal <= 1: " + VERDICT,
        ],
    ),
    (
        ["run_cost.py", "--rounds", "1", "--runs", "1"],
        [
            r"^run's process: forked \d+ ms, cold \d+ ms; median of paired ratios [\d.]+$",
            r"^server per run: with warm workers \d+ ms, cold \d+ ms$",
        ],
    ),
]


@pytest.mark.parametrize(("argv", "patterns"), SMALLER, ids=[argv[0] for argv, _ in SMALLER])
def test_smaller_benchmarks(argv: list[str], patterns: list[str]) -> None:
    assert_lines(run_benchmark(*argv), patterns)

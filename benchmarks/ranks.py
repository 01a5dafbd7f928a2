"""should_pause() in a job of several ranks: its cost per call beside a training step.

    python benchmarks/ranks.py [--nprocs 2] [--calls 20000]

Runs one job of ``--nprocs`` gloo ranks through a headless server (the one
the tests use). In every rank it times ``--calls`` calls of ``should_pause()``
(each starts an all-reduce of the rank's answer and reads the previous one's),
then the step of a small DistributedDataParallel model (4 linear layers of
1024, batch 32, SGD; one torch thread per rank), and, for scale, the same
number of calls of ``should_pause()`` in a job of one process. Printed per
rank: microseconds per call, the step time, and the calls' share of a step
at one call per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def measure(calls: int) -> dict[str, float]:
    """In each rank: should_pause() per call (s) and one DDP step (s)."""
    import time

    import torch
    import torch.distributed as dist
    from torch import nn

    from cumulus_jupyter.runtime import rank, should_pause, world_size

    torch.set_num_threads(1)
    for _ in range(100):
        should_pause()
    t = time.perf_counter()
    for _ in range(calls):
        should_pause()
    per_call = (time.perf_counter() - t) / calls
    if world_size() == 1:
        return {"rank": 0, "per_call": per_call, "step": float("nan")}
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 1024)

    def step() -> None:
        optimizer.zero_grad()
        model(x).sum().backward()
        optimizer.step()

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(20):
        step()
    result = {"rank": rank(), "per_call": per_call, "step": (time.perf_counter() - t) / 20}
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, result)
    return everyone  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description="should_pause() across ranks")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    from conftest import serving
    from servers import ServerProcess

    with serving(ServerProcess(Path(tempfile.mkdtemp(prefix="cumulus-ranks-")))) as server:
        client = server.client()
        single = client.run(measure, args=[args.calls], gpu_memory=0.1)
        ranks = client.run(measure, args=[args.calls], gpu_memory=0.1, nprocs=args.nprocs)
    print(f"should_pause(), {args.calls} calls per process; DDP step: 4 x Linear(1024), batch 32")
    print(f"  job of 1 process: {single['per_call'] * 1e6:.2f} us per call")
    for r in ranks:
        share = r["per_call"] / r["step"]
        print(
            f"  rank {r['rank']} of {args.nprocs}: {r['per_call'] * 1e6:.1f} us per call,"
            f" step {r['step'] * 1e3:.1f} ms: one call per step is {share:.2%} of it"
        )


if __name__ == "__main__":
    main()

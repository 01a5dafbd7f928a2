"""Checkpoint speed, measured side by side in one run against plain PyTorch.

    python benchmarks/checkpoint.py [--mb 500] [--repeat 3] [--dir DIR]

A model of about ``--mb`` MB of float32 parameters is trained with Adam, so
the checkpoint holds about three times that (weights and both moment
estimates). Every measurement runs ``--repeat`` times in this process, in
interleaved rounds, on the same disk and the same page cache.

On a shared virtual machine the same write takes its usual time or several
times longer, depending on what the host does at that moment (measured: the
identical 1.6 GB write + fsync took 0.65 s or 2-4 s, from one round to the
next, whichever code wrote it). So each ratio is printed twice: from the best
run of each side (the cost of the code itself, undisturbed; what the goals
are checked against) and as the median of per-round ratios (what a user
would see on this machine). Goals (the project's checkpoint issue):

- async save, time training is blocked / plain torch.save + fsync     <= 0.10
- persist bandwidth / raw write + fsync of the same bytes             >= 0.80
- training steps/s while a save persists / steps/s without            >= 0.85
- verified read of a checkpoint / torch.load of it                    <= 1.00
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def build(mb: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    width = 2048
    layers = max(1, round(mb * 2**20 / 4 / (width * width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(4, width)
    train_step(model, optimizer, x)  # creates the Adam state
    return model, optimizer, x


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def steps_per_second(train: Callable[[], None], until: Callable[[], bool], least: int = 3) -> float:
    n, t = 0, time.perf_counter()
    while n < least or not until():
        train()
        n += 1
    return n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description="checkpoint benchmark")
    parser.add_argument("--mb", type=int, default=500, help="model size in MB (default 500)")
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    # Leave a core for the writer, as a GPU job leaves the CPU mostly idle.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    root = Path(tempfile.mkdtemp(prefix="cumulus-bench-", dir=args.dir))
    os.environ["CUMULUS_JOB_DIR"] = str(root / "job")
    from cumulus_jupyter.runtime import Checkpointer
    from cumulus_jupyter.runtime.persist import entry_hash, read_checkpoint

    model, optimizer, x = build(args.mb)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters ({params * 4 / 2**20:.0f} MB) + Adam state")

    def train() -> None:
        train_step(model, optimizer, x)

    # Every writer writes a new file, as a series of checkpoints does (on some
    # filesystems fresh blocks cost more than rewriting a file). Deleting the
    # previous file is not writing: it happens between measurements, for all.
    series = iter(range(10**6))
    previous: dict[str, Path] = {}

    def next_file(kind: str) -> Path:
        path = root / f"{kind}-{next(series)}.bin"
        previous[kind] = path
        return path

    def delete_old() -> None:
        for kind, path in previous.items():
            for old in root.glob(f"{kind}-*.bin"):
                if old != path:
                    old.unlink()
        entries = ckpt.index.entries()
        for entry in entries[:-1]:
            ckpt.index.remove(entry["name"])

    def plain_save() -> None:
        path = next_file("plain")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    plain_save()
    size = previous["plain"].stat().st_size
    payload = previous["plain"].read_bytes()  # the very same bytes, for the raw write

    def raw_write() -> None:
        with open(next_file("raw"), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    ckpt = Checkpointer()
    numbers = iter(range(10**6))

    def async_save_idle() -> tuple[float, float]:
        t = time.perf_counter()
        ckpt.save(model, optimizer, 0, next(numbers), blocking=False)
        blocked = time.perf_counter() - t
        ckpt.wait()
        return blocked, time.perf_counter() - t - blocked

    def rate_while_persisting() -> tuple[float, float]:
        t = time.perf_counter()
        ckpt.save(model, optimizer, 0, next(numbers), blocking=False)
        pending = ckpt._pending
        rate = steps_per_second(train, until=lambda: not pending.is_alive())
        ckpt.wait()
        return rate, time.perf_counter() - t

    async_save_idle()  # warm up: staging buffers exist from now on, as in a long run
    saved = Path(ckpt.path)
    torch.load(saved, weights_only=True)  # both readers start from a warm page cache

    def verified_read() -> None:
        read_checkpoint(saved, entry_hash(ckpt.index.get(saved.name)))

    def plain_restore() -> None:
        state = torch.load(saved, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    rows: dict[str, list[float]] = {}

    def record(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for i in range(args.repeat):
        # Each ratio's two sides run back to back, in alternating order, so
        # the machine's drift cancels out of the ratio.
        # Every write comes right after the same deletion of the previous
        # files, so each writer starts from the same state of the page cache.
        # Measured on the development VM: when the asynchronous save followed
        # the raw write instead, its median persist time was 2.2x the one it
        # has after a deletion (cause not found; see docs/checkpoints.md).
        first_raw = i % 2 == 0
        if first_raw:
            delete_old()
            t_raw = timed(raw_write)
        delete_old()
        blocked, persisted = async_save_idle()
        if not first_raw:
            delete_old()
            t_raw = timed(raw_write)
        delete_old()
        t_plain = timed(plain_save)
        delete_old()
        t_sync = timed(lambda: ckpt.save(model, optimizer, 0, next(numbers)))
        idle = steps_per_second(train, until=lambda: True, least=4)
        delete_old()
        busy, persisted_busy = rate_while_persisting()
        saved = Path(ckpt.path)
        loads = [
            ("torch.load", lambda path=saved: torch.load(path, weights_only=True)),
            ("verified read", verified_read),
        ]
        for name, fn in loads if first_raw else loads[::-1]:
            record(name, timed(fn))
        record("plain restore", timed(plain_restore))
        record("cumulus load", timed(lambda: Checkpointer().load(model, optimizer)))
        for name, value in [
            ("raw", t_raw),
            ("plain save", t_plain),
            ("sync save", t_sync),
            ("blocked", blocked),
            ("persist idle", persisted),
            ("persist training", persisted_busy),
            ("rate idle", idle),
            ("rate busy", busy),
        ]:
            record(name, value)
        record("r blocked", blocked / t_plain)
        record("r bandwidth", t_raw / persisted)
        record("r blocking bandwidth", t_raw / t_sync)
        record("r rate", busy / idle)
        record("r read", rows["verified read"][-1] / rows["torch.load"][-1])
        record("r restore", rows["cumulus load"][-1] / rows["plain restore"][-1])

    med = {name: statistics.median(values) for name, values in rows.items()}
    # Best run: the shortest time, the highest rate.
    best = {name: (max if name.startswith("rate") else min)(v) for name, v in rows.items()}
    gb = size / 1e9
    print(f"checkpoint: {gb:.2f} GB; {args.repeat} interleaved rounds")
    print(f"  {'':<42} {'best':>7}   {'median':>7}")
    for label, key, bandwidth in [
        ("plain torch.save + fsync", "plain save", True),
        ("raw write + fsync of the same bytes", "raw", True),
        ("cumulus save, blocking", "sync save", True),
        ("cumulus async save: training blocked", "blocked", False),
        ("cumulus async save: persist (idle)", "persist idle", True),
        ("cumulus async save: persist (training)", "persist training", True),
        ("torch.load", "torch.load", True),
        ("cumulus verified read (hash + mmap load)", "verified read", True),
        ("torch.load + load_state_dict", "plain restore", False),
        ("cumulus Checkpointer.load (all of it)", "cumulus load", False),
    ]:
        bw = f"  {gb / best[key]:5.2f} GB/s best" if bandwidth else ""
        print(f"  {label:<42} {best[key]:7.3f} s {med[key]:7.3f} s{bw}")
    print(
        f"  training steps/s: {best['rate idle']:.2f} idle, {best['rate busy']:.2f} while "
        f"persisting (best); {med['rate idle']:.2f}, {med['rate busy']:.2f} (median)"
    )
    for label, key in [("raw write", "raw"), ("async persist (idle)", "persist idle")]:
        spread = ", ".join(f"{t:.2f}" for t in rows[key])
        print(f"  {label}, every round: {spread} s")
    print()
    # (label, best-run numerator, denominator, per-round ratio, goal, limit)
    ratios = [
        (
            "async blocked / plain torch.save+fsync",
            "blocked",
            "plain save",
            "r blocked",
            "<= 0.10",
            0.10,
        ),
        (
            "persist bandwidth / raw write bandwidth",
            "raw",
            "persist idle",
            "r bandwidth",
            ">= 0.80",
            0.80,
        ),
        ("steps/s while persisting / idle", "rate busy", "rate idle", "r rate", ">= 0.85", 0.85),
        ("verified read / torch.load", "verified read", "torch.load", "r read", "<= 1.00", 1.00),
        (
            "blocking save bandwidth / raw write bandwidth",
            "raw",
            "sync save",
            "r blocking bandwidth",
            "-",
            None,
        ),
        (
            "Checkpointer.load / torch.load+load_state_dict",
            "cumulus load",
            "plain restore",
            "r restore",
            "-",
            None,
        ),
    ]
    print(f"  {'ratio':<48} {'best':>6} {'median':>7}  goal     met (best)")
    for label, top, bottom, round_key, goal, limit in ratios:
        value = best[top] / best[bottom]
        met = ""
        if limit is not None:
            met = "yes" if (value >= limit if goal.startswith(">") else value <= limit) else "NO"
        print(f"  {label:<48} {value:6.3f} {med[round_key]:7.3f}  {goal:<8} {met}")
    for p in sorted(root.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    root.rmdir()


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()

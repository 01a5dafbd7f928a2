"""The demo: start a headless job server, train, pause, browse checkpoints, resume.

Run it with ``./dev.sh demo``. It starts ``jupyter cumulus`` on a free port of
127.0.0.1 with a fresh job root, talks to it with the client SDK exactly as a
notebook would, and stops the server at the end.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cumulus_jupyter import CumulusClient
from cumulus_jupyter.kernel.client import ServerUnavailableError


def train(epochs: int = 4, steps: int = 120):
    """A small classifier on synthetic data, resumable at any batch."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from cumulus_jupyter.runtime import Checkpointer, report, should_pause

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    X = torch.randn(steps * 16, 32)
    y = (X[:, :4].argmax(dim=1)).long()
    loader = DataLoader(TensorDataset(X, y), batch_size=16)

    ckpt = Checkpointer()
    start_epoch, start_step = 0, 0
    if ckpt.exists():
        state = ckpt.load(model, optimizer)
        start_epoch, start_step = state["epoch"], state["step"] + 1
        print(f"resumed from {state['name']}: epoch {start_epoch}, step {start_step}")
    for epoch in range(start_epoch, epochs):
        for step, (xb, yb) in enumerate(loader):
            if epoch == start_epoch and step < start_step:
                continue
            loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            time.sleep(0.01)  # stand-in for a bigger model's step time
            report(step=epoch * steps + step, total=epochs * steps, loss=loss)
            if should_pause():
                ckpt.save(model, optimizer, epoch, step)
                return {"status": "paused", "epoch": epoch, "step": step}
            if ckpt.time_to_checkpoint(step, every_steps=50):
                ckpt.save(model, optimizer, epoch, step)
        print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)
    return {"status": "completed", "final_loss": round(loss.item(), 4)}


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    argv = [
        str(Path(sys.executable).parent / "jupyter"),
        "cumulus",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--CumulusApp.job_root={root / 'jobs'}",
    ]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log = open(root / "server.log", "wb")  # noqa: SIM115 - handed to the server process
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}/", token


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)
    return value


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="cumulus-demo-"))
    server, url, token = start_server(root)
    try:
        client = CumulusClient(url, token=token)

        def up() -> bool:
            try:
                client.jobs()
            except ServerUnavailableError:
                return False
            return True

        wait_for(up, 60, "the job server")
        print(f"job server running at {url} (jobs in {root / 'jobs'})")

        job = client.run_async(train, gpu_memory=0.5, duration="10m", name="demo-classifier")
        print(f"submitted {job}")
        wait_for(lambda: len(job.metrics()) >= 60, 120, "training to get going")
        print("pausing ...", job.pause()["state"])
        print("paused run returned:", job.result(timeout=120))
        print(job.summary())

        checkpoints = job.get_checkpoints()
        print(f"Available checkpoints: {len(checkpoints)}")
        for c in checkpoints:
            print(f"  {c['name']:<28} epoch {c['epoch']} step {c['step']:>4} {c['size']:>8} B")

        print("resuming ...", job.resume()["state"])
        result = job.result(timeout=600)
        print("result:", result)
        print("--- job log ---")
        print(job.logs().rstrip())
        print(job.summary())
        if result.get("status") != "completed":
            raise SystemExit("demo: the job did not complete")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

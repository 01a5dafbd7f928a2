"""Make ``docs/screenshot-notebook.png``: the widgets in a real JupyterLab.

Starts ``jupyter lab`` on a free port of 127.0.0.1 with a fresh root and job
root, writes a notebook that trains a small model as a ``%%cumulus`` job and
pauses a second job after a few checkpoints, runs it in headless Chromium
(Playwright), waits until the job's widget shows a live chart and the
checkpoint browser lists its rows, and takes the screenshot. Then it cancels
every job, closes the browser and stops the server.

    .venv/bin/python docs/screenshots.py [OUTPUT.png]

Needs playwright (the Python package) and a Chromium: ``/usr/bin/chromium``,
or the one ``$CHROMIUM`` names. No browser is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
from playwright.sync_api import Page, sync_playwright

# The same free-port and polling helpers the tests use.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from servers import free_port, wait_until

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1400, "height": 1200}
NOTEBOOK = "cumulus-demo.ipynb"
TOTAL_STEPS = 3000  # the shown job must still be running at the screenshot

# -- the notebook --------------------------------------------------------------

CELL_SETUP = """\
%load_ext cumulus_jupyter
import torch
from torch import nn


def make_model():  # a tiny conv net
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )


torch.manual_seed(0)
X = torch.randn(2048, 3, 16, 16)
y = X.mean(dim=(2, 3)).argmax(dim=1)  # the label: which channel is brightest"""

CELL_FINETUNE = """\
# An earlier fine-tune, started with the SDK and paused after a few checkpoints
import time

from cumulus_jupyter import CumulusClient
from cumulus_jupyter.widgets import CheckpointBrowser


def finetune(steps=10_000):
    import torch
    from cumulus_jupyter.runtime import Checkpointer, report, should_pause

    torch.manual_seed(1)
    model, target = torch.nn.Linear(64, 1), torch.randn(64, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ckpt = Checkpointer()
    start = ckpt.load(model, opt)["step"] + 1 if ckpt.exists() else 0
    for step in range(start, steps):
        x = torch.randn(128, 64)
        loss = torch.nn.functional.mse_loss(model(x), x @ target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        report(step=step, total=steps, loss=loss.item())
        if should_pause():
            ckpt.save(model, opt, 0, step)
            return {"status": "paused", "step": step}
        if step % 25 == 24:
            ckpt.save(model, opt, 0, step)
        time.sleep(0.02)
    return {"status": "completed"}


client = CumulusClient()
job2 = client.run_async(finetune, gpu_memory=0.25, name="finetune")
deadline = time.monotonic() + 120
while len(job2.get_checkpoints()) < 5:
    assert time.monotonic() < deadline, "no checkpoints after 2 minutes"
    time.sleep(0.2)
job2.pause()
job2.wait(timeout=120)"""

CELL_TRAIN = f"""\
%%cumulus --gpu-memory 0.5 --name resnet-ish --out job
import time
from cumulus_jupyter.runtime import Checkpointer, report, should_pause

model, ckpt = make_model(), Checkpointer()  # make_model, X and y come from the notebook
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
start = ckpt.load(model, opt)["step"] + 1 if ckpt.exists() else 0
for step in range(start, {TOTAL_STEPS}):
    i = torch.randint(0, len(X), (64,))
    loss = nn.functional.cross_entropy(model(X[i]), y[i])
    opt.zero_grad()
    loss.backward()
    opt.step()
    report(step=step, total={TOTAL_STEPS}, loss=loss.item())
    if step % 100 == 0:
        print(f"step {{step:4d}}  loss {{loss.item():.4f}}", flush=True)
    if should_pause():  # the Pause button: checkpoint and stop
        ckpt.save(model, opt, 0, step)
        break
    if step % 20 == 19:
        ckpt.save(model, opt, 0, step)
    time.sleep(0.02)"""

CELL_BROWSER = "CheckpointBrowser(job2)  # the paused fine-tune: resume from any checkpoint"


def write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(CELL_SETUP),
        nbformat.v4.new_code_cell(CELL_FINETUNE),
        nbformat.v4.new_code_cell(CELL_TRAIN),
        nbformat.v4.new_code_cell(CELL_BROWSER),
    ]
    nbformat.write(nb, path)


# -- the server ----------------------------------------------------------------


def write_lab_settings(settings_dir: Path) -> None:
    """No news or update checks (no network), and no pop-ups over the notebook."""
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
            "fetchNews": "false",
            "checkForUpdates": False,
        },
    }
    for name, value in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


class Lab:
    """A ``jupyter lab`` subprocess with the cumulus extension, on 127.0.0.1."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.root.mkdir()
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = base / "lab.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Lab:
        settings = self.base / "lab-settings"
        write_lab_settings(settings)
        argv = [
            str(BIN / "jupyter"),
            "lab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            f"--CumulusApp.job_root={self.base / 'jobs'}",
            "--CumulusApp.gpus=[]",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
        ]
        if os.geteuid() == 0:
            argv.append("--allow-root")
        env = dict(os.environ)
        env["JUPYTER_RUNTIME_DIR"] = str(self.base / "runtime")
        env["JUPYTER_CONFIG_DIR"] = str(self.base / "config")
        env["JUPYTER_DATA_DIR"] = str(self.base / "data")
        env["IPYTHONDIR"] = str(self.base / "ipython")
        env.pop("CUMULUS_SERVER_URL", None)
        env.pop("CUMULUS_TOKEN", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
            )
        wait_until(self._ready, timeout=90, what=f"jupyter lab on port {self.port}")
        return self

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited:\n{self.log_tail()}")
        try:
            self.api("GET", "cumulus/api/jobs")
            self.api("GET", "lab/api/settings")
        except OSError:
            return False
        return True

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def cancel_jobs(self) -> None:
        """Cancel every job that may still have a process, and wait until none does."""
        live = {"queued", "running", "pausing", "paused", "timed_out", "lost"}

        def left() -> list[dict[str, Any]]:
            jobs = self.api("GET", "cumulus/api/jobs")["jobs"]
            return [j for j in jobs if j["state"] in live]

        for job in left():
            with contextlib.suppress(OSError):  # a job that stopped meanwhile: 409
                self.api("POST", f"cumulus/api/jobs/{job['id']}/cancel", {})
        wait_until(lambda: not left(), timeout=60, what="the jobs to stop")

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# -- the browser ---------------------------------------------------------------


def run_all(page: Page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


KERNEL_IDLE = re.compile(r"^(?!No Kernel).+ \| Idle$")  # the status bar's kernel item


def all_cells_ran(page: Page) -> bool:
    prompts = page.locator(".jp-Notebook .jp-Cell .jp-InputArea-prompt").all_inner_texts()
    return bool(prompts) and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts)


def progress_step(page: Page) -> int:
    text = page.locator(".widget-html-content", has_text=re.compile(r"^step \d+ / \d+$"))
    if text.count() == 0:
        return 0
    return int(text.first.inner_text().split()[1])


def check_no_errors(page: Page) -> None:
    errors = page.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"],'
        " .jp-OutputArea-output.jp-RenderedText[data-mime-type*='error']"
    )
    if errors.count():
        texts = "\n".join(errors.all_inner_texts())
        raise RuntimeError(f"the notebook printed errors:\n{texts}")


def screenshot(lab: Lab, out: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(f"{lab.url}lab/tree/{NOTEBOOK}?reset&token={lab.token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            # The kernel is connected (the toolbar's indicator says idle before that).
            kernel_idle = page.locator(".jp-StatusBar-TextItem", has_text=KERNEL_IDLE)
            kernel_idle.wait_for()
            page.keyboard.press("Control+b")  # hide the file browser: room for the notebook
            run_all(page)
            wait_until(lambda: all_cells_ran(page), timeout=180, what="every cell to run")
            check_no_errors(page)

            rows = page.locator(".cumulus-checkpoints select option")
            wait_until(lambda: rows.count() >= 5, timeout=30, what="the checkpoint browser's rows")
            running = page.locator(".widget-html-content span", has_text=re.compile("^running$"))
            running.first.wait_for()
            page.locator(".jp-OutputArea svg polyline").first.wait_for()
            wait_until(lambda: progress_step(page) >= 300, timeout=120, what="the chart to fill")

            # No cell highlighted in view: make the first one active (command mode).
            page.keyboard.press("Escape")
            for _ in range(3):
                page.keyboard.press("k")
            # The training cell at the top; its widget and the browser below it.
            page.locator(".jp-Notebook .jp-Cell").nth(2).evaluate(
                "el => el.scrollIntoView({block: 'start'})"
            )
            page.mouse.move(0, 0)
            settled = (
                "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
            )
            page.evaluate(settled)  # the scroll is painted
            page.screenshot(path=str(out), full_page=True)
        except BaseException:
            failed = Path(tempfile.gettempdir()) / "cumulus-screenshot-failed.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(failed))
                print(f"the page at the failure: {failed}", file=sys.stderr)
            raise
        finally:
            browser.close()


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "screenshot-notebook.png"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cumulus-shots-") as tmp:
        lab = Lab(Path(tmp))
        write_notebook(lab.root / NOTEBOOK)
        try:
            lab.start()
            screenshot(lab, out)
        except BaseException:
            print(f"--- jupyter lab log ---\n{lab.log_tail()}", file=sys.stderr)
            raise
        finally:
            try:
                if lab.proc is not None:
                    lab.cancel_jobs()
            finally:
                lab.stop()
    size = out.stat().st_size // 1024
    print(f"wrote {out} ({size} KB) in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()

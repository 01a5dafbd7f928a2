"""Make the README's screenshots in a real JupyterLab, in headless Chromium.

``docs/screenshot-notebook.png``: a notebook that trains a small model as a
``%%cumulus`` job, with its live widget, and a paused job's checkpoint
browser. ``docs/screenshot-panel.png``: the "Cumulus jobs" side panel with a
running, a paused (opened: checkpoints, log, metrics), a finished and a
failed job, on a host configured with two GPU slots.

Each starts ``jupyter lab`` on a free port of 127.0.0.1 with a fresh root and
job root, waits for what it shows, takes the screenshot, then cancels every
job and stops the server.

    .venv/bin/python docs/screenshots.py [notebook|panel ...]

Needs playwright (the Python package) and a Chromium: ``/usr/bin/chromium``,
or the one ``$CHROMIUM`` names. No browser is downloaded.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat

# The same server, browser and polling helpers the tests use.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from browser import KERNEL_IDLE, Lab, chromium, new_page, running_lab, settled
from servers import wait_until

from cumulus_jupyter import CumulusClient

HERE = Path(__file__).resolve().parent
VIEWPORT = {"width": 1400, "height": 1200}
NOTEBOOK = "cumulus-demo.ipynb"
TOTAL_STEPS = 3000  # the shown job must still be running at the screenshot

# -- the jobs and the notebook -----------------------------------------------------


def train(steps, fail_at=None):
    """A small regression, checkpointed every 25 steps, that reports loss and accuracy."""
    import time

    import torch

    from cumulus_jupyter.runtime import Checkpointer, report, should_pause

    torch.manual_seed(0)
    model, target = torch.nn.Linear(32, 1), torch.randn(32, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ckpt = Checkpointer()
    start = ckpt.load(model, opt)["step"] + 1 if ckpt.exists() else 0
    for step in range(start, steps):
        x = torch.randn(64, 32)
        loss = torch.nn.functional.mse_loss(model(x), x @ target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        acc = float(((model(x) - x @ target).abs() < 0.5).float().mean())
        report(step=step, total=steps, loss=loss.item(), acc=acc)
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  acc {acc:.3f}", flush=True)
        if fail_at is not None and step == fail_at:
            raise FloatingPointError(f"loss is nan at step {step} (lr too high?)")
        if should_pause():
            ckpt.save(model, opt, 0, step)
            return {"status": "paused", "step": step}
        if step % 25 == 24:
            ckpt.save(model, opt, 0, step)
        time.sleep(0.01)
    return {"status": "completed", "loss": loss.item()}


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

CELL_FINETUNE_TEMPLATE = """\
# An earlier fine-tune, started with the SDK and paused after a few checkpoints
import time

from cumulus_jupyter import CumulusClient
from cumulus_jupyter import CheckpointBrowser


{TRAIN}

client = CumulusClient()
job2 = client.run_async(train, (10_000,), gpu_memory=0.25, name="finetune")
deadline = time.monotonic() + 120
while len(job2.get_checkpoints()) < 5:
    assert time.monotonic() < deadline, "no checkpoints after 2 minutes"
    time.sleep(0.2)
job2.pause()
job2.wait(timeout=120)"""

# The same function the panel screenshot runs, as the notebook shows it.
CELL_FINETUNE = CELL_FINETUNE_TEMPLATE.replace("{TRAIN}", inspect.getsource(train))

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


# -- the browser ---------------------------------------------------------------


def run_all(page: Any) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()


def all_cells_ran(page: Any) -> bool:
    prompts = page.locator(".jp-Notebook .jp-Cell .jp-InputArea-prompt").all_inner_texts()
    return bool(prompts) and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts)


def progress_step(page: Any) -> int:
    text = page.locator(".widget-html-content", has_text=re.compile(r"^step \d+ / \d+$"))
    if text.count() == 0:
        return 0
    return int(text.first.inner_text().split()[1])


def check_no_errors(page: Any) -> None:
    errors = page.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"],'
        " .jp-OutputArea-output.jp-RenderedText[data-mime-type*='error']"
    )
    if errors.count():
        texts = "\n".join(errors.all_inner_texts())
        raise RuntimeError(f"the notebook printed errors:\n{texts}")


@contextlib.contextmanager
def shot_page(browser: Any) -> Any:
    """A page for a screenshot; on a failure, a picture of where it stood."""
    with new_page(browser, VIEWPORT, timeout_ms=60_000) as page:
        try:
            yield page
        except BaseException:
            failed = Path(tempfile.gettempdir()) / "cumulus-screenshot-failed.png"
            with contextlib.suppress(Exception):
                page.screenshot(path=str(failed))
                print(f"the page at the failure: {failed}", file=sys.stderr)
            raise


def notebook_screenshot(lab: Lab, out: Path) -> None:
    write_notebook(lab.root / NOTEBOOK)
    with chromium() as browser, shot_page(browser) as page:
        page.goto(f"{lab.url}lab/tree/{NOTEBOOK}?reset&token={lab.token}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for()
        # The kernel is connected (the toolbar's indicator says idle before that).
        page.locator(".jp-StatusBar-TextItem", has_text=KERNEL_IDLE).wait_for()
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
        settled(page)  # the scroll is painted
        page.screenshot(path=str(out), full_page=True)


# -- the panel -------------------------------------------------------------------


def panel_screenshot(lab: Lab, out: Path) -> None:
    client = CumulusClient(lab.url, token=lab.token)
    done = client.run_async(train, (60,), gpu_memory=0.25, name="baseline")
    done.wait(timeout=120)
    failed = client.run_async(train, (2000, 40), gpu_memory=0.25, name="lr-sweep-3e-1")
    failed.wait(timeout=120)
    paused = client.run_async(train, (5000,), gpu_memory=0.5, duration="2h", name="finetune")
    wait_until(lambda: len(paused.get_checkpoints()) >= 4, timeout=120, what="4 checkpoints")
    paused.pause()
    paused.wait(timeout=120)
    running = client.run_async(train, (20_000,), gpu_memory=0.5, duration="8h", name="resnet-ish")
    wait_until(
        lambda: len(running.get_checkpoints()) >= 2, timeout=120, what="the run to get going"
    )

    with chromium() as browser, shot_page(browser) as page:
        page.goto(f"{lab.url}lab?reset&token={lab.token}")
        page.locator("#jp-main-dock-panel").wait_for()
        page.locator('.jp-SideBar .lm-TabBar-tab[data-id="cumulus-jobs"]').click()
        panel = page.locator("#cumulus-jobs")
        panel.wait_for()
        # A wider side bar: drag the handle between it and the main area.
        handle = page.locator(".jp-LabShell .lm-SplitPanel-handle:visible").first
        box = handle.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 200)
        page.mouse.down()
        page.mouse.move(box["x"] + 190, box["y"] + 200, steps=5)
        page.mouse.up()

        row = panel.locator(f'li[data-job-id="{paused.id}"]')
        row.locator(".jp-CumulusJob-summary").click()
        row.locator("li[data-checkpoint]").first.wait_for()
        row.locator(".jp-CumulusJob-log", has_text="step").wait_for()
        busy = panel.locator(f'li[data-job-id="{running.id}"] .jp-CumulusJob-progress')
        busy.wait_for()
        page.mouse.move(0, 0)
        settled(page)
        panel_box = panel.bounding_box()
        assert panel_box is not None
        clip = {
            "x": 0,
            "y": 0,
            "width": panel_box["x"] + panel_box["width"] + 12,
            "height": VIEWPORT["height"],
        }
        page.screenshot(path=str(out), clip=clip)


# -- a notification ----------------------------------------------------------------


def notification_screenshot(lab: Lab, out: Path) -> None:
    client = CumulusClient(lab.url, token=lab.token)
    with chromium() as browser, shot_page(browser) as page:
        # Open Lab, and wait until it follows the event log (its first read is done).
        with page.expect_request(
            lambda r: re.search(r"/cumulus/api/events\?since=\d+&wait=[1-9]", r.url) is not None
        ):
            page.goto(f"{lab.url}lab?reset&token={lab.token}")
            page.locator("#jp-main-dock-panel").wait_for()
        finetune = client.run_async(train, (5000,), gpu_memory=0.5, name="finetune")
        wait_until(lambda: len(finetune.get_checkpoints()) >= 2, timeout=120, what="checkpoints")
        finetune.pause()
        done = client.run_async(train, (40,), gpu_memory=0.25, name="baseline")
        done.wait(timeout=120)
        toasts = page.locator(".Toastify__toast")
        wait_until(lambda: toasts.count() >= 2, timeout=60, what="two notifications")
        page.mouse.move(0, 0)

        def boxes() -> list[Any]:
            settled(page)
            return [toasts.nth(i).bounding_box() for i in range(toasts.count())]

        # Toasts slide in: wait until they stand still.
        wait_until(lambda: boxes() == boxes(), timeout=30, what="the toasts to settle")
        shown = [b for b in boxes() if b is not None]
        left = min(b["x"] for b in shown) - 24
        top = min(b["y"] for b in shown) - 24
        clip = {
            "x": left,
            "y": top,
            "width": VIEWPORT["width"] - left,
            "height": VIEWPORT["height"] - top,
        }
        page.screenshot(path=str(out), clip=clip)


SHOTS = {
    "notebook": (notebook_screenshot, "screenshot-notebook.png", "[]"),
    "panel": (panel_screenshot, "screenshot-panel.png", "0,1"),
    "notification": (notification_screenshot, "screenshot-notification.png", "[]"),
}


def main() -> None:
    for name in sys.argv[1:] or list(SHOTS):
        make, filename, gpus = SHOTS[name]
        out = HERE / filename
        started = time.monotonic()
        with (
            tempfile.TemporaryDirectory(prefix="cumulus-shots-") as tmp,
            running_lab(Path(tmp), gpus=gpus) as lab,
        ):
            make(lab, out)
        size = out.stat().st_size // 1024
        print(f"wrote {out} ({size} KB) in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()

"""The JupyterLab panel and the notebook widget in a real browser.

A real ``jupyter lab`` with the extension installed the way ``pip install``
installs it, on 127.0.0.1, and Debian's Chromium driven by Playwright. Jobs
are started through the SDK (or a notebook cell) and controlled from the page;
the server's own records say whether each click did what it should.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import jobfuncs
import nbformat
import pytest
from browser import CHROMIUM, KERNEL_IDLE, chromium, new_page, running_lab, settled
from playwright.sync_api import expect
from servers import labextension_list, wait_until

from cumulus_jupyter import CumulusClient

POLL_SECONDS = 2  # the panel's poll interval (labextension/src/model.ts)
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(autouse=True)
def jp_asyncio_loop():
    """A private loop for pytest-jupyter's per-test cleanup.

    Playwright's sync API keeps its own loop running on this thread while the
    browser is open; pytest-jupyter would otherwise pick that one up and
    close it. These tests run no in-process server.
    """
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def jp_server_cleanup():
    """Nothing to clean: these tests start ``jupyter lab`` as a subprocess."""
    yield


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: install Debian's (apt-get install chromium) "
            "or point $CHROMIUM at one; ./dev.sh test installs it"
        )
    with running_lab(tmp_path_factory.mktemp("lab")) as lab:
        yield lab


@pytest.fixture(scope="module")
def browser(lab):
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser, request, tmp_path):
    expect.set_options(timeout=30_000)
    with new_page(browser, VIEWPORT) as page:
        yield page
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            shot = tmp_path / "failure.png"
            page.screenshot(path=str(shot))
            (tmp_path / "failure.html").write_text(page.content())
            print(f"the page at the failure: {shot} (and failure.html)")


@pytest.fixture
def client(lab):
    return CumulusClient(lab.url, token=lab.token)


def open_lab(page, lab, reset=True):
    query = "reset&" if reset else ""
    page.goto(f"{lab.url}lab?{query}token={lab.token}")
    page.locator("#jp-main-dock-panel").wait_for()
    page.locator(".jp-SideBar .lm-TabBar-tab").first.wait_for()


def open_panel(page):
    tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="cumulus-jobs"]')
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()
    panel = page.locator("#cumulus-jobs")
    expect(panel).to_be_visible()
    return panel


def job_row(page, job_id):
    return page.locator(f'li.jp-CumulusJob[data-job-id="{job_id}"]')


def button(row, label):
    return row.locator(".jp-CumulusJob-actions button", has_text=re.compile(f"^{label}$"))


def start_training(client, lab, name):
    release = lab.base / f"release-{name}"  # the job finishes once this exists
    job = client.run_async(jobfuncs.train_until_released, (str(release),), name=name)
    return job, release


def wait_state(lab, job_id, *states, timeout=60):
    wait_until(
        lambda: lab.job(job_id)["state"] in states,
        timeout=timeout,
        what=f"job {job_id} to be {' or '.join(states)}",
    )


def test_labextension_is_installed_and_enabled():
    listing = labextension_list()
    assert re.search(r"cumulus-jupyter v\S+ enabled\s+OK", listing), listing


def test_the_command_palette_opens_the_panel(page, lab):
    open_lab(page, lab)
    expect(page.locator("#cumulus-jobs")).to_be_hidden()
    # Once Lab has restored its layout it focuses the main area's widget (the
    # launcher), which closes a palette opened before then; on a busy machine
    # that comes seconds after the side bar shows.
    page.wait_for_function(
        "() => document.activeElement?.closest('#jp-main-dock-panel')", timeout=60_000
    )
    page.keyboard.press("Control+Shift+c")
    palette = page.locator(".jp-ModalCommandPalette input")
    palette.fill("Cumulus Jobs Panel")
    page.locator(
        ".jp-ModalCommandPalette .lm-CommandPalette-item", has_text="Open the Cumulus"
    ).click()
    expect(page.locator("#cumulus-jobs")).to_be_visible()
    expect(page.locator("#cumulus-jobs h2")).to_have_text("Cumulus jobs")


def test_pause_resume_and_completion_from_the_panel(page, lab, client):
    open_lab(page, lab)
    panel = open_panel(page)
    job, release = start_training(client, lab, "panel-train")

    row = job_row(page, job.id)
    expect(row).to_have_attribute("data-state", "running")
    expect(row.locator(".jp-CumulusJob-name")).to_have_text("panel-train")
    # Progress from report(step=..., total=1000).
    expect(row.locator(".jp-CumulusJob-progress")).to_contain_text(re.compile(r"\d+ / 1000"))
    # The device's share and who holds it.
    expect(panel.locator(".jp-CumulusPanel-gpu")).to_contain_text(f"panel-train ({job.id[:6]})")
    expect(button(row, "Resume")).to_be_disabled()
    # Enough output to overflow the detail's log box (checked below).
    wait_until(lambda: job.logs().count("\n") >= 40, timeout=60, what="40 lines of output")

    button(row, "Pause").click()
    expect(row).to_have_attribute("data-state", "paused", timeout=60_000)
    assert lab.job(job.id)["state"] == "paused"
    expect(button(row, "Pause")).to_be_disabled()
    expect(button(row, "Resume")).to_be_enabled()

    # Its checkpoints, log and metrics in the detail view.
    row.locator(".jp-CumulusJob-summary").click()
    checkpoints = row.locator("li[data-checkpoint]")
    expect(checkpoints.first).to_be_visible()
    saved = job.get_checkpoints()
    assert checkpoints.first.get_attribute("data-checkpoint") == saved[-1]["name"]
    expect(checkpoints.first).to_contain_text("latest")
    log = row.locator(".jp-CumulusJob-log")
    expect(log).to_contain_text(f"step {saved[-1]['step']} loss")
    # Longer than its box, and scrolled to its last line.
    overflows = log.evaluate("el => el.scrollHeight > el.clientHeight")
    at_end = log.evaluate("el => el.scrollHeight - el.scrollTop - el.clientHeight < 8")
    assert overflows and at_end, "the log tail does not show its last line"
    expect(row.locator(".jp-CumulusJob-metrics")).to_contain_text("loss")
    # The checkpoint the paused job resumes from cannot be deleted.
    expect(checkpoints.first.locator("button", has_text="Delete")).to_be_disabled()

    button(row, "Resume").click()
    expect(row).to_have_attribute("data-state", re.compile("queued|running"))
    wait_state(lab, job.id, "running")
    release.touch()
    expect(row).to_have_attribute("data-state", "completed", timeout=60_000)
    result = job.result(timeout=30)
    assert result["status"] == "completed"
    assert result["resumed_at"] == saved[-1]["step"] + 1  # exactly where it paused
    for label in ("Pause", "Resume", "Cancel"):
        expect(button(row, label)).to_be_disabled()


def expect_enabled(locator, enabled):
    if enabled:
        expect(locator).to_be_enabled()
    else:
        expect(locator).to_be_disabled()


def fake_job(job_id, state, actions):
    """A record as the server sends it, for a job only the page is told about."""
    return {
        "id": job_id,
        "name": job_id,
        "owner": "someone",
        "state": state,
        "created": 0,
        "gpu_memory": 0.5,
        "duration": None,
        "device": None,
        "message": "",
        "elapsed": 1.0,
        "run": 1,
        "cancel_requested": None,
        "resume_checkpoint": None,
        "actions": actions,
    }


FAKE_CHECKPOINTS = [
    {"name": f"checkpoint-e0-s{s}.pt", "epoch": 0, "step": s, "time": s, "size": 10, "metrics": {}}
    for s in (9, 19)
]


def test_the_panels_buttons_are_the_records_actions(page, lab):
    # Records whose actions are not what their state alone would suggest: the
    # panel must show what the server allows, not work it out again.
    fakes = [
        fake_job("fake-cancelling", "running", []),
        fake_job("fake-unresumable", "paused", ["cancel", "delete"]),
        fake_job("fake-resumable", "paused", ["resume", "cancel", "delete"]),
    ]

    def job_list(route):
        response = route.fetch()
        answer = response.json()
        answer["jobs"] += fakes
        route.fulfill(response=response, json=answer)

    def fake_parts(route):
        job_id, part = re.search(r"/jobs/(fake-[^/?]+)(?:/(\w+))?", route.request.url).groups()
        if part is None:  # the record of an active job, which the panel polls
            route.fulfill(json=next(f for f in fakes if f["id"] == job_id))
            return
        route.fulfill(
            json={
                "metrics": {"metrics": [], "next": 0},
                "checkpoints": {"checkpoints": FAKE_CHECKPOINTS},
                "logs": {"offset": 0, "next_offset": 0, "size": 0, "data": "", "running": False},
            }[part]
        )

    page.route(re.compile(r".*/cumulus/api/jobs(\?\d*)?$"), job_list)
    page.route(re.compile(r".*/cumulus/api/jobs/fake-.*"), fake_parts)
    open_lab(page, lab)
    open_panel(page)
    older, newest = (c["name"] for c in FAKE_CHECKPOINTS)
    for job in fakes:
        row = job_row(page, job["id"])
        expect(row).to_have_attribute("data-state", job["state"])
        for label in ("Pause", "Resume", "Cancel"):
            expect_enabled(button(row, label), label.lower() in job["actions"])
        if job["state"] != "paused":
            continue
        row.locator(".jp-CumulusJob-summary").click()
        resumable = "resume" in job["actions"]
        for name in (older, newest):
            checkpoint = row.locator(f'li[data-checkpoint="{name}"]')
            resume = checkpoint.locator("button", has_text=re.compile("^Resume$"))
            expect_enabled(resume, resumable)
            # The newest checkpoint of a job that can resume cannot be deleted.
            delete = checkpoint.locator("button", has_text="Delete")
            expect_enabled(delete, not (resumable and name == newest))


def paused_job_with_checkpoints(client, lab, name, count=3):
    """A job paused through the SDK after it saved at least ``count`` checkpoints."""
    job, _ = start_training(client, lab, name)
    wait_until(lambda: len(job.get_checkpoints()) >= count, timeout=60, what=f"{count} checkpoints")
    job.pause()
    wait_state(lab, job.id, "paused")
    return job


def test_checkpoints_resume_delete_and_cancel_from_the_panel(page, lab, client):
    job = paused_job_with_checkpoints(client, lab, "panel-ckpt", count=4)
    saved = job.get_checkpoints()
    oldest, middle = saved[0], saved[1]
    open_lab(page, lab)
    open_panel(page)
    row = job_row(page, job.id)
    expect(row).to_have_attribute("data-state", "paused")
    row.locator(".jp-CumulusJob-summary").click()
    rows = row.locator("li[data-checkpoint]")
    expect(rows).to_have_count(len(saved))

    # The server's refusal reaches the user as its own message: the checkpoint
    # goes away (deleted elsewhere) while the user confirms its deletion.
    doomed = row.locator(f'li[data-checkpoint="{middle["name"]}"]')
    doomed.locator("button", has_text="Delete").click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text(f"Delete {middle['name']}?")
    lab.api("DELETE", f"cumulus/api/jobs/{job.id}/checkpoints/{middle['name']}")
    dialog.locator("button", has_text="Delete").click()
    expect(page.locator(".jp-Dialog")).to_contain_text(f"Cannot delete {middle['name']}")
    expect(page.locator(".jp-Dialog")).to_contain_text(f"has no checkpoint '{middle['name']}'")
    page.locator(".jp-Dialog button", has_text="Close").click()
    expect(rows).to_have_count(len(saved) - 1)

    # A delete that goes through: the row and the server's entry are gone.
    second_newest = saved[-2]["name"]
    row.locator(f'li[data-checkpoint="{second_newest}"] button', has_text="Delete").click()
    page.locator(".jp-Dialog button", has_text="Delete").click()
    expect(rows).to_have_count(len(saved) - 2)
    assert second_newest not in [c["name"] for c in job.get_checkpoints()]

    # Resume from the oldest checkpoint.
    first_run_output = len(job.logs())
    target = row.locator(f'li[data-checkpoint="{oldest["name"]}"]')
    target.locator("button", has_text=re.compile("^Resume$")).click()
    expect(row).to_have_attribute("data-state", re.compile("queued|running"))
    record = lab.job(job.id)
    assert record["resume_checkpoint"] == oldest["name"]
    wait_state(lab, job.id, "running")
    wait_until(
        lambda: f"step {oldest['step'] + 1} loss" in job.logs()[first_run_output:],
        timeout=60,
        what="the resumed run's first step",
    )

    # Cancel asks first; "Keep running" keeps it running.
    button(row, "Cancel").click()
    page.locator(".jp-Dialog button", has_text="Keep running").click()
    expect(page.locator(".jp-Dialog")).to_have_count(0)
    assert lab.job(job.id)["state"] == "running"
    button(row, "Cancel").click()
    page.locator(".jp-Dialog button", has_text="Cancel job").click()
    expect(row).to_have_attribute("data-state", "cancelled", timeout=60_000)
    assert lab.job(job.id)["state"] == "cancelled"


def is_poll(request):
    """A request of the panel's poll for records: the job list, or one job's record
    (``jobs`` or ``jobs/<id>``, plus ServerConnection's cache-buster)."""
    return re.search(r"/cumulus/api/jobs(/[0-9a-f]+)?(\?\d*)?$", request.url) is not None


def test_the_panel_stops_polling_while_hidden_and_comes_back_with_the_layout(page, lab, client):
    # A running job: its record changes all the time, so the panel polls for it
    # (with no job active it reads records only when an event says one changed).
    job, release = start_training(client, lab, "polled")
    wait_state(lab, job.id, "running")
    open_lab(page, lab)
    with page.expect_request(is_poll, timeout=10_000):
        open_panel(page)
    with page.expect_request(is_poll, timeout=10_000):
        pass  # and again, on its own

    polls = []
    page.on("request", lambda r: polls.append(r.url) if is_poll(r) else None)
    page.locator('.jp-SideBar .lm-TabBar-tab[data-id="filebrowser"]').click()
    expect(page.locator("#cumulus-jobs")).to_be_hidden()
    # Observation windows, not synchronisation (and they keep Playwright's
    # events flowing): one interval for a request already on its way, then
    # two more in which a running poll would ask at least once.
    page.wait_for_timeout(POLL_SECONDS * 1000)
    before = len(polls)
    page.wait_for_timeout(2 * POLL_SECONDS * 1000)
    assert len(polls) == before, "the hidden panel kept polling"

    # Shown again, it asks at once rather than at its next interval; and the
    # layout is saved with the panel open.
    saved = page.expect_request(lambda r: "/lab/api/workspaces" in r.url and r.method == "PUT")
    with saved, page.expect_request(is_poll, timeout=POLL_SECONDS * 1000):
        open_panel(page)

    # A new visit restores the panel with the layout.
    open_lab(page, lab, reset=False)
    expect(page.locator("#cumulus-jobs")).to_be_visible()
    release.touch()
    wait_state(lab, job.id, "completed")


WIDGET_CELL = """\
import time
from cumulus_jupyter import CumulusClient
from cumulus_jupyter.runtime import Checkpointer, should_pause


def train():
    import torch
    model = torch.nn.Linear(4, 1)
    ckpt = Checkpointer()
    step = ckpt.load(model)["step"] + 1 if ckpt.exists() else 0
    while True:
        if should_pause():
            ckpt.save(model, None, 0, step)
            return "paused"
        step += 1
        time.sleep(0.05)


job = CumulusClient().run_async(train, name="widget-job")
job"""


def test_a_notebook_job_widget_renders_and_pauses_in_the_browser(page, lab):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)"}
    nb.cells = [nbformat.v4.new_code_cell(WIDGET_CELL)]
    nbformat.write(nb, lab.root / "widget.ipynb")
    before = {j["id"] for j in lab.api("GET", "cumulus/api/jobs")["jobs"]}

    page.goto(f"{lab.url}lab/tree/widget.ipynb?reset&token={lab.token}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    page.locator(".jp-StatusBar-TextItem", has_text=KERNEL_IDLE).wait_for(timeout=60_000)
    page.locator(".jp-Notebook .jp-Cell").first.click()
    page.keyboard.press("Shift+Enter")

    output = page.locator(".jp-Notebook .jp-OutputArea").first
    expect(output.locator(".widget-html-content", has_text="widget-job").first).to_be_visible(
        timeout=60_000
    )
    expect(output.locator("span", has_text=re.compile("^running$")).first).to_be_visible()
    [job_id] = [
        j["id"] for j in lab.api("GET", "cumulus/api/jobs")["jobs"] if j["id"] not in before
    ]

    output.locator("button", has_text=re.compile("Pause")).click()
    wait_state(lab, job_id, "paused")
    expect(output.locator("span", has_text=re.compile("^paused$")).first).to_be_visible()
    assert lab.api("GET", f"cumulus/api/jobs/{job_id}/checkpoints")["checkpoints"]


def test_a_server_that_stops_answering_is_reported_and_polled_less(browser, tmp_path):
    with running_lab(tmp_path) as other, new_page(browser, VIEWPORT) as page:
        open_lab(page, other)
        with page.expect_request(is_poll, timeout=10_000):
            open_panel(page)
        expect(page.locator(".jp-CumulusPanel-empty")).to_contain_text("No jobs yet")

        other.stop()
        banner = page.locator(".jp-CumulusPanel-error")
        expect(banner).to_contain_text("Cannot update the job list")
        attempts = []
        page.on("request", lambda r: attempts.append(r.url) if is_poll(r) else None)
        # An observation window: a poll that did not back off would ask 8 times.
        page.wait_for_timeout(8 * POLL_SECONDS * 1000)
        assert 1 <= len(attempts) <= 6, attempts
        expect(banner).to_be_visible()


def test_the_panel_works_under_a_base_url(browser, tmp_path):
    # As behind JupyterHub: every request of the panel carries the prefix.
    with running_lab(tmp_path, base_url="/user/alice/") as other:
        client = CumulusClient(other.url, token=other.token)
        job, _ = start_training(client, other, "behind-a-prefix")
        with new_page(browser, VIEWPORT) as page:
            open_lab(page, other)
            open_panel(page)
            row = job_row(page, job.id)
            expect(row).to_have_attribute("data-state", "running")
            button(row, "Pause").click()
            expect(row).to_have_attribute("data-state", "paused", timeout=60_000)
            assert other.job(job.id)["state"] == "paused"


def chart_points(row):
    """The (x, y) points of the panel's chart of the metric ``value``, in drawing order."""
    line = row.locator('.jp-CumulusJob-chart polyline[data-metric="value"]')
    points = (line.get_attribute("points") or "").split()
    return [tuple(float(c) for c in p.split(",")) for p in points]


def test_the_panel_plots_each_step_once_after_a_sigkill_and_resume(page, lab, client):
    # jobfuncs.metrics_across_runs: run 1 stops after step 34 (last save at
    # 30) and is killed; run 2 redoes 31..34, stops after 32, then finishes.
    flags = lab.base / "metrics-flags"
    flags.mkdir()
    job = client.run_async(
        jobfuncs.metrics_across_runs,
        kwargs={"steps": 60, "every_steps": 10, "hold": {1: 34, 2: 32}, "flag_dir": str(flags)},
        name="panel-metrics",
    )
    open_lab(page, lab)
    open_panel(page)
    row = job_row(page, job.id)
    row.locator(".jp-CumulusJob-summary").click()
    chart = row.locator('.jp-CumulusJob-chart polyline[data-metric="value"]')
    wait_until((flags / "held.1").exists, timeout=120, what=job.logs)
    expect(chart).to_have_attribute("data-points", "35")

    os.kill(job.info()["process"]["pid"], signal.SIGKILL)
    wait_state(lab, job.id, "lost")
    job.resume()
    wait_until((flags / "held.2").exists, timeout=120, what=job.logs)
    # The panel that followed run 1 folds in run 2's steps 31 and 32: still
    # one point per step, drawn left to right.
    expect(row.locator(".jp-CumulusJob-progress")).to_contain_text("33 / 60")
    expect(chart).to_have_attribute("data-points", "35")
    xs = [x for x, _ in chart_points(row)]
    assert len(xs) == 35 and xs == sorted(set(xs)), xs

    # A panel opened now gets both runs in its first page: the same, and the
    # progress is where run 2 is, not where run 1 got to.
    open_lab(page, lab)
    open_panel(page)
    row = job_row(page, job.id)
    row.locator(".jp-CumulusJob-summary").click()
    chart = row.locator('.jp-CumulusJob-chart polyline[data-metric="value"]')
    expect(chart).to_have_attribute("data-points", "35")
    expect(row.locator(".jp-CumulusJob-progress")).to_contain_text("33 / 60")

    (flags / "release.2").touch()
    expect(row).to_have_attribute("data-state", "completed", timeout=60_000)
    expect(chart).to_have_attribute("data-points", "60")
    points = chart_points(row)
    xs = [x for x, _ in points]
    assert len(xs) == 60 and xs == sorted(set(xs)), xs
    # It reports 1000 * run + step: run 1's points (steps 0..30) lie at the
    # bottom of the 80-unit-high chart, run 2's (31..59, redone ones too) at the top.
    ys = [y for _, y in points]
    assert all(y > 60 for y in ys[:31]) and all(y < 20 for y in ys[31:]), ys


def test_the_panel_shows_that_a_lost_run_was_restarted(page, lab, client):
    job = client.run_async(
        jobfuncs.exact_train,
        kwargs={"step_seconds": 0.05, "every_steps": 2},
        max_restarts=1,
        name="panel-restarts",
    )
    open_lab(page, lab)
    open_panel(page)
    row = job_row(page, job.id)
    expect(row).to_have_attribute("data-state", "running", timeout=60_000)
    expect(row.locator(".jp-CumulusJob-restarts")).to_have_count(0)
    wait_until(lambda: job.get_checkpoints(), timeout=120, what="a checkpoint")
    os.kill(job.info()["process"]["pid"], signal.SIGKILL)
    restarts = row.locator(".jp-CumulusJob-restarts")
    expect(restarts).to_contain_text("restarted 1 of 1 times", timeout=60_000)
    assert "killed by SIGKILL" in (restarts.get_attribute("title") or "")
    expect(row).to_have_attribute("data-state", "completed", timeout=120_000)


def events_request(since=None):
    """The notifier's and panel's long-poll of the event log (waiting: past the first)."""

    def match(request):
        m = re.search(r"/cumulus/api/events\?since=(\d+)&wait=([\d.]+)", request.url)
        return m is not None and float(m[2]) > 0 and (since is None or int(m[1]) >= since)

    return match


def open_lab_following_events(page, lab):
    """Open Lab and return once it follows the event log (its first read is done)."""
    with page.expect_request(events_request(), timeout=60_000):
        open_lab(page, lab, reset=False)


def toasts(page, text):
    return page.locator(".Toastify__toast", has_text=text)


def follow_reads(page):
    """Record the ``since`` of every event-log read ``page`` makes, from now on."""
    seen = [0]

    def note(request):
        m = re.search(r"/cumulus/api/events\?since=(\d+)", request.url)
        if m:
            seen.append(int(m[1]))

    page.on("request", note)
    return seen


def announced(page, lab, reads, seq):
    """Return once ``page`` has taken in event ``seq`` and announced what it will."""
    # A read from past seq is sent right after the answer that held seq was
    # handed on, and the announcement had asked for the lock by then...
    # (Each look asks the page something: Playwright hands on its events then.)
    wait_until(
        lambda: page.evaluate("0") == 0 and max(reads) >= seq,
        timeout=60,
        what=f"a read past event {seq}",
    )
    # ...so once we hold the lock, the announcement is done.
    page.evaluate(
        "k => navigator.locks.request(k, () => 0)", f"cumulus-jupyter:announced:{lab.base_url}"
    )


def notification_count(page):
    """How many notifications the page's notification center holds (its status bar says)."""
    page.bring_to_front()
    settled(page)
    return int(page.locator(".jp-Notification-Status-Text").inner_text())


def completed_seq(client, job_id):
    return wait_until(
        lambda: next(
            (
                e["seq"]
                for e in client.events()["events"]
                if e["job"] == job_id and e.get("new") == "completed"
            ),
            None,
        ),
        what="the job's completed event",
    )


def test_a_job_end_is_announced_once_per_browser_and_resume_works_from_it(page, lab, client):
    other_tab = page.context.new_page()  # same browser: same storage, same lock
    reads = {p: follow_reads(p) for p in (page, other_tab)}
    open_lab_following_events(page, lab)
    open_lab_following_events(other_tab, lab)

    before = {p: notification_count(p) for p in (page, other_tab)}

    job = client.run_async(jobfuncs.add, args=(1, 2), name="notify-me")
    seq = completed_seq(client, job.id)
    announced(page, lab, reads[page], seq)
    announced(other_tab, lab, reads[other_tab], seq)
    # Announced in one tab of the two, once (a background tab renders no toast:
    # count what each tab's notification center holds).
    added = sorted(notification_count(p) - before[p] for p in (page, other_tab))
    assert added == [0, 1], added
    page.bring_to_front()
    quiet = client.run_async(jobfuncs.add, args=(0, 0), name="quiet", notify=False)

    # Reloaded, the page does not announce it again (nor the job that asked not to be).
    page.reload()
    page.locator("#jp-main-dock-panel").wait_for()
    other_tab.close()
    paused, release = start_training(client, lab, "notify-pause")
    wait_state(lab, paused.id, "running")
    wait_until(lambda: paused.metrics(), timeout=60, what="a step")
    paused.pause()
    toast = toasts(page, f"notify-pause ({paused.id}) paused")
    expect(toast).to_have_count(1, timeout=60_000)
    assert toasts(page, f"({job.id})").count() == 0
    assert toasts(page, f"({quiet.id})").count() == 0

    # Its Resume resumes the job: the server says so.
    toast.get_by_role("button", name="Resume").click()
    wait_until(lambda: len(lab.job(paused.id)["runs"]) == 2, timeout=60, what="a second run")
    assert lab.job(paused.id)["state"] in ("queued", "running")
    release.touch()
    wait_state(lab, paused.id, "completed", timeout=120)
    # "Show" opens the panel on the job.
    done = toasts(page, f"notify-pause ({paused.id}) completed")
    expect(done).to_have_count(1, timeout=60_000)
    done.get_by_role("button", name="Show").click()
    expect(page.locator("#cumulus-jobs")).to_be_visible()
    expect(job_row(page, paused.id)).to_have_class(re.compile("jp-mod-open"))


def is_list_read(request):
    """The panel's read of the whole job list (not of one job)."""
    return re.search(r"/cumulus/api/jobs(\?\d*)?$", request.url) is not None


def test_the_panel_learns_what_changed_from_the_event_log(page, lab, client):
    lab.cancel_jobs()  # nothing active: nothing for the panel to poll
    open_lab(page, lab)
    with page.expect_request(is_list_read, timeout=10_000):
        open_panel(page)  # the first look reads every job
    reads = []
    page.on("request", lambda r: reads.append(r.url) if is_poll(r) else None)
    # An observation window, not synchronisation: a panel that re-read every
    # job on a timer would have asked twice by now.
    page.wait_for_timeout(2 * POLL_SECONDS * 1000)
    assert reads == []
    # A job submitted elsewhere shows up, and its end, from events alone: only
    # that job's record is read, never the whole list again.
    job = client.run_async(jobfuncs.add, args=(2, 2), name="event-driven")
    row = job_row(page, job.id)
    expect(row).to_have_attribute("data-state", "completed", timeout=60_000)
    assert reads and not [u for u in reads if re.search(r"/jobs(\?\d*)?$", u)], reads
    assert all(job.id in u for u in reads), reads

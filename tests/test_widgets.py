"""JobWidget and CheckpointBrowser driven like a user would: Button.click()."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from contextlib import redirect_stdout

import jobfuncs
import pytest
from servers import wait_until

from cumulus_jupyter import CumulusClient
from cumulus_jupyter.kernel import widgets
from cumulus_jupyter.kernel.client import Job
from cumulus_jupyter.kernel.widgets import POLLER, CheckpointBrowser, JobWidget
from cumulus_jupyter.spec import format_duration


def buttons(w):
    return (
        not w.pause_button.disabled,
        not w.resume_button.disabled,
        not w.cancel_button.disabled,
    )


ACTIONS = ("pause", "resume", "cancel")


def the_records_actions(job):
    """The buttons the job's record allows now (its ``actions``), as ``buttons`` gives them."""
    actions = job.info()["actions"]
    return tuple(a in actions for a in ACTIONS)


@pytest.fixture
def training(client):
    job = client.run_async(
        jobfuncs.resumable_train,
        kwargs={"epochs": 1, "steps": 2000, "step_seconds": 0.01, "every_steps": 10},
        gpu_memory=0.3,
    )
    yield job
    if job.status() in ("queued", "running", "pausing", "paused"):
        job.cancel()


def test_buttons_control_the_job_and_follow_its_state(training):
    w = JobWidget(training, poll_interval=0.2)
    try:
        wait_until(lambda: w.state == "running", what="the widget to see the job run")
        assert buttons(w) == (True, False, True) == the_records_actions(training)
        # A pause while the job still imports torch would stop it before its
        # first step: pause once the widget shows it training.
        wait_until(lambda: w.progress.value > 0, what="the widget to show progress")

        w.pause_button.click()
        assert training.status() in ("pausing", "paused")
        wait_until(lambda: w.state == "paused", what="the widget to see the pause")
        assert buttons(w) == (False, True, True) == the_records_actions(training)
        assert "starting at epoch 0 step 0" in w.log_text
        assert w.progress.value > 0
        assert "<svg" in w.chart.value and "loss" in w.chart.value

        w.resume_button.click()
        assert training.status() in ("queued", "running")
        wait_until(lambda: w.state == "running", what="the widget to see the resume")

        w.cancel_button.click()
        wait_until(lambda: training.status() == "cancelled", what="the cancel")
        wait_until(lambda: w.state == "cancelled", what="the widget to see the cancel")
        assert buttons(w) == (False, False, False) == the_records_actions(training)
        # A job that cannot resume needs none of its checkpoints: each one may go.
        browser = CheckpointBrowser(training)
        try:
            for _, name in browser.select.options:
                browser.select.value = name
                assert browser.resume_button.disabled
                assert not browser.delete_button.disabled
        finally:
            browser.close()
        # A finished job's widget stops polling; with no widget left the thread ends.
        wait_until(lambda: w not in widgets._live_widgets(), what="the widget to stop polling")
    finally:
        w.close()


def test_closing_widgets_leaves_no_thread_behind(training):
    views = [JobWidget(training, poll_interval=0.2) for _ in range(3)]
    assert POLLER.thread is not None and POLLER.thread.is_alive()
    thread = POLLER.thread
    for view in views:
        view.close()
    wait_until(lambda: not thread.is_alive(), what="the poller thread to exit")
    assert widgets._live_widgets() == []
    # The followers of the server's running jobs and of its events end with
    # their current long-polls.
    for name in ("cumulus-follow", "cumulus-events"):
        wait_until(
            lambda name=name: (
                not any(t.name == name and t.is_alive() for t in threading.enumerate())
            ),
            timeout=60,
            what=f"the thread {name} to end",
        )


def test_errors_from_the_server_are_shown_not_raised(training):
    w = JobWidget(training, poll_interval=0.2)
    try:
        wait_until(lambda: w.state == "running", what="the job to run")
        training.pause()
        wait_until(lambda: training.status() == "paused", what="the pause")
        w.pause_button.disabled = False  # a stale view clicked before its refresh
        w.pause_button.click()
        assert "only a running job can pause" in w.message.value
    finally:
        w.close()


def test_checkpoint_browser_resumes_from_the_selected_checkpoint(training):
    wait_until(lambda: len(training.get_checkpoints()) >= 3, what="three checkpoints")
    training.pause()
    training.wait(timeout=60)
    browser = CheckpointBrowser(training)
    names = [c["name"] for c in training.get_checkpoints()]
    assert [value for _, value in browser.select.options] == names[::-1]  # newest first
    assert "latest" in browser.select.options[0][0]
    assert "loss=" in browser.select.options[0][0]  # the metrics reported by then

    # The checkpoint a paused job needs cannot be deleted; an older one can.
    browser.select.value = names[-1]
    assert browser.delete_button.disabled
    browser.delete_button.disabled = False  # a stale view: the server still refuses
    browser.delete_button.click()
    assert "resumes from" in browser.message.value
    browser.select.value = names[0]
    browser.delete_button.click()
    assert names[0] not in [v for _, v in browser.select.options]

    chosen = names[1]
    step = next(c["step"] for c in training.get_checkpoints() if c["name"] == chosen)
    browser.select.value = chosen
    assert not browser.resume_button.disabled
    browser.resume_button.click()
    assert browser.resume_button.disabled  # the job is no longer paused
    wait_until(lambda: f"starting at epoch 0 step {step + 1}" in training.logs(), what="resume")


def test_a_job_outside_a_kernel_prints_a_summary(client):
    job = client.run_async(jobfuncs.add, args=[2], gpu_memory=0.1)
    job.wait(timeout=60)
    out = io.StringIO()
    with redirect_stdout(out):
        job._ipython_display_()
    assert out.getvalue().startswith(f"Job {job.id} 'add': completed")


def test_a_printed_line_shows_without_waiting_for_the_next_refresh(client, tmp_path):
    """The widget follows a running job's output itself (long-polls), not only on refreshes."""
    release, done = tmp_path / "release", tmp_path / "done"
    job = client.run_async(
        jobfuncs.print_when_released, args=[str(release), "hello, live", str(done)], gpu_memory=0.1
    )
    wait_until(lambda: job.status() == "running", what="the job to run")
    w = JobWidget(job, poll_interval=3600)  # one refresh now, the next in an hour
    try:
        assert "hello, live" not in w.log_text
        release.touch()
        wait_until(lambda: "hello, live" in w.log_text, what="the line in the widget")
        assert "hello, live" in w.log_view.value
    finally:
        done.touch()
        w.close()
    assert job.result(timeout=60) == "done"


def test_running_jobs_widgets_are_followed_together_one_request_at_a_time(
    client, training, tmp_path, monkeypatch
):
    """Twenty widgets must not cost the server twenty long-polls: one request at a
    time brings every running job's output, metrics and record to its widget."""
    done = tmp_path / "done"
    talkers = [
        client.run_async(
            jobfuncs.print_when_released,
            args=[str(tmp_path / f"release{i}"), f"hello from {i}", str(done)],
            gpu_memory=0.1,
        )
        for i in range(2)
    ]
    requests: list[set[str]] = []
    at_once = [0, 0]  # now, most
    lock = threading.Lock()
    # On the class: the kernel's thread that follows a server's jobs uses the
    # client of the widget that started it, maybe another test's.
    follow = CumulusClient.follow

    def counted(self, positions, wait=0.0):
        with lock:
            requests.append(set(positions))
            at_once[0] += 1
            at_once[1] = max(at_once)
        try:
            return follow(self, positions, wait)
        finally:
            with lock:
                at_once[0] -= 1

    get_logs = CumulusClient.get_logs

    def no_log_polls(self, job_id, offset=0, wait=0.0):
        # A stopped job's last output is read once, the usual way; a running
        # one's is never waited for alone.
        assert not wait, "a widget long-polled one job's output on its own"
        return get_logs(self, job_id, offset, wait)

    monkeypatch.setattr(CumulusClient, "follow", counted)
    jobs = [training, *talkers]
    for job in jobs:
        wait_until(lambda job=job: job.status() == "running", what="the jobs to run")
    views = [JobWidget(job, poll_interval=3600) for job in jobs]  # no refresh for an hour
    try:
        monkeypatch.setattr(CumulusClient, "get_logs", no_log_polls)
        for i in range(2):
            (tmp_path / f"release{i}").touch()
        for i, view in enumerate(views[1:]):
            wait_until(lambda v=view, i=i: f"hello from {i}" in v.log_text, what="each line")
        # The training job's metrics reach its chart through the same requests.
        steps = views[0].progress.value
        wait_until(lambda: views[0].progress.value > steps, what="the training's progress")
        assert {job.id for job in jobs} in requests
        assert at_once[1] == 1
        # A job that stops leaves the requests; the others stay in them.
        talkers[0].cancel()
        wait_until(lambda: views[1].state == "cancelled", what="the widget to see the cancel")
        seen = len(requests)
        wait_until(lambda: len(requests) > seen + 1, what="two more requests")
        assert talkers[0].id not in requests[-1] and talkers[1].id in requests[-1]
    finally:
        done.touch()
        for view in views:
            view.close()


def test_a_running_jobs_elapsed_time_goes_on_while_its_record_is_not_resent(
    client, tmp_path, monkeypatch
):
    release = tmp_path / "release"
    job = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
    answers = []
    follow = CumulusClient.follow  # on the class, as above

    def kept(self, positions, wait=0.0):
        answer = follow(self, positions, wait)
        answers.append(answer)
        return answer

    monkeypatch.setattr(CumulusClient, "follow", kept)
    wait_until(lambda: job.status() == "running", what="the job to run")

    def lacking() -> list[int]:
        mine = [answer[job.id] for answer in answers if job.id in answer]
        return [i for i, news in enumerate(mine) if "record" not in news]

    w = JobWidget(job)
    try:
        # The server sends the record once; then, unchanged, only its version.
        wait_until(lacking, what="an answer without the record")
        first = lacking()[0]
        shown = w.record["elapsed"]
        wait_until(lambda: w.record["elapsed"] >= shown + 2, what="two more seconds shown")
        wait_until(  # the header is drawn just before the record is kept
            lambda: f"elapsed {format_duration(w.record['elapsed'])} /" in w.header.value,
            what="the header to show it",
        )
        # Counted on here, not re-sent.
        mine = [answer[job.id] for answer in list(answers) if job.id in answer]
        assert all("record" not in news for news in mine[first:])
    finally:
        release.touch()
        w.close()
    assert job.result(timeout=60) == "released"


def test_widgets_are_followed_with_their_own_clients_credentials(client, tmp_path, monkeypatch):
    """A kernel's threads that follow a server are per server *and* token: a widget of a
    client whose token the server refuses (a server restarted with a new one) must not
    have another client's widgets followed with it."""
    release = tmp_path / "release"
    job = client.run_async(jobfuncs.hold_until, args=[str(release)], gpu_memory=0.1)
    asked: list[tuple[str, set[str]]] = []
    follow = CumulusClient.follow  # on the class, as above

    def seen(self, positions, wait=0.0):
        asked.append((self.token, set(positions)))
        return follow(self, positions, wait)

    monkeypatch.setattr(CumulusClient, "follow", seen)
    wait_until(lambda: job.status() == "running", what="the job to run")
    other = CumulusClient(client.url, token=client.token)
    refused = JobWidget(Job(other, job.info()))  # the server's threads start with this one
    other.token = "no-longer-the-token"  # as after a restart of the server with a new one
    mine = JobWidget(job)
    try:
        wait_until(
            lambda: any(t == client.token and job.id in ids for t, ids in list(asked)),
            what="a follow request with the job's own client's token",
        )
        # The server refuses that token (a 403, said as the server says it).
        wait_until(lambda: refused.message.value, what="the refusal shown")
        assert not mine.message.value
    finally:
        release.touch()
        refused.close()
        mine.close()
    assert job.result(timeout=60) == "released"


def test_a_waiting_jobs_widget_is_woken_by_the_event_log(training):
    """A paused job's widget polls rarely: a resume from elsewhere (the panel, a
    magic) reaches it through the server's event log, not its next poll."""
    wait_until(lambda: training.metrics(), timeout=60, what="a step")
    training.pause()
    assert training.wait(timeout=60) == "paused"
    w = JobWidget(training, poll_interval=3600)  # its own polls alone would take hours
    try:
        wait_until(lambda: w.state == "paused", what="the widget's first look")
        training.resume()  # not through the widget
        wait_until(lambda: w.state in ("queued", "running"), timeout=30, what="the wake-up")
        # A queued job cannot be paused: let it run first.
        wait_until(lambda: training.status() == "running", timeout=60, what="the job to run")
        training.pause()
        wait_until(lambda: w.state in ("pausing", "paused"), timeout=30, what="the next one")
    finally:
        w.close()


# -- a server older than POST follow (in-process, the route taken out) ----------------


@pytest.fixture
def older_server(jp_serverapp, jp_asyncio_loop, http_server):
    """A real server without ``POST follow``, as one of an earlier version is
    (pytest-jupyter's, serving on this test's event loop: ``http_server``)."""
    from cumulus_jupyter.server.handlers import FollowHandler

    # pytest-jupyter does not run the server's post-start hook; a real server does.
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    app = jp_serverapp.web_app
    for router in (app.default_router, app.wildcard_router):
        for rule in router.rules:
            rules = getattr(rule.target, "rules", None)
            if rules is not None:
                rules[:] = [r for r in rules if r.target is not FollowHandler]
    return jp_serverapp


async def test_widgets_of_a_server_without_follow_are_refreshed_as_before(
    older_server, jp_base_url, tmp_path
):
    from cumulus_jupyter.errors import JobNotFoundError

    url = f"http://127.0.0.1:{older_server.port}{jp_base_url}"
    client = CumulusClient(url, token=older_server.identity_provider.token)
    release, done = tmp_path / "release", tmp_path / "done"
    # The client is synchronous and this server runs on this test's loop: threads.
    job = await asyncio.to_thread(
        client.run_async,
        jobfuncs.print_when_released,
        [str(release), "hello, old server", str(done)],
        gpu_memory=0.1,
    )
    with pytest.raises(JobNotFoundError):
        await asyncio.to_thread(client.follow, {job.id: {}})

    async def until(predicate, what):
        deadline = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    w = await asyncio.to_thread(JobWidget, job)
    try:
        await until(lambda: url in POLLER.unfollowable, "the widget to find no follow")
        release.touch()
        await until(lambda: "hello, old server" in w.log_text, "the line, by refreshes")
        assert w.message.value == ""  # nothing for the user to mend
    finally:
        done.touch()
        w.close()
        POLLER.unfollowable.discard(url)

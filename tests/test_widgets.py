"""JobWidget and CheckpointBrowser driven like a user would: Button.click()."""

from __future__ import annotations

import io
import threading
from contextlib import redirect_stdout

import jobfuncs
import pytest
from servers import wait_until

from cumulus_jupyter.kernel import widgets
from cumulus_jupyter.kernel.widgets import POLLER, CheckpointBrowser, JobWidget


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
    # Each widget's log follower ends with its current long-poll.
    followers = [view._follower for view in views if view._follower is not None]
    assert followers, "a running job's widget follows its log"
    wait_until(lambda: not any(f.is_alive() for f in followers), what="the log followers to end")
    # And the follower of the server's events, with its current long-poll.
    wait_until(
        lambda: not any(t.name == "cumulus-events" and t.is_alive() for t in threading.enumerate()),
        timeout=60,
        what="the event follower to end",
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

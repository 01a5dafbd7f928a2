"""Metrics after a crash and resume: one value per step, the newest run's.

A job resumed from its checkpoint at step C runs the steps after C again; the
metrics API, the widget and the panel (tests/test_lab.py) show each step once,
with the newest run's value, and every run's records stay readable.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import sys
from pathlib import Path

import cloudpickle
import jobfuncs
import pytest
from servers import wait_until
from tornado.httpclient import HTTPClientError

from cumulus_jupyter.kernel.widgets import JobWidget
from cumulus_jupyter.metrics import StepMerger, newest_per_step
from cumulus_jupyter.runtime import report
from cumulus_jupyter.runtime.reporting import last_reported

# -- the rules, on records as metrics.jsonl holds them ---------------------------

# Run 1 (written before runs were recorded: no "run") reaches step 3; run 2
# resumes from a checkpoint at step 1 and runs steps 2 and 3 again.
WRITTEN = [
    {"note": "start", "time": 1.0},
    {"step": 0, "total": 4, "loss": 1.0, "time": 2.0},
    {"step": 1, "total": 4, "loss": 0.9, "time": 3.0},
    {"step": 2, "total": 4, "loss": 0.8, "time": 4.0},
    {"step": 3, "total": 4, "loss": 0.7, "time": 5.0},
    {"note": "resumed", "time": 6.0, "run": 2},
    {"step": 2, "total": 4, "loss": 0.6, "time": 7.0, "run": 2},
    {"step": 2, "val": 0.65, "time": 7.5, "run": 2},  # same run, same step: merged
    {"step": 3, "total": 4, "loss": 0.5, "time": 8.0, "run": 2},
]
EXPECTED = [
    {"note": "start", "time": 1.0, "run": 1},
    {"note": "resumed", "time": 6.0, "run": 2},
    {"step": 0, "total": 4, "loss": 1.0, "time": 2.0, "run": 1},
    {"step": 1, "total": 4, "loss": 0.9, "time": 3.0, "run": 1},
    {"step": 2, "total": 4, "loss": 0.6, "val": 0.65, "time": 7.5, "run": 2},
    {"step": 3, "total": 4, "loss": 0.5, "time": 8.0, "run": 2},
]


def test_each_step_once_with_the_newest_runs_values():
    assert newest_per_step(WRITTEN) == EXPECTED


def test_records_without_a_step_are_all_kept_in_order():
    records = [{"loss": 0.5}, {"loss": 0.4}, {"loss": 0.5}, {"step": "x", "loss": 0.3}]
    assert newest_per_step(records) == [{**r, "run": 1} for r in records]


def test_a_step_counts_within_its_epoch():
    # Checkpointer.loop counts steps within an epoch: (epoch 0, step 1) and
    # (epoch 1, step 1) are two steps, however many runs there were.
    records = [
        {"epoch": 0, "step": 1, "loss": 1.0, "run": 1},
        {"epoch": 1, "step": 0, "loss": 0.9, "run": 1},
        {"epoch": 1, "step": 1, "loss": 0.8, "run": 1},
        {"epoch": 1, "step": 1, "loss": 0.7, "run": 2},
    ]
    assert [(m["epoch"], m["step"], m["loss"]) for m in newest_per_step(records)] == [
        (0, 1, 1.0),
        (1, 0, 0.9),
        (1, 1, 0.7),
    ]


def test_a_late_record_of_an_older_run_replaces_nothing():
    merger = StepMerger()
    merger.add({"step": 5, "loss": 0.2, "run": 2})
    merger.add({"step": 5, "loss": 0.9, "run": 1})  # e.g. from a straggling process
    assert merger.records() == [{"step": 5, "loss": 0.2, "run": 2}]
    assert merger.latest()["loss"] == 0.2


def test_folding_pages_gives_what_one_request_gives():
    # What a poller (widget, panel) does: fetch the view of the records from
    # `since` on, fold it into what it holds; for every place a page can end.
    for cut in range(len(WRITTEN) + 1):
        merger = StepMerger()
        merger.extend(newest_per_step(WRITTEN[:cut]))
        merger.extend(newest_per_step(WRITTEN[cut:]))
        assert merger.records() == EXPECTED, cut


def test_latest_is_the_newest_runs_not_the_highest_step():
    # Run 2 resumed at step 2 and has reported only step 2 so far: progress is
    # at step 2, although run 1's step 3 is still the last one in step order.
    written = WRITTEN[:7]
    merger = StepMerger()
    merger.extend(newest_per_step(written))
    assert merger.records()[-1]["step"] == 3
    assert merger.latest()["step"] == 2 and merger.latest()["run"] == 2


def test_report_records_the_run_in_the_file_only(tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULUS_JOB_DIR", str(tmp_path))
    monkeypatch.setenv("CUMULUS_RUN", "3")
    report(step=1, loss=0.5)
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["run"] == 3 and line["step"] == 1
    # Checkpoints keep the last report's metrics: the run is no metric.
    assert "run" not in last_reported()
    with pytest.raises(TypeError, match="run"):
        report(step=2, run=7)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


# -- the REST view, on a hand-written metrics.jsonl (in-process server) -----------


@pytest.fixture
def inprocess(jp_serverapp, jp_asyncio_loop):
    """pytest-jupyter does not run the server's post-start hook; a real server does."""
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    return jp_serverapp


async def test_the_metrics_endpoint_serves_one_record_per_step_and_each_run(inprocess, jp_fetch):
    body = {
        "payload": base64.b64encode(cloudpickle.dumps((sum, ([1],), {}))).decode(),
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "gpu_memory": 0.1,
    }
    job = json.loads(
        (await jp_fetch("cumulus", "api", "jobs", method="POST", body=json.dumps(body))).body
    )
    await jp_fetch("cumulus", "api", "jobs", job["id"], "result", params={"wait": 60})
    root = Path(inprocess.config["CumulusApp"]["job_root"])
    lines = [json.dumps(r) for r in WRITTEN]
    lines.insert(3, "not json")  # skipped, but counted by since/next
    text = "\n".join(lines) + '\n{"step": 4, "loss"'  # the last line is still being written
    (root / job["id"] / "metrics.jsonl").write_text(text)

    async def get(**params):
        resp = await jp_fetch("cumulus", "api", "jobs", job["id"], "metrics", params=params)
        return json.loads(resp.body)

    written = [{**r, "run": r.get("run", 1)} for r in WRITTEN]
    assert await get() == {"metrics": EXPECTED, "since": 0, "next": 10}
    assert (await get(all="true"))["metrics"] == written
    assert (await get(run=1))["metrics"] == written[:5]
    assert (await get(run=2))["metrics"] == written[5:]
    assert (await get(run=3))["metrics"] == []
    # since counts every line written, whichever view.
    assert (await get(since=6, run=2))["metrics"] == written[5:]
    page = await get(since=7)
    assert page["metrics"] == [written[6] | written[7], written[8]] and page["next"] == 10
    # The file grows: the line being written ends, and two more come (one not
    # even UTF-8). A page from where the last ended reads on from its byte.
    with open(root / job["id"] / "metrics.jsonl", "ab") as f:
        f.write(b': 0.5}\n\xff\xfe not utf-8\n{"step": 5, "loss": 0.4}\n')
    added = [{"step": 4, "loss": 0.5, "run": 1}, {"step": 5, "loss": 0.4, "run": 1}]
    assert await get(since=10, all="true") == {"metrics": added, "since": 10, "next": 13}
    assert await get(since=13) == {"metrics": [], "since": 13, "next": 13}
    assert (await get(since=12))["metrics"] == added[1:]
    assert (await get(all="true"))["metrics"] == [*written, *added]  # from the start again
    for params, match in [
        ({"run": "0"}, "run"),
        ({"run": "1.5"}, "whole number"),
        ({"run": "two"}, "run"),
        ({"all": "maybe"}, "all must be true or false"),
    ]:
        with pytest.raises(HTTPClientError) as info:
            await get(**params)
        assert info.value.code == 400
        assert re.search(match, json.loads(info.value.response.body)["message"])


# -- a real job, SIGKILLed and resumed ----------------------------------------------

STEPS = 60
HELD_AT = 34  # run 1 is killed after reporting this step
SAVE_EVERY = 10  # so it resumes after its checkpoint at step 30


def value(run, step):
    """What jobfuncs.metrics_across_runs reports at ``step`` in ``run``."""
    return 1000 * run + step


def kill_and_resume(job):
    os.kill(job.info()["process"]["pid"], signal.SIGKILL)
    wait_until(lambda: job.status() == "lost", timeout=60, what="the job to be lost")
    resumed_from = job.get_checkpoints()[-1]["step"]
    job.resume()
    return resumed_from


def start_held(client, tmp_path, hold):
    """A job reporting every step and saving every SAVE_EVERY, held at ``hold[run]``."""
    return client.run_async(
        jobfuncs.metrics_across_runs,
        kwargs={
            "steps": STEPS,
            "every_steps": SAVE_EVERY,
            "hold": hold,
            "flag_dir": str(tmp_path),
        },
        gpu_memory=0.2,
    )


def test_metrics_after_a_sigkill_and_resume_show_each_step_once(client, tmp_path):
    job = start_held(client, tmp_path, {1: HELD_AT})
    wait_until((tmp_path / "held.1").exists, timeout=120, what=lambda: job.logs())
    first_page = client._json("GET", f"jobs/{job.id}/metrics")
    assert [m["step"] for m in first_page["metrics"]] == list(range(HELD_AT + 1))
    resumed_from = kill_and_resume(job)
    assert resumed_from == 30  # steps 31..34 run twice
    assert job.result(timeout=120) == {"start": resumed_from + 1, "run": 2}

    metrics = job.metrics()
    assert [m["step"] for m in metrics] == list(range(STEPS))  # each step exactly once
    for m in metrics:
        run = 1 if m["step"] <= resumed_from else 2
        assert (m["run"], m["value"]) == (run, value(run, m["step"])), m

    # The older run stays readable, as it was written; so does everything.
    def get(**params):
        return client._json("GET", f"jobs/{job.id}/metrics", params=params)["metrics"]

    run1 = get(run=1)
    assert [(m["step"], m["value"]) for m in run1] == [(s, value(1, s)) for s in range(HELD_AT + 1)]
    run2 = get(run=2)
    assert [(m["step"], m["value"]) for m in run2] == [
        (s, value(2, s)) for s in range(resumed_from + 1, STEPS)
    ]
    assert get(all="true") == run1 + run2
    # The SDK asks the same.
    assert job.metrics(run=1) == run1 and job.metrics(all_runs=True) == run1 + run2

    # A poller that had the first page and folds in the rest ends the same.
    merger = StepMerger()
    merger.extend(first_page["metrics"])
    merger.extend(get(since=first_page["next"]))
    assert merger.records() == metrics


def test_widget_chart_and_progress_plot_each_step_once(client, tmp_path):
    job = start_held(client, tmp_path, {1: HELD_AT, 2: 32})
    # This one sees run 1's records first, then run 2's, page after page.
    following = JobWidget(job, poll_interval=0.1)
    try:
        wait_until((tmp_path / "held.1").exists, timeout=120, what=lambda: job.logs())
        wait_until(
            lambda: following.progress_label.value == f"step {HELD_AT + 1} / {STEPS}",
            what=lambda: following.progress_label.value,
        )
        resumed_from = kill_and_resume(job)
        assert resumed_from == 30
        wait_until((tmp_path / "held.2").exists, timeout=120, what=lambda: job.logs())

        # Run 2 has redone steps 31 and 32; run 1's 33 and 34 are not redone yet.
        chart_now = [
            (step, value(1 if step <= resumed_from or step > 32 else 2, step))
            for step in range(HELD_AT + 1)
        ]

        # A widget opened now gets it all in its first page, in step order.
        opened = JobWidget(job, poll_interval=60)
        try:
            assert opened.series["value"] == chart_now
            # Progress is where run 2 is, not where run 1 got to.
            assert opened.progress_label.value == f"step 33 / {STEPS}"
            assert opened.chart.value.count("<polyline") == 1
        finally:
            opened.close()
        wait_until(
            lambda: following.series.get("value") == chart_now,
            what=lambda: following.series.get("value"),
        )
        wait_until(
            lambda: following.progress_label.value == f"step 33 / {STEPS}",
            what=lambda: following.progress_label.value,
        )

        (tmp_path / "release.2").touch()
        assert job.result(timeout=120)["run"] == 2
        wait_until(lambda: following.state == "completed", what="the widget to see the end")
        final = [(s, value(1 if s <= resumed_from else 2, s)) for s in range(STEPS)]
        assert following.series["value"] == final
        points = re.search(r'points="([^"]*)"', following.chart.value).group(1).split()
        assert len(points) == STEPS
        assert following.progress_label.value == f"step {STEPS} / {STEPS}"
    finally:
        following.close()
        if job.status() not in ("completed", "failed", "cancelled"):
            job.cancel()

"""The event log (``GET events``) and webhooks, through real servers: events survive a
SIGKILL, long-polls wake on a change, a real local HTTP endpoint receives the POSTs in
order, and a hanging or failing endpoint neither slows job control nor leaks its token."""

from __future__ import annotations

import http.server
import json
import signal
import threading
import time

import jobfuncs
import pytest
from conftest import serving
from servers import ServerProcess, free_port, wait_until

from cumulus_jupyter.errors import BadRequestError
from cumulus_jupyter.server.events import EventLog

SECRET = "s3cr3t-token-value"


def all_events(client, since=0):
    return client.events(since=since)["events"]


def states_of(events, job_id):
    return [(e["old"], e["new"]) for e in events if e["job"] == job_id and e["kind"] == "state"]


def test_the_event_log_survives_a_sigkilled_server_without_losing_or_repeating(tmp_path):
    srv = ServerProcess(tmp_path, kill_grace=2)
    with serving(srv):
        client = srv.client()
        done = client.run_async(
            jobfuncs.exact_train, kwargs={"every_steps": 10, "step_seconds": 0.05}
        )
        assert done.wait(timeout=180) == "completed"
        release = tmp_path / "release"
        held = client.run_async(jobfuncs.hold_until, args=(str(release),))
        wait_until(lambda: held.status() == "running", timeout=60, what="the held job to run")
        before = all_events(client)
        srv.stop(signal.SIGKILL)
        release.touch()  # it completes while the server is down
        srv.start()
        client = srv.client()
        assert client.get_job(held.id).wait(timeout=60) == "completed"
        after = client.run_async(jobfuncs.add, args=(1, 1))
        assert after.result(timeout=60) == 2
        wait_until(lambda: states_of(all_events(client), after.id)[-1][1] == "completed")
        events = all_events(client)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))  # numbered on, none lost or repeated
    assert events[: len(before)] == before  # what was served before is served the same
    assert states_of(events, done.id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "completed"),
    ]
    # The end the restarted server found in the job's files is one event, once.
    assert states_of(events, held.id) == [
        (None, "queued"),
        ("queued", "running"),
        ("running", "completed"),
    ]
    assert states_of(events, after.id)[0] == (None, "queued")
    assert after.id not in {e["job"] for e in before}
    # Checkpoint commits of a running job are events too, with their position.
    checkpoints = [e for e in events if e["job"] == done.id and e["kind"] == "checkpoint"]
    assert checkpoints and all(e["checkpoint"] and e["epoch"] is not None for e in checkpoints)
    # An event carries the job's name and what it last reported.
    end = next(e for e in events if e["job"] == done.id and e.get("new") == "completed")
    assert end["name"] == "exact_train" and "loss" in end["metrics"]


def test_a_long_poll_wakes_as_soon_as_something_changes(server, client):
    last = client.events()["last"]
    answers = []

    def follow():
        started = time.monotonic()
        answers.append((client.events(since=last, wait=50), time.monotonic() - started))

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.5)  # not synchronisation: gives the long-poll time to be waiting
    assert not answers  # it waits...
    job = client.run_async(jobfuncs.add, args=(2, 2))
    follower.join(timeout=45)
    assert answers, "the long-poll did not answer"
    answer, waited = answers[0]
    # ...and answers with the change, long before its 50 s were up.
    assert waited < 40
    assert answer["events"][0]["job"] == job.id and answer["events"][0]["new"] == "queued"
    assert answer["last"] >= answer["events"][0]["seq"] > last
    job.result(timeout=60)


def test_events_refuse_bad_arguments(client):
    with pytest.raises(BadRequestError, match="since"):
        client._json("GET", "events", params={"since": "soon"})
    with pytest.raises(BadRequestError, match="wait"):
        client._json("GET", "events", params={"wait": 1000})
    with pytest.raises(BadRequestError, match="notify must be true or false"):
        client.run_async(jobfuncs.add, args=(1, 1), notify="no")


class Endpoint:
    """A real HTTP server on 127.0.0.1 that records webhook POSTs.

    ``/ok`` answers 200; ``/fail`` answers 500 to the first ``failures`` POSTs;
    ``/hang`` holds each POST until ``release`` is set.
    """

    def __init__(self, failures: int = 2) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict]] = []
        self.order: list[str] = []
        self.failures = failures
        self.release = threading.Event()
        self.hanging = threading.Event()
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.split("?")[0]
                endpoint.received.append((path, body))
                code = 200
                if path == "/fail" and endpoint.failures > 0:
                    endpoint.failures -= 1
                    code = 500
                if path == "/hang":
                    endpoint.order.append("hang entered")
                    endpoint.hanging.set()
                    endpoint.release.wait(60)
                    endpoint.order.append("hang released")
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://hook:pw@127.0.0.1:{self.port}{path}?token={SECRET}"

    def bodies(self, path: str) -> list[dict]:
        return [b for p, b in self.received if p == path]

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.close()


def test_webhooks_receive_the_chosen_ends_in_order(tmp_path, endpoint):
    srv = ServerProcess(tmp_path, notify_url=endpoint.url("/ok"), pause_timeout=5)
    with serving(srv):
        client = srv.client()
        quiet = client.run_async(jobfuncs.add, args=(0, 0), notify=False)
        assert quiet.result(timeout=60) == 0
        ok = client.run_async(jobfuncs.add, args=(1, 2), name="adds")
        assert ok.result(timeout=60) == 3
        bad = client.run_async(jobfuncs.failing, args=(1,))
        assert bad.wait(timeout=60) == "failed"
        slow = client.run_async(jobfuncs.pausable_sleep, args=(60,), duration=1)
        assert slow.wait(timeout=60) == "timed_out"
        wait_until(lambda: len(endpoint.bodies("/ok")) >= 3, timeout=30, what="three POSTs")
        log = srv.log_path.read_text()
    posted = endpoint.bodies("/ok")
    # The default states (completed, failed, timed_out, lost), in the order they
    # happened; not the job submitted with notify=False, not queued or running.
    assert [(b["job"], b["new"]) for b in posted] == [
        (ok.id, "completed"),
        (bad.id, "failed"),
        (slow.id, "timed_out"),
    ]
    assert posted[0]["name"] == "adds" and posted[0]["kind"] == "state"
    assert posted[0]["old"] == "running" and posted[0]["seq"] < posted[1]["seq"]
    assert "ValueError" in posted[1]["message"]
    assert SECRET not in log


def test_a_hanging_or_failing_endpoint_does_not_slow_the_server_and_is_retried(tmp_path, endpoint):
    srv = ServerProcess(
        tmp_path,
        notify_url=f"{endpoint.url('/hang')},{endpoint.url('/fail')}",
        notify_states="completed",
        notify_format="slack",
    )
    with serving(srv):
        client = srv.client()
        job = client.run_async(jobfuncs.add, args=(2, 3), name="five")
        assert job.result(timeout=60) == 5
        assert endpoint.hanging.wait(30), "the hanging endpoint got no POST"
        # While the POST to /hang is held, the server answers at once: the
        # delivery waits, job control does not.
        assert job.info()["state"] == "completed"
        other = client.run_async(jobfuncs.add, args=(1, 1))
        assert other.result(timeout=60) == 2
        endpoint.order.append("server answered")
        endpoint.release.set()
        # /fail answered 500 twice and was tried again until it took the POST.
        wait_until(lambda: len(endpoint.bodies("/fail")) >= 3, timeout=60, what="retries")
        wait_until(lambda: len(endpoint.bodies("/hang")) >= 2, timeout=30, what="the 2nd POST")
        log = srv.log_path.read_text()
    assert endpoint.order[:3] == ["hang entered", "server answered", "hang released"]
    first = endpoint.bodies("/fail")[0]
    # Slack's incoming-webhook format: one text, naming the job and its end.
    assert set(first) == {"text"} and "five" in first["text"] and "completed" in first["text"]
    assert all(b == first for b in endpoint.bodies("/fail")[:3])  # the same event, retried
    assert "posting event" in log and "HTTP 500" in log
    # The URL is logged without its secrets: no token, no user info.
    assert SECRET not in log and "hook:pw" not in log
    assert f"127.0.0.1:{endpoint.port}/fail?…" in log


def test_a_bad_notify_setting_stops_the_server_with_a_clear_message(tmp_path):
    srv = ServerProcess(tmp_path, notify_states="completed,finished")
    with pytest.raises(AssertionError, match="'finished' is not a job state"):
        srv.start(timeout=60)
    srv.stop()


def test_the_event_log_is_bounded_and_a_line_cut_by_a_crash_costs_no_later_event(tmp_path):
    log = EventLog(tmp_path, max_events=5)
    for i in range(12):
        log.add(kind="state", job="j", new=str(i))
    assert [e["seq"] for e in log.since(0)] == [8, 9, 10, 11, 12]
    assert (log.first, log.last) == (8, 12)
    assert len(log.path.read_bytes().splitlines()) <= 10  # rewritten past twice the bound
    with open(log.path, "ab") as f:
        f.write(b'{"seq": 13, "ti')  # the server died mid-write
    again = EventLog(tmp_path, max_events=5)
    assert again.last == 12
    again.add(kind="state", job="j", new="after")
    reread = EventLog(tmp_path, max_events=5)
    assert [(e["seq"], e["new"]) for e in reread.since(11)] == [(12, "11"), (13, "after")]
    # Too old: dropped when read back.
    old = EventLog(tmp_path / "old", max_age=60)
    old.add(kind="state", job="j", new="x")
    text = old.path.read_text().replace(f'"time":{old.since(0)[0]["time"]}', '"time":1')
    old.path.write_text(text)
    assert EventLog(tmp_path / "old", max_age=60).since(0) == []
    assert EventLog(tmp_path / "old", max_age=60).last == 1  # the numbering goes on
    # Every event too old, and the file rewritten: numbering still goes on.
    aged = EventLog(tmp_path / "aged", max_events=1, max_age=60)
    for i in range(3):
        aged.add(kind="state", job="j", new=str(i))
    aged.path.write_text(aged.path.read_text().replace('"time":', '"time":1,"was":'))
    assert EventLog(tmp_path / "aged", max_events=1, max_age=60).since(0) == []
    assert EventLog(tmp_path / "aged", max_events=1, max_age=60).last == 3

"""The SDK keeps one connection to the server per thread, and gets a new one when it must."""

from __future__ import annotations

import gc
import json
import os
import threading
import warnings

import psutil
import pytest
from servers import ServerProcess, free_port

from cumulus_jupyter import CumulusClient
from cumulus_jupyter.errors import BadRequestError, CumulusError, JobNotFoundError
from cumulus_jupyter.kernel.client import ServerUnavailableError


def connections_to(port: int, pid: int | None = None) -> list[int]:
    """Local ports of this process's established TCP connections to ``port``."""
    return sorted(
        c.laddr.port
        for c in psutil.Process(pid).net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_requests_from_one_thread_share_one_connection(server):
    client = server.client()
    before = connections_to(server.port)
    for _ in range(20):
        client.jobs()
    kept = [p for p in connections_to(server.port) if p not in before]
    assert len(kept) == 1, kept
    # Another thread has a connection of its own: a widget's follower polls
    # beside the notebook's code, and one connection carries one exchange.
    done = threading.Event()
    seen: list[int] = []

    def other() -> None:
        client.jobs()
        seen.extend(connections_to(server.port))
        done.set()

    threading.Thread(target=other).start()
    assert done.wait(30)
    assert len([p for p in seen if p not in before]) == 2
    client.jobs()
    assert kept[0] in connections_to(server.port)  # the first is still the main thread's
    client.close()
    assert kept[0] not in connections_to(server.port)


def test_a_kept_connection_is_replaced_after_a_server_restart(tmp_path):
    srv = ServerProcess(tmp_path).start()
    try:
        client = srv.client()
        job = client.run_async(sum, ([1, 2],), gpu_memory=0.1)
        assert job.result(timeout=60) == 3
        srv.stop()
        srv.start()  # the same port: the kept connection points at a dead server
        # A submit is not repeated on failure; it must not be sent on the dead connection.
        again = client.run_async(sum, ([3, 4],), gpu_memory=0.1)
        assert again.result(timeout=60) == 7
        srv.stop()
        srv.start()
        assert {j.id for j in client.jobs()} == {job.id, again.id}
    finally:
        srv.stop()


def test_a_forked_child_opens_its_own_connection(server):
    client = server.client()
    client.jobs()
    (parents,) = connections_to(server.port)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's exit
        try:
            client.jobs()
            report = {"ok": True, "ports": connections_to(server.port)}
        except BaseException as e:
            report = {"ok": False, "error": repr(e)}
        os.write(write, json.dumps(report).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        report = json.loads(f.read())
    os.waitpid(pid, 0)
    assert report["ok"], report
    # The child's one connection is its own, not its parent's socket.
    assert len(report["ports"]) == 1 and report["ports"] != [parents], (report, parents)
    client.jobs()
    assert connections_to(server.port) == [parents]  # the parent's still serves it


def test_a_proxy_named_in_the_environment_is_still_used(server, monkeypatch):
    dead = free_port()  # nothing listens there
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("no_proxy", "")
    with pytest.raises(ServerUnavailableError, match="cannot reach the cumulus server"):
        server.client().jobs()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert isinstance(CumulusClient(server.url, token=server.token).jobs(), list)


def test_the_server_knows_one_client_as_one_user(server):
    # Token-authenticated requests without the server's login cookie are each
    # a new anonymous user to it (created and signed every time).
    client = server.client()

    def me() -> str:
        status, _, raw = client._transport.request(
            "GET", server.url + "api/me", None, {"Authorization": f"token {server.token}"}, 30
        )
        assert status == 200, raw
        return json.loads(raw)["identity"]["username"]

    first = me()
    assert [me() for _ in range(3)] == [first] * 3
    client.jobs()
    assert me() == first


def test_a_redirect_or_a_url_that_is_not_http_is_a_clear_error(server):
    client = server.client()
    # Jupyter Server redirects a path with a trailing slash (as a hub does a
    # request it does not know to its login page); the API itself never does.
    with pytest.raises(CumulusError, match=r"redirect to .*check the URL"):
        client._json("GET", "")  # cumulus/api/
    with pytest.raises(JobNotFoundError, match="empty id"):
        client.get_job("")
    with pytest.raises(BadRequestError, match="not an http"):
        CumulusClient(f"127.0.0.1:{server.port}", token=server.token)


def test_connections_close_with_their_thread_and_client(server):
    client = server.client()
    before = connections_to(server.port)
    # Earlier tests' garbage (a Popen of a process still running, say) warns
    # when it is collected: collected here, it is not counted below.
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worker = threading.Thread(target=client.jobs)
        worker.start()
        worker.join()
        client.jobs()
        del worker, client
        gc.collect()
    unclosed = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning) and "socket" in str(w.message)
    ]
    assert not unclosed, unclosed
    assert [p for p in connections_to(server.port) if p not in before] == []

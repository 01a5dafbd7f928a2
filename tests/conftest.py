from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import ServerProcess

from cumulus_jupyter.jobdir import WORKER_MODULE

pytest_plugins = ("pytest_jupyter.jupyter_server",)


def cumulus_server_config(tmp_path, **server_app):
    """In-process server config: the extension on, authentication enforced."""
    return {
        "ServerApp": {
            "jpserver_extensions": {"cumulus_jupyter": True},
            "allow_unauthenticated_access": False,
            **server_app,
        },
        "CumulusApp": {
            "job_root": str(tmp_path / "jobs"),
            "gpus": [],
            "max_payload_bytes": 64 * 1024,
            # The server would freeze the whole test process's objects.
            "freeze_gc": False,
        },
    }


@pytest.fixture
def jp_server_config(tmp_path):
    return cumulus_server_config(tmp_path)


@contextlib.contextmanager
def serving(srv: ServerProcess) -> Iterator[ServerProcess]:
    """Start ``srv``; at the end stop it and kill any job process it left behind."""
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        _kill_leftover_jobs(srv.job_root)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `jupyter server` subprocess with the extension, shared by a module's tests."""
    # Short stop deadlines keep the escalation tests quick, but a job that
    # pauses by itself must still make its deadline: jobs run at nice 19, and
    # beside the other test worker's servers, browsers and Ray cluster a job
    # can wait seconds for a CPU (3 s was once too short for the seed's save).
    with serving(
        ServerProcess(tmp_path_factory.mktemp("server"), pause_timeout=10, kill_grace=2)
    ) as srv:
        yield srv


@pytest.fixture
def client(server):
    return server.client()


def _kill_leftover_jobs(root: Path) -> None:
    """Tests must not leave job processes behind on a shared CI machine."""
    inside = str(root) + os.sep
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            # A cold run names its directory on its command line; a run forked
            # by a warm template (and what it started) only works in it.
            started_cold = WORKER_MODULE in cmd and any(str(root) in c for c in cmd)
            if started_cold or (proc.info["cwd"] or "").startswith(inside):
                proc.kill()


#: The files that take longest (minutes each on 2 cores), longest first.
#: ``./dev.sh test`` runs the tests in 2 pytest-xdist workers, handing out one
#: file at a time in collection order (``--no-loadscope-reorder``): a long
#: file handed out last would run alone at the end, its worker's twin idle.
LONGEST_FILES = (
    "test_ray.py",
    "test_lab.py",
    "test_exact_resume.py",
    "test_sharded.py",
    "test_benchmarks.py",
    "test_notebooks.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the longest files first; the rest keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FILES)))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can see a failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

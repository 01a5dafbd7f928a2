"""The server freezes what it holds once started, so a full collection does not stall it.

With JupyterLab's extensions a server holds some 200,000 objects after it
starts; a full collection of the cyclic garbage collector scanned them all,
0.1-0.3 s during which no request is answered (``benchmarks/control_plane.py``
saw it in its slowest answers). Frozen, they are out of every collection's
sight.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
from conftest import cumulus_server_config
from servers import wait_until


@pytest.fixture(params=[True, False], ids=["freeze_gc", "no freeze_gc"])
def freeze(request):
    return request.param


@pytest.fixture
def jp_server_config(tmp_path, freeze):
    config = cumulus_server_config(tmp_path)  # freeze_gc off: set here as the case says
    config["CumulusApp"]["freeze_gc"] = freeze
    return config


@pytest.fixture
def started(jp_serverapp, jp_asyncio_loop):
    """The in-process server with its extensions started (its post-start hook)."""
    assert gc.get_freeze_count() == 0, "something froze the test process's objects before"
    try:
        jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
        yield jp_asyncio_loop
    finally:
        gc.unfreeze()  # the test process goes on with its own collections


def frozen_after_a_turn(loop) -> bool:
    """Let the server's event loop run a little, then say whether anything is frozen."""
    loop.run_until_complete(asyncio.sleep(0.01))
    return gc.get_freeze_count() > 0


def test_what_the_server_holds_once_started_is_out_of_the_collector_s_sight(started, freeze):
    if freeze:
        wait_until(lambda: frozen_after_a_turn(started), what="the freeze of the startup objects")
        # A full collection now scans what was made since: a small part of the heap.
        assert gc.get_freeze_count() > 10 * len(gc.get_objects())
    else:
        # The freeze is scheduled at once when it is on: a few turns of the loop show it.
        assert not any(frozen_after_a_turn(started) for _ in range(20))

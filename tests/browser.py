"""A real ``jupyter lab`` with the cumulus extension, and Debian's Chromium.

Shared by the browser tests (tests/test_lab.py) and docs/screenshots.py.
Nothing is downloaded: the browser is ``/usr/bin/chromium`` (or ``$CHROMIUM``)
driven by Playwright, and JupyterLab is told not to fetch news or updates.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servers import ServerProcess, wait_until

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The status bar's kernel item once a kernel is connected and idle.
KERNEL_IDLE = re.compile(r"^(?!No Kernel).+ \| Idle$")
LIVE_STATES = {"queued", "running", "pausing", "paused", "timed_out", "lost"}


def write_lab_settings(settings_dir: Path) -> None:
    """No news or update checks (no network), and no pop-ups over the page."""
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


class Lab(ServerProcess):
    """A ``jupyter lab`` subprocess with the cumulus extension, on 127.0.0.1.

    Its notebooks live in ``root``; news, update checks and the extension
    manager are off (no network).
    """

    def __init__(self, base: Path, gpus: str = "[]", base_url: str = "/"):
        super().__init__(base, command="lab", gpus=gpus)
        self.root = base / "root"
        self.root.mkdir()
        self.log_path = base / "lab.log"
        self.base_url = base_url
        self.url = f"http://127.0.0.1:{self.port}{base_url}"

    def argv(self) -> list[str]:
        settings = self.base / "lab-settings"
        write_lab_settings(settings)
        args = [a for a in super().argv() if not a.startswith("--ServerApp.root_dir=")]
        return [
            *args,
            f"--ServerApp.root_dir={self.root}",
            f"--ServerApp.base_url={self.base_url}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            f"--LabApp.user_settings_dir={settings}",
            f"--LabApp.workspaces_dir={self.base / 'workspaces'}",
        ]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["JUPYTER_DATA_DIR"] = str(self.base / "data")
        env["IPYTHONDIR"] = str(self.base / "ipython")
        return env

    def start(self, timeout: float = 90) -> Lab:
        super().start(timeout)
        return self

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """Call the server with the token (``path`` is relative to the base URL)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"token {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def job(self, job_id: str) -> dict[str, Any]:
        return self.api("GET", f"cumulus/api/jobs/{job_id}")

    def _ready(self) -> bool:
        if not super()._ready():
            return False
        try:  # the lab's own API answers too
            self.api("GET", "lab/api/settings")
        except OSError:
            return False
        return True

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def cancel_jobs(self) -> None:
        """Cancel every job that may still have a process, and wait until none does."""

        def left() -> list[dict[str, Any]]:
            jobs = self.api("GET", "cumulus/api/jobs")["jobs"]
            return [j for j in jobs if j["state"] in LIVE_STATES]

        for job in left():
            with contextlib.suppress(OSError):  # a job that stopped meanwhile: 409
                self.api("POST", f"cumulus/api/jobs/{job['id']}/cancel", {})
        wait_until(lambda: not left(), timeout=60, what="the jobs to stop")


@contextlib.contextmanager
def running_lab(base: Path, gpus: str = "[]", base_url: str = "/") -> Iterator[Lab]:
    """A started :class:`Lab`; its jobs are cancelled and it is stopped on exit."""
    lab = Lab(base, gpus, base_url)
    try:
        yield lab.start()
    except BaseException:
        print(f"--- jupyter lab log ---\n{lab.log_tail()}", file=sys.stderr)
        raise
    finally:
        try:
            if lab.proc is not None:
                lab.cancel_jobs()
        finally:
            lab.stop()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Debian Chromium under Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def new_page(browser: Any, viewport: dict[str, int], timeout_ms: int = 30_000) -> Iterator[Any]:
    """A page in a fresh browser context (own cookies and storage), closed on exit."""
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.set_default_timeout(timeout_ms)
        yield page
    finally:
        context.close()


def settled(page: Any) -> None:
    """Wait until what the page last changed has been painted."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

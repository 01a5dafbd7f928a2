"""A real IPython kernel (ipykernel) for tests, wired to a cumulus server by environment."""

from __future__ import annotations

import os
from typing import Any

from jupyter_client.manager import KernelManager


class Kernel:
    """Start a kernel whose environment points at ``server``; run code; collect output."""

    def __init__(self, server: Any, cwd: str):
        env = dict(os.environ)
        env["CUMULUS_SERVER_URL"] = server.url
        env["CUMULUS_TOKEN"] = server.token
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=cwd)
        self._connect()

    def _connect(self) -> None:
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Execute ``code``; return (the reply content, every IOPub message's type + content)."""
        messages: list[dict[str, Any]] = []

        def hook(msg: dict[str, Any]) -> None:
            messages.append({"type": msg["msg_type"], **msg["content"]})

        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook)
        return reply["content"], messages

    def ok(self, code: str, timeout: float = 120) -> list[dict[str, Any]]:
        reply, messages = self.run(code, timeout)
        if reply["status"] != "ok":
            raise AssertionError(
                f"{reply.get('ename')}: {reply.get('evalue')}\n{text_of(messages)[-3000:]}"
            )
        return messages

    def restart(self) -> None:
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        self._connect()

    def shutdown(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def text_of(messages: list[dict[str, Any]]) -> str:
    """All stdout/stderr text and text/plain results, in order."""
    out = []
    for m in messages:
        if m["type"] == "stream":
            out.append(m["text"])
        elif m["type"] in ("execute_result", "display_data", "update_display_data"):
            out.append(m["data"].get("text/plain", "") + "\n")
        elif m["type"] == "error":
            out.append("\n".join(m["traceback"]))
    return "".join(out)

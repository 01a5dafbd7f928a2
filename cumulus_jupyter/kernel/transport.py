"""HTTP for the SDK: one kept-alive connection per thread, standard library only.

A status poll from a widget or ``Job.wait`` is a small request, so what a
fresh connection adds matters: a TCP handshake for the caller, and for the
server an accept, a new stream and a close on its event loop. So each thread
keeps its connection open between requests, as a browser does, and sends
back the login cookie the server sets: without it, a token-authenticated
request makes the server create and sign a new anonymous user every time
(and each request has a different name in its log). Together they save the
server about a seventh of its CPU per ``GET jobs/{id}``
(``benchmarks/request_cost.py``). Threads do not share a connection (a
widget follows its job from a thread of its own while the notebook's code
uses the client), and a forked child opens its own rather than write into
its parent's.

Where the environment names a proxy for the server's host, requests go
through ``urllib`` (a fresh connection each, through the proxy) as before.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping

from ..errors import BadRequestError
from ..fileio import readable_now


class Transport:
    """Sends requests to one server (``base``: scheme, host and port)."""

    def __init__(self, base: str) -> None:
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequestError(
                f"the server URL {base!r} is not an http(s) URL: pass it whole, with its"
                " base_url, e.g. CumulusClient('http://127.0.0.1:8888', token=...)"
            )
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._local = threading.local()
        self._jar = http.cookiejar.CookieJar()
        proxy = urllib.request.getproxies().get(parts.scheme)
        bypass = urllib.request.proxy_bypass(parts.netloc)
        #: The proxy the environment names for this server, if any.
        self._proxy = {parts.scheme: proxy} if proxy and not bypass else None

    def __getstate__(self) -> dict:
        # A client shipped to a job (pickled with a cell's globals) connects,
        # and logs in, anew.
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_jar")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
        self._jar = http.cookiejar.CookieJar()

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str],
        timeout: float,
    ) -> tuple[int, dict[str, str], bytes]:
        """Send one request; return status, headers and body, whatever the status.

        Raises OSError (or ``http.client.HTTPException``) when the server
        cannot be reached or the connection breaks.
        """
        if self._proxy:
            req = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
            return self._through_proxy(req, timeout)
        path = urllib.parse.urlsplit(url)
        target = path.path + (f"?{path.query}" if path.query else "")
        # The jar reads and writes cookies through urllib's request type.
        cookies = urllib.request.Request(url, method=method)
        self._jar.add_cookie_header(cookies)
        headers = {**headers, **dict(cookies.header_items())}
        conn, reused = self._connection(timeout)
        try:
            resp, raw = _exchange(conn, method, target, body, headers)
        except (OSError, http.client.HTTPException):
            self.close()
            # A kept connection the server closed meanwhile (restarted, or
            # timed out idle) fails on first use: a request the server never
            # answered is sent again once on a new connection, if repeating
            # it is harmless.
            if not reused or method not in ("GET", "HEAD"):
                raise
            conn, _ = self._connection(timeout)
            resp, raw = _exchange(conn, method, target, body, headers)
        self._jar.extract_cookies(resp, cookies)  # type: ignore[arg-type]
        if resp.will_close:
            self.close()
        return resp.status, dict(resp.headers), raw

    def _through_proxy(
        self, req: urllib.request.Request, timeout: float
    ) -> tuple[int, dict[str, str], bytes]:
        # An opener of its own: urlopen's shared one keeps the proxies of the
        # environment as it was when the process first used it.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(self._proxy), urllib.request.HTTPCookieProcessor(self._jar)
        )
        try:
            with opener.open(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers or {}), e.read()
        except urllib.error.URLError as e:
            reason = e.reason
            raise reason if isinstance(reason, OSError) else OSError(str(reason)) from None

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection (opened if it has none), and whether it was kept."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and (self._local.pid != os.getpid() or _dropped(conn)):
            # In a forked child the socket is the parent's: leave it to the
            # parent (closing our copy of the descriptor does not end it).
            self.close()
            conn = None
        if conn is None:
            kind = _HTTPSConnection if self._https else _HTTPConnection
            conn = kind(self._host, self._port, timeout=timeout)
            self._local.conn, self._local.pid = conn, os.getpid()
            return conn, False
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        conn.timeout = timeout
        return conn, True

    def close(self) -> None:
        """Close the calling thread's connection (the next request opens another)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()


def _exchange(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, target, body=body, headers=headers)
    resp = conn.getresponse()
    return resp, resp.read()


class _HTTPConnection(http.client.HTTPConnection):
    # A thread's connection goes when the thread or the client does: closed,
    # not left to the socket's finalizer (which warns of an unclosed socket).
    def __del__(self) -> None:
        self.close()


class _HTTPSConnection(http.client.HTTPSConnection):
    def __del__(self) -> None:
        self.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the server has closed (or written unasked to) an idle connection."""
    if conn.sock is None:
        return True
    try:
        # Between requests nothing is due: readable means EOF, a reset, or
        # bytes that would be taken for the next answer.
        return readable_now(conn.sock)
    except OSError:
        return True

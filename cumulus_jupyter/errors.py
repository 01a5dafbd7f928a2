"""Errors shared by the server and the client SDK.

The server answers each with its HTTP status and ``{"error": code, "message": ...}``;
the client raises the same class again from that body, so ``except
JobNotFoundError`` works on either side of the wire.
"""

from __future__ import annotations

import json


class CumulusError(Exception):
    """Base class of every error cumulus-jupyter raises on purpose."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequestError(CumulusError, ValueError):
    """The request was malformed or a parameter is invalid (HTTP 400)."""

    status = 400
    code = "bad_request"


class AuthError(CumulusError, PermissionError):
    """No valid credentials, or the credentials may not do this (HTTP 403)."""

    status = 403
    code = "forbidden"


class JobNotFoundError(CumulusError, LookupError):
    """No job (or checkpoint) by that id or name (HTTP 404)."""

    status = 404
    code = "not_found"


class InvalidStateError(CumulusError):
    """The job's state does not allow the operation, e.g. pausing a paused job (HTTP 409)."""

    status = 409
    code = "invalid_state"


class PayloadTooLargeError(CumulusError):
    """The submitted function and arguments exceed the server's limit (HTTP 413)."""

    status = 413
    code = "payload_too_large"


class JobFailedError(CumulusError):
    """The job's function raised; carries the remote exception and traceback.

    ``exc_type`` is the remote exception's qualified class name,
    ``remote_traceback`` its formatted traceback, and ``exception`` the
    exception object itself when it could be unpickled.
    """

    status = 500
    code = "job_failed"

    def __init__(
        self,
        message: str,
        exc_type: str = "",
        remote_traceback: str = "",
        exception: BaseException | None = None,
    ):
        super().__init__(message)
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.exception = exception

    def __str__(self) -> str:
        head = f"{self.exc_type}: {self.message}" if self.exc_type else self.message
        if self.remote_traceback:
            return f"{head}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return head


class JobStoppedError(CumulusError):
    """The job ended without a return value (cancelled, lost, killed); ``state`` says how."""

    status = 409
    code = "no_result"

    def __init__(self, message: str, state: str = ""):
        super().__init__(message)
        self.state = state


#: error code -> class, for the client to raise the server's error again.
BY_CODE: dict[str, type[CumulusError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        AuthError,
        JobNotFoundError,
        InvalidStateError,
        PayloadTooLargeError,
        JobStoppedError,
    )
}


def error_from_response(status: int, body: bytes) -> CumulusError:
    """The error the server answered with ``status`` and ``body``, as its own class
    again (by its ``error`` code, else by the status)."""
    try:
        answer = json.loads(body)
        code, message = answer.get("error", ""), answer.get("message", "")
    except (ValueError, AttributeError):
        code, message = "", body[:500].decode("utf-8", "replace")
    cls = BY_CODE.get(code)
    if cls is None:
        cls = next((c for c in BY_CODE.values() if c.status == status), CumulusError)
    return cls(message or f"HTTP {status}")

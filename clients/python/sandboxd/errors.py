"""Typed exceptions for the Sandbox API's error codes.

Every failure the server reports is raised as a subclass of :class:`SandboxdError` chosen by the
envelope's ``error`` code (``{"error": "not_found", "message": ..., "code": 404, "docs": ...}``).
A code this SDK does not know yet is raised as :class:`SandboxdError` itself, so ``except
SandboxdError`` always catches everything this package raises.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional, Type

__all__ = [
    "SandboxdError",
    "InvalidRequest",
    "Unauthorized",
    "ImageNotApproved",
    "PathNotAllowed",
    "NotFound",
    "SandboxDestroyed",
    "SandboxNotReady",
    "PayloadTooLarge",
    "Conflict",
    "ConcurrencyLimit",
    "RunQueueFull",
    "RateLimited",
    "Unsupported",
    "UnsupportedInMode",
    "CapacityExhausted",
    "ProvisioningFailed",
    "Unavailable",
    "InternalError",
    "ConnectionFailed",
    "ChecksumMismatch",
    "WaitTimeout",
    "RunFailed",
    "error_from_response",
]


class SandboxdError(Exception):
    """Base of every error this package raises.

    Attributes:
        code: the API's error code (``"not_found"``, ...); for errors raised by the client itself
            ``"connection_failed"``, ``"checksum_mismatch"`` or ``"wait_timeout"``, and
            ``"http_<status>"`` when the server's answer was not the API's envelope.
        status: the HTTP status (0 when there was no answer).
        message: the server's message, for people.
        docs: the envelope's ``docs`` link ("" when absent).
        retry_after: seconds to wait before trying again (from ``Retry-After``), or None.
    """

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        code: Optional[str] = None,
        status: int = 0,
        docs: str = "",
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.status = status
        self.message = message
        self.docs = docs
        self.retry_after = retry_after

    def __str__(self) -> str:
        if self.status:
            return "%s (%d): %s" % (self.code, self.status, self.message)
        return "%s: %s" % (self.code, self.message)

    def __repr__(self) -> str:
        return "%s(code=%r, status=%r, message=%r)" % (
            type(self).__name__,
            self.code,
            self.status,
            self.message,
        )


class InvalidRequest(SandboxdError):
    """400: the request breaks a rule (the message names the field)."""

    code = "invalid_request"


class Unauthorized(SandboxdError):
    """401: the API key is missing or unknown."""

    code = "unauthorized"


class ImageNotApproved(SandboxdError):
    """403: the image is not on the operator's approved list."""

    code = "image_not_approved"


class PathNotAllowed(SandboxdError):
    """403: a file path outside the sandbox's read_only/read_write paths, inside a blocked one,
    with ``..``, through a symlink that leaves the mount, or a special file."""

    code = "path_not_allowed"


class NotFound(SandboxdError):
    """404: no such sandbox, run or file (or it belongs to another account)."""

    code = "not_found"


class SandboxDestroyed(SandboxdError):
    """409: the sandbox is destroyed."""

    code = "sandbox_destroyed"


class SandboxNotReady(SandboxdError):
    """409: the sandbox is still provisioning."""

    code = "sandbox_not_ready"


class PayloadTooLarge(SandboxdError):
    """413: the body (an upload, the code) is over the server's limit."""

    code = "payload_too_large"


class Conflict(SandboxdError):
    """409: the files API found a file where a directory is needed, or a directory that is not
    empty where one is to be removed."""

    code = "conflict"


class ConcurrencyLimit(SandboxdError):
    """429: the plan's concurrent sandboxes are all live."""

    code = "concurrency_limit"


class RunQueueFull(SandboxdError):
    """429: 64 runs already wait in this sandbox."""

    code = "run_queue_full"


class ContextLimit(SandboxdError):
    """409: the sandbox already has 8 code contexts that are not deleted."""

    code = "context_limit"


class RateLimited(SandboxdError):
    """429: too many requests for this API key; see ``retry_after``."""

    code = "rate_limited"


class Unsupported(SandboxdError):
    """400: the server does not support this (yet)."""

    code = "unsupported"


class UnsupportedInMode(SandboxdError):
    """400: the setting cannot be honoured in the sandbox's mode (e.g. network rules in wasm)."""

    code = "unsupported_in_mode"


class CapacityExhausted(SandboxdError):
    """503: the host cannot fit the sandbox."""

    code = "capacity_exhausted"


class ProvisioningFailed(SandboxdError):
    """500: the sandbox could not be provisioned (its record is in status "error")."""

    code = "provisioning_failed"


class Unavailable(SandboxdError):
    """503: the server is shutting down."""

    code = "unavailable"


class InternalError(SandboxdError):
    """500: the service failed (not your code)."""

    code = "internal_error"


class ConnectionFailed(SandboxdError):
    """No answer: the server is down, the address is wrong, or the connection broke."""

    code = "connection_failed"


class ChecksumMismatch(SandboxdError):
    """An upload or download whose bytes do not hash to the SHA-256 the server reported."""

    code = "checksum_mismatch"

    def __init__(self, path: str, expected: str, actual: str) -> None:
        super().__init__(
            "checksum mismatch for %s: server has sha256 %s, client %s" % (path, expected, actual)
        )
        self.path = path
        self.expected = expected
        self.actual = actual


class WaitTimeout(SandboxdError, TimeoutError):
    """A wait (for a sandbox to be ready, for a run to end) outlasted its timeout."""

    code = "wait_timeout"


class RunFailed(SandboxdError):
    """Raised by ``Run.raise_for_status()`` for a run that did not complete; ``.run`` is the run."""

    code = "run_failed"

    def __init__(self, run: Any) -> None:
        err = run.error or {}
        detail = ""
        if isinstance(err, dict) and err.get("type"):
            detail = ": %s: %s" % (err.get("type"), err.get("message", ""))
        super().__init__("run %s ended %s (exit code %s)%s" % (run.run_id, run.status, run.exit_code, detail))
        self.run = run


_BY_CODE: Dict[str, Type[SandboxdError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        Unauthorized,
        ImageNotApproved,
        PathNotAllowed,
        NotFound,
        SandboxDestroyed,
        SandboxNotReady,
        PayloadTooLarge,
        Conflict,
        ConcurrencyLimit,
        RunQueueFull,
        ContextLimit,
        RateLimited,
        Unsupported,
        UnsupportedInMode,
        CapacityExhausted,
        ProvisioningFailed,
        Unavailable,
        InternalError,
    )
}


def _retry_after(headers: Mapping[str, str]) -> Optional[float]:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value.strip()), 0.0)
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime
    import datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    return max((when - now).total_seconds(), 0.0)


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> SandboxdError:
    """Build the exception for a failed answer: by the envelope's code, else SandboxdError."""
    retry_after = _retry_after(headers)
    envelope = None
    try:
        envelope = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        pass
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), str):
        code = envelope["error"]
        cls = _BY_CODE.get(code, SandboxdError)
        return cls(
            str(envelope.get("message", "")),
            code=code,
            status=status,
            docs=str(envelope.get("docs", "")),
            retry_after=retry_after,
        )
    text = body.decode("utf-8", "replace").strip().splitlines()
    message = text[0][:200] if text else "HTTP %d" % status
    return SandboxdError(message, code="http_%d" % status, status=status, retry_after=retry_after)

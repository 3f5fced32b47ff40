"""The HTTP client underneath :class:`sandboxd.Sandbox`: one method per API call.

Methods return the API's JSON as plain ``dict`` objects (or raw streams for files and events)
and raise the typed exceptions of :mod:`sandboxd.errors`. A ``Client`` opens one connection per
call, so it is safe to share between threads.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import select
import socket
import ssl
import time
import urllib.parse
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from . import errors
from ._sse import SSEEvent, read_events

__all__ = ["Client", "DEFAULT_URL", "Body"]

DEFAULT_URL = "http://127.0.0.1:8080"

#: What an upload accepts: bytes, or a binary file object (anything with ``read``).
Body = Union[bytes, bytearray, memoryview, io.IOBase, Any]

_CHUNK = 256 * 1024
_USER_AGENT = "sandboxd-python/0.1"



def resolve_url(base_url: Optional[str] = None) -> str:
    """The base URL: the argument, else $SANDBOXD_URL, else http://127.0.0.1:8080."""
    url = base_url or os.environ.get("SANDBOXD_URL") or DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def resolve_key(api_key: Optional[str] = None) -> str:
    """The API key: the argument, else $AGENTCOP_API_KEY, else $SANDBOXD_API_KEY ("" if none)."""
    key = api_key or os.environ.get("AGENTCOP_API_KEY") or os.environ.get("SANDBOXD_API_KEY") or ""
    return key.strip()


class Client:
    """A client of one sandboxd server.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8080"``; default ``$SANDBOXD_URL``, else that address.
        api_key: default ``$AGENTCOP_API_KEY``, else ``$SANDBOXD_API_KEY``.
        timeout: seconds to wait for the server on ordinary calls (a sync run waits as long as
            the run; event streams reconnect after ``stream_timeout`` seconds of silence).
        max_retries: how often a call answered ``429 rate_limited`` is retried, after the
            ``Retry-After`` delay (uploads from a stream are never retried).
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        *,
        timeout: float = 60.0,
        stream_timeout: float = 30.0,
        max_retries: int = 2,
    ) -> None:
        self.base_url = resolve_url(base_url)
        self.api_key = resolve_key(api_key)
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self.max_retries = max_retries
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("base_url must be http(s)://host[:port], not %r" % base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")

    def __repr__(self) -> str:
        return "Client(%r)" % self.base_url

    # ---- transport -------------------------------------------------------------------------

    def _connect(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _target(self, path: str, query: Optional[Mapping[str, Any]]) -> str:
        target = self._prefix + path
        if query:
            q = {k: v for k, v in query.items() if v is not None}
            if q:
                target += "?" + urllib.parse.urlencode(q)
        return target

    def _headers(self, auth: bool, extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
        # One connection per call: "close" makes the response own (and close) the socket.
        h = {"User-Agent": _USER_AGENT, "Accept": "application/json", "Connection": "close"}
        if auth:
            if not self.api_key:
                raise errors.Unauthorized(
                    "no API key: pass api_key= or set SANDBOXD_API_KEY (or AGENTCOP_API_KEY)",
                    status=0,
                )
            h["X-AgentCop-Key"] = self.api_key
        if extra:
            h.update(extra)
        return h

    def open(
        self,
        method: str,
        path: str,
        *,
        query: Optional[Mapping[str, Any]] = None,
        json_body: Any = None,
        body: Optional[Body] = None,
        length: Optional[int] = None,
        headers: Optional[Mapping[str, str]] = None,
        expect: Tuple[int, ...] = (200,),
        timeout: Union[float, None, str] = "default",
        auth: bool = True,
    ) -> http.client.HTTPResponse:
        """Send one request and return the open response (the caller reads and closes it).

        A status outside ``expect`` raises the matching :class:`SandboxdError`; a call answered
        ``429 rate_limited`` is retried up to ``max_retries`` times when its body can be re-sent.
        ``body`` may be bytes or a binary file object; ``length`` is its size (None: bytes are
        measured, a stream is sent chunked).
        """
        if timeout == "default":
            timeout = self.timeout
        hdrs = self._headers(auth, headers)
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        if isinstance(body, (bytearray, memoryview)):
            body = bytes(body)
        if isinstance(body, bytes):
            length = len(body)
        target = self._target(path, query)
        attempt = 0
        while True:
            resp = self._send(method, target, hdrs, body, length, timeout)  # type: ignore[arg-type]
            if resp.status in expect:
                return resp
            try:
                data = resp.read(64 * 1024)
            except (OSError, http.client.HTTPException):
                data = b""
            finally:
                resp.close()
            err = errors.error_from_response(resp.status, data, _header_map(resp))
            retryable = body is None or isinstance(body, bytes)
            if isinstance(err, errors.RateLimited) and retryable and attempt < self.max_retries:
                attempt += 1
                time.sleep(min(err.retry_after if err.retry_after is not None else 1.0, 10.0))
                continue
            raise err

    def _send(
        self,
        method: str,
        target: str,
        headers: Dict[str, str],
        body: Optional[Body],
        length: Optional[int],
        timeout: Optional[float],
    ) -> http.client.HTTPResponse:
        conn = self._connect(timeout)
        try:
            try:
                conn.putrequest(method, target, skip_accept_encoding=True)
                for k, v in headers.items():
                    conn.putheader(k, v)
                streamed = body is not None and not isinstance(body, bytes)
                if body is not None:
                    if length is None:
                        conn.putheader("Transfer-Encoding", "chunked")
                    else:
                        conn.putheader("Content-Length", str(length))
                    if streamed and not self._https:
                        conn.putheader("Expect", "100-continue")
                elif method in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", "0")
                conn.endheaders()
                if body is not None:
                    if not (streamed and not self._https and _refused_early(conn)):
                        try:
                            _send_body(conn, body, length is None)
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # the server stopped reading: its answer says why
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise errors.ConnectionFailed(
                    "cannot reach sandboxd at %s: %s (is it running? is the URL right?)"
                    % (self.base_url, _describe(e))
                ) from e
        except BaseException:
            conn.close()
            raise
        if not resp.will_close:  # a server that ignored "Connection: close"
            resp.close = _closing(resp.close, conn.close)  # type: ignore[method-assign]
        return resp

    def call(self, method: str, path: str, **kw: Any) -> Any:
        """Send one request and return its decoded JSON body (None for an empty one)."""
        resp = self.open(method, path, **kw)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise errors.ConnectionFailed("reading the answer of %s %s: %s" % (method, path, _describe(e))) from e
        finally:
            resp.close()
        if not data:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise errors.SandboxdError(
                "the answer of %s %s is not JSON: %r" % (method, path, data[:200]),
                code="bad_answer",
                status=resp.status,
            ) from e

    # ---- sandboxes ---------------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """GET /health (no key needed)."""
        return self.call("GET", "/health", auth=False)

    def create_sandbox(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """POST /api/sandbox/create: ``{"sandbox_id", "status", ...}``; status "provisioning"
        (202) means: poll :meth:`get_sandbox` (or use :meth:`wait_ready`)."""
        return self.call("POST", "/api/sandbox/create", json_body=dict(request), expect=(201, 202))

    def get_sandbox(self, sandbox_id: str) -> Dict[str, Any]:
        """GET /api/sandbox/{id}: the whole record, also after it is destroyed."""
        return self.call("GET", _sandbox(sandbox_id))

    def wait_ready(self, sandbox_id: str, timeout: Optional[float] = 300.0) -> Dict[str, Any]:
        """Poll the sandbox until it leaves "provisioning"; returns its record.

        Raises ProvisioningFailed (status "error"), SandboxDestroyed, or WaitTimeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            rec = self.get_sandbox(sandbox_id)
            status = rec.get("status")
            if status in ("ready", "running"):
                return rec
            if status == "error":
                raise errors.ProvisioningFailed(
                    "sandbox %s failed to provision: %s" % (sandbox_id, json.dumps(rec.get("error"))),
                    status=500,
                )
            if status == "destroyed":
                raise errors.SandboxDestroyed(
                    "sandbox %s was destroyed before it was ready" % sandbox_id, status=409
                )
            if deadline is not None and time.monotonic() + delay > deadline:
                raise errors.WaitTimeout("sandbox %s is still %s after %ss" % (sandbox_id, status, timeout))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def list_sandboxes(
        self,
        status: Optional[str] = None,
        agent_id: Optional[str] = None,
        page: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """GET /api/sandbox: ``{"sandboxes": [...], "total", "page"}``, newest first."""
        q = {"status": status, "agent_id": agent_id, "page": page, "limit": limit}
        return self.call("GET", "/api/sandbox", query=q)

    def delete_sandbox(self, sandbox_id: str) -> None:
        """DELETE /api/sandbox/{id} (idempotent)."""
        self.call("DELETE", _sandbox(sandbox_id), expect=(204, 200))

    # ---- runs --------------------------------------------------------------------------------

    def run(
        self,
        sandbox_id: str,
        code: str,
        *,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        async_: bool = False,
        context: Optional[str] = None,
    ) -> Dict[str, Any]:
        """POST /api/sandbox/{id}/run: the finished run object, or with ``async_`` the 202
        answer ``{"run_id", "sandbox_id", "status"}``. ``context``: run in that code context."""
        req: Dict[str, Any] = {"code": code}
        if context:
            req["context"] = context
        if timeout is not None:
            req["timeout"] = timeout
        if env:
            req["env"] = dict(env)
        if async_:
            req["async"] = True
            return self.call("POST", _sandbox(sandbox_id, "run"), json_body=req, expect=(202,))
        # A sync run answers when the run ends, after any runs queued before it: no read timeout.
        return self.call("POST", _sandbox(sandbox_id, "run"), json_body=req, timeout=None)

    def create_context(self, sandbox_id: str) -> Dict[str, Any]:
        """POST /api/sandbox/{id}/contexts: the code context, ready."""
        return self.call("POST", _sandbox(sandbox_id, "contexts"), expect=(201,))

    def list_contexts(self, sandbox_id: str) -> Dict[str, Any]:
        """GET /api/sandbox/{id}/contexts: ``{"contexts": [...], "total"}``, oldest first."""
        return self.call("GET", _sandbox(sandbox_id, "contexts"))

    def get_context(self, sandbox_id: str, context_id: str) -> Dict[str, Any]:
        """GET /api/sandbox/{id}/contexts/{context_id}."""
        return self.call("GET", _sandbox(sandbox_id, "contexts", context_id))

    def delete_context(self, sandbox_id: str, context_id: str) -> None:
        """DELETE /api/sandbox/{id}/contexts/{context_id} (idempotent)."""
        self.call("DELETE", _sandbox(sandbox_id, "contexts", context_id), expect=(204,))

    def get_run(self, sandbox_id: str, run_id: str) -> Dict[str, Any]:
        """GET /api/sandbox/{id}/runs/{run_id}."""
        return self.call("GET", _sandbox(sandbox_id, "runs", run_id))

    def list_runs(self, sandbox_id: str, page: Optional[int] = None, limit: Optional[int] = None) -> Dict[str, Any]:
        """GET /api/sandbox/{id}/runs: ``{"runs": [...], "total", "page"}``, newest first."""
        return self.call("GET", _sandbox(sandbox_id, "runs"), query={"page": page, "limit": limit})

    def cancel_run(self, sandbox_id: str, run_id: str) -> Dict[str, Any]:
        """POST /api/sandbox/{id}/runs/{run_id}/cancel: the run object."""
        return self.call("POST", _sandbox(sandbox_id, "runs", run_id, "cancel"))

    def events(
        self, sandbox_id: str, run_id: str, last_event_id: Optional[str] = None
    ) -> Iterator[SSEEvent]:
        """GET …/runs/{run_id}/events on one connection: yields every event ("stdout", "stderr"
        with JSON ``{"data": text}``, then "end" with the run object) until the server closes it.
        See :meth:`follow` for the reconnecting version."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        resp = self.open(
            "GET", _sandbox(sandbox_id, "runs", run_id, "events"), headers=headers, timeout=self.stream_timeout
        )
        ctype = resp.getheader("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            resp.close()
            raise errors.SandboxdError(
                "the events of run %s came as %r, not text/event-stream" % (run_id, ctype),
                code="bad_answer",
                status=resp.status,
            )
        return read_events(resp, last_event_id)

    def follow(
        self,
        sandbox_id: str,
        run_id: str,
        callback: Optional[Callable[[str, str], Any]] = None,
        last_event_id: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Stream a run's output to ``callback(stream, text)`` ("stdout" or "stderr") until it
        ends; return the final run object. A dropped or silent connection is reopened with
        Last-Event-ID, so nothing is lost or repeated; 5 failures in a row raise the last one."""
        for ev in self.iter_events(sandbox_id, run_id, last_event_id):
            if ev.event in ("stdout", "stderr") and callback is not None:
                callback(ev.event, _chunk_text(ev))
            elif ev.event == "end":
                return json.loads(ev.data)
        raise errors.SandboxdError("the event stream of run %s ended without its end event" % run_id)

    def iter_events(
        self, sandbox_id: str, run_id: str, last_event_id: Optional[str] = None
    ) -> Iterator[SSEEvent]:
        """Every event of a run, across reconnections, up to and including "end".

        A connection silent for ``stream_timeout`` seconds is reopened at once (a run may print
        nothing for minutes; reconnecting proves the server is still there); one that fails or
        ends early is reopened after a short back-off, and 5 such failures in a row without an
        event raise the last error.
        """
        failures = 0
        last: Optional[Exception] = None
        while True:
            if failures:
                if failures >= 5:
                    assert last is not None
                    raise last
                time.sleep(0.1 * (2 ** failures))
            try:
                stream = self.events(sandbox_id, run_id, last_event_id)
            except errors.ConnectionFailed as e:
                failures, last = failures + 1, e
                continue
            except errors.SandboxdError as e:
                if e.status < 500 and not isinstance(e, errors.RateLimited):
                    raise
                failures, last = failures + 1, e
                continue
            progressed = False
            try:
                for ev in stream:
                    progressed = True
                    last_event_id = ev.last_id or last_event_id
                    yield ev
                    if ev.event == "end":
                        return
                last = errors.ConnectionFailed("the event stream of run %s ended before its end event" % run_id)
            except socket.timeout:
                failures = 0  # silent, not broken: reconnect now
                continue
            except (OSError, http.client.HTTPException) as e:
                last = errors.ConnectionFailed("the event stream of run %s broke: %s" % (run_id, _describe(e)))
            finally:
                stream.close()
            failures = 0 if progressed else failures + 1

    # ---- files -------------------------------------------------------------------------------

    def put_file(self, sandbox_id: str, path: str, body: Body, length: Optional[int] = None) -> Dict[str, Any]:
        """PUT /api/sandbox/{id}/files?path=…: stream ``body`` (bytes or a binary file object)
        there and return ``{"path", "size", "sha256"}``. The bytes are hashed on the way and a
        different sha256 from the server raises ChecksumMismatch."""
        hasher = hashlib.sha256()
        if isinstance(body, (bytes, bytearray, memoryview)):
            body = bytes(body)
            hasher.update(body)
            sent: Body = body
        else:
            sent = _HashingReader(body, hasher)
        out = self.call(
            "PUT",
            _sandbox(sandbox_id, "files"),
            query={"path": path},
            body=sent,
            length=length,
            headers={"Content-Type": "application/octet-stream"},
            expect=(201, 200),
        )
        got = hasher.hexdigest()
        if str(out.get("sha256", "")).lower() != got:
            raise errors.ChecksumMismatch(path, str(out.get("sha256")), got)
        return out

    def get_file(
        self, sandbox_id: str, path: str, *, offset: Optional[int] = None, length: Optional[int] = None
    ) -> http.client.HTTPResponse:
        """GET /api/sandbox/{id}/files?path=…: the open response (read it, then close it).

        ``offset``/``length`` ask for a byte range (206). The whole file's sha256 is in the ETag.
        A directory answers with its JSON listing (Content-Type application/json, no ETag).
        """
        headers = {"Accept": "*/*"}
        if offset is not None or length is not None:
            start = offset or 0
            end = "" if length is None else str(start + length - 1)
            headers["Range"] = "bytes=%d-%s" % (start, end)
        return self.open(
            "GET", _sandbox(sandbox_id, "files"), query={"path": path}, headers=headers, expect=(200, 206)
        )

    def list_files(self, sandbox_id: str, path: str) -> Dict[str, Any]:
        """GET …/files?path=<dir>/: ``{"path", "entries": [{"name", "size", "type", "modified_at"}]}``
        (a "/" is appended to ``path`` when missing). NotADirectoryError for a file."""
        if not path.endswith("/"):
            path += "/"
        try:
            resp = self.open("GET", _sandbox(sandbox_id, "files"), query={"path": path})
        except errors.Conflict as e:  # the server: a path ending in "/" that is a file
            raise NotADirectoryError("%s is a file in sandbox %s, not a directory" % (path.rstrip("/"), sandbox_id)) from e
        try:
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            if ctype != "application/json" or resp.getheader("ETag"):
                raise NotADirectoryError("%s is a file in sandbox %s, not a directory" % (path.rstrip("/"), sandbox_id))
            return json.loads(resp.read().decode("utf-8"))
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, NotADirectoryError):
                raise
            raise errors.ConnectionFailed("reading the listing of %s: %s" % (path, _describe(e))) from e
        finally:
            resp.close()

    def delete_file(self, sandbox_id: str, path: str) -> None:
        """DELETE …/files?path=…"""
        self.call("DELETE", _sandbox(sandbox_id, "files"), query={"path": path}, expect=(204, 200))

    # ---- account -----------------------------------------------------------------------------

    def usage(self, from_: Optional[str] = None, to: Optional[str] = None) -> Dict[str, Any]:
        """GET /api/usage (``from_``/``to``: RFC 3339 times or YYYY-MM-DD days)."""
        return self.call("GET", "/api/usage", query={"from": from_, "to": to})

    def audit(
        self,
        sandbox_id: Optional[str] = None,
        type: Optional[str] = None,
        from_: Optional[str] = None,
        to: Optional[str] = None,
        page: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """GET /api/audit: ``{"events": [...], "total", "page"}``, oldest first."""
        q = {"sandbox_id": sandbox_id, "type": type, "from": from_, "to": to, "page": page, "limit": limit}
        return self.call("GET", "/api/audit", query=q)

    def images(self) -> List[Dict[str, Any]]:
        """GET /api/images: the approved images."""
        return self.call("GET", "/api/images").get("images", [])


# ---- helpers -------------------------------------------------------------------------------


def _sandbox(sandbox_id: str, *rest: str) -> str:
    parts = [sandbox_id] + list(rest)
    return "/api/sandbox/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)


def _header_map(resp: http.client.HTTPResponse) -> Dict[str, str]:
    return {k: v for k, v in resp.getheaders()}


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return str(e) or type(e).__name__


def _chunk_text(ev: SSEEvent) -> str:
    try:
        return json.loads(ev.data)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.SandboxdError("a %s event is not {\"data\": text}: %r" % (ev.event, ev.data[:200]), code="bad_answer") from e


def _closing(*closers: Callable[[], None]) -> Callable[[], None]:
    def close() -> None:
        for c in closers:
            c()

    return close


class _HashingReader:
    """A binary reader that hashes what is read through it."""

    def __init__(self, raw: Any, hasher: Any) -> None:
        if not hasattr(raw, "read"):
            raise TypeError("upload body must be bytes or a binary file object, not %s" % type(raw).__name__)
        self._raw = raw
        self._hasher = hasher

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if isinstance(data, str):
            raise TypeError("upload body must be opened in binary mode ('rb')")
        self._hasher.update(data)
        return data


def _refused_early(conn: http.client.HTTPConnection) -> bool:
    """After headers that asked for "100-continue": wait up to a second for the server's first
    answer. True when it is a final answer (the request was refused before its body: don't send
    it); False when it is "100 Continue" or nothing came (send the body)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 1.0)
        if not readable:
            return False
        head = sock.recv(12, socket.MSG_PEEK)
    except (OSError, ValueError):
        return False
    return not (head.startswith(b"HTTP/1.1 100") or head.startswith(b"HTTP/1.0 100"))


def _send_body(conn: http.client.HTTPConnection, body: Body, chunked: bool) -> None:
    if isinstance(body, bytes):
        blocks: Iterator[bytes] = iter([body])
    else:
        blocks = iter(lambda: body.read(_CHUNK), b"")
    for block in blocks:
        if not block:
            continue
        if chunked:
            conn.send(b"%x\r\n" % len(block) + block + b"\r\n")
        else:
            conn.send(block)
    if chunked:
        conn.send(b"0\r\n\r\n")

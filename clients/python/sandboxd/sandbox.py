"""Sandbox, Run and RunHandle: the Sandbox API in the style of its product page."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import posixpath
import re
import tempfile
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

from . import errors
from .client import Body, Client

__all__ = ["Sandbox", "Run", "RunHandle", "Event", "FileEntry", "FileWritten"]

_FINAL = ("completed", "failed", "timeout", "cancelled", "oom", "error")
_CHUNK = 256 * 1024

StreamCallback = Callable[[str, str], Any]


def parse_time(value: Any) -> Optional[datetime.datetime]:
    """An RFC 3339 timestamp of the API ("2026-04-06T14:23:11Z") as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    v = value.strip()
    if v.endswith(("Z", "z")):
        v = v[:-1] + "+00:00"
    # Python < 3.11 takes at most 6 digits of fraction.
    v = re.sub(r"(\.\d{6})\d+", r"\1", v)
    v = re.sub(r"\.(\d{1,5})(?=[+-])", lambda m: "." + m.group(1).ljust(6, "0"), v)
    try:
        return datetime.datetime.fromisoformat(v)
    except ValueError:
        return None


class _Record:
    """An API object: its fields as attributes (times parsed), the JSON itself as ``raw``."""

    _fields: tuple = ()
    _times: tuple = ()

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw: Dict[str, Any] = dict(raw)
        for f in self._fields:
            v = self.raw.get(f)
            if f in self._times:
                v = parse_time(v)
            setattr(self, f, v)

    def __getattr__(self, name: str) -> Any:
        # Fields added to the API later are reachable too.
        raw = self.__dict__.get("raw", {})
        if name in raw:
            return raw[name]
        raise AttributeError("%s has no attribute %r" % (type(self).__name__, name))

    def to_dict(self) -> Dict[str, Any]:
        """The API's JSON object."""
        return dict(self.raw)


class Run(_Record):
    """A run object.

    Attributes: ``run_id`` (also ``id``), ``sandbox_id``, ``status`` (queued, running, completed,
    failed, timeout, cancelled, oom, error), ``exit_code``, ``stdout``, ``stderr``,
    ``stdout_truncated``, ``stderr_truncated``, ``result`` (the value of the code's global
    ``result``), ``error`` (``{"type", "message", "traceback"}`` for an exception, else None),
    ``created_at``, ``started_at``, ``finished_at`` (datetimes), ``duration_ms``, ``usage``
    (``{"cpu_ms", "memory_peak_bytes"}``), ``network`` (``{"allowed", "denied"}``), ``context``
    (the code context it ran in, or None), ``context_reset`` (``{"reason"}`` when its context had
    lost its state and the run started a fresh interpreter, else None), ``display`` (the repr of
    the code's trailing expression, or None), ``outputs`` (rich outputs: ``{"type", "kind",
    "path", "size"}``, each a file to ``download``), ``outputs_truncated``.
    """

    _fields = (
        "run_id",
        "sandbox_id",
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
        "duration_ms",
        "usage",
        "network",
        "context",
        "context_reset",
        "display",
        "outputs",
        "outputs_truncated",
    )
    _times = ("created_at", "started_at", "finished_at")

    @property
    def id(self) -> str:
        return self.run_id

    @property
    def ok(self) -> bool:
        """True when the run completed (exit 0, no exception)."""
        return self.status == "completed"

    @property
    def done(self) -> bool:
        """True when the run is over, whatever its outcome."""
        return self.status in _FINAL

    def raise_for_status(self) -> "Run":
        """Raise :class:`sandboxd.RunFailed` unless the run completed; return the run."""
        if not self.ok:
            raise errors.RunFailed(self)
        return self

    def __repr__(self) -> str:
        return "Run(%s, status=%r, exit_code=%r)" % (self.run_id, self.status, self.exit_code)


class Event:
    """One event of a run's live output: ``type`` "stdout" or "stderr" with ``text``, or
    "end" with the final ``run``. ``id`` is the stream position to resume after it."""

    __slots__ = ("type", "text", "run", "id")

    def __init__(self, type: str, text: str = "", run: Optional[Run] = None, id: Optional[str] = None) -> None:
        self.type = type
        self.text = text
        self.run = run
        self.id = id

    def __repr__(self) -> str:
        if self.type == "end":
            return "Event(end, %r)" % (self.run,)
        return "Event(%s, %r)" % (self.type, self.text)


class RunHandle:
    """A run started with :meth:`Sandbox.run_async` (or found by ID): wait for it, stream its
    output, cancel it."""

    def __init__(self, client: Client, sandbox_id: str, run_id: str, status: str = "queued") -> None:
        self.client = client
        self.sandbox_id = sandbox_id
        self.run_id = run_id
        self.status = status

    @property
    def id(self) -> str:
        return self.run_id

    def refresh(self) -> Run:
        """The run as it is now."""
        run = Run(self.client.get_run(self.sandbox_id, self.run_id))
        self.status = run.status
        return run

    @property
    def done(self) -> bool:
        """Whether the run is over (asks the server unless it was seen over)."""
        return self.status in _FINAL or self.refresh().done

    def wait(self, timeout: Optional[float] = None) -> Run:
        """Block until the run is over and return it (WaitTimeout after ``timeout`` seconds)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.05
        while True:
            run = self.refresh()
            if run.done:
                return run
            if deadline is not None and time.monotonic() + delay > deadline:
                raise errors.WaitTimeout("run %s is still %s after %ss" % (self.run_id, run.status, timeout))
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def cancel(self) -> Run:
        """Kill the run (queued or running); returns it."""
        run = Run(self.client.cancel_run(self.sandbox_id, self.run_id))
        self.status = run.status
        return run

    def events(self, last_event_id: Optional[str] = None) -> Iterator[Event]:
        """The run's output as it is written, then one "end" event with the final run. Works
        during and after the run; reconnects by itself; ``last_event_id`` resumes after an
        event's ``id``."""
        for ev in self.client.iter_events(self.sandbox_id, self.run_id, last_event_id):
            if ev.event in ("stdout", "stderr"):
                yield Event(ev.event, _text(ev.data), id=ev.last_id)
            elif ev.event == "end":
                run = Run(json.loads(ev.data))
                self.status = run.status
                yield Event("end", run=run, id=ev.last_id)
                return

    def stream(self, callback: StreamCallback) -> Run:
        """Call ``callback(stream, text)`` with the output as it is written; return the final run."""
        for ev in self.events():
            if ev.type == "end":
                assert ev.run is not None
                return ev.run
            callback(ev.type, ev.text)
        raise errors.SandboxdError("the event stream of run %s ended without its end event" % self.run_id)

    def __repr__(self) -> str:
        return "RunHandle(%s, sandbox=%s, status=%r)" % (self.run_id, self.sandbox_id, self.status)


def _text(data: str) -> str:
    try:
        return json.loads(data)["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise errors.SandboxdError("an output event is not {\"data\": text}: %r" % data[:200], code="bad_answer") from e


class FileEntry(_Record):
    """An entry of :meth:`Sandbox.files`: ``name``, ``path`` (in the sandbox), ``size``,
    ``type`` ("file", "dir", "symlink" or "other") and ``modified_at``."""

    _fields = ("name", "size", "type", "modified_at")
    _times = ("modified_at",)

    def __init__(self, raw: Mapping[str, Any], directory: str) -> None:
        super().__init__(raw)
        self.path = posixpath.join(directory, self.name or "")

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    def __repr__(self) -> str:
        return "FileEntry(%r, %s, %d bytes)" % (self.path, self.type, self.size or 0)


class FileWritten(_Record):
    """What :meth:`Sandbox.upload` stored: ``path``, ``size``, ``sha256`` (hex)."""

    _fields = ("path", "size", "sha256")

    def __repr__(self) -> str:
        return "FileWritten(%r, %d bytes, sha256=%s)" % (self.path, self.size or 0, self.sha256)


def _run(client: Client, sandbox_id: str, context: Optional[str], code: str, timeout: Optional[int],
         env: Optional[Mapping[str, str]], stream: Optional[StreamCallback]) -> "Run":
    if stream is None:
        return Run(client.run(sandbox_id, code, timeout=timeout, env=env, context=context))
    return _run_async(client, sandbox_id, context, code, timeout, env).stream(stream)


def _run_async(client: Client, sandbox_id: str, context: Optional[str], code: str, timeout: Optional[int],
               env: Optional[Mapping[str, str]]) -> "RunHandle":
    ans = client.run(sandbox_id, code, timeout=timeout, env=env, async_=True, context=context)
    return RunHandle(client, sandbox_id, ans["run_id"], ans.get("status", "queued"))


class CodeContext(_Record):
    """A code context: a long-lived interpreter of a sandbox (``Sandbox.context()``).

    ::

        with sb.context() as ctx:
            ctx.run("import pandas as pd\ndf = pd.read_csv('/workspace/data/sales.csv')")
            print(ctx.run("result = len(df)").result)

    Attributes: ``context_id`` (also ``id``), ``sandbox_id``, ``status`` (ready, reset, deleted),
    ``reset_reason``, ``created_at``, ``deleted_at``, ``runs``. A run whose context had lost its
    state (its interpreter died: ``os._exit``, a crash, the memory limit, code that ignored a
    timeout's interrupt) says so in ``run.context_reset``.
    """

    _fields = ("context_id", "sandbox_id", "status", "reset_reason", "created_at", "deleted_at", "runs")
    _times = ("created_at", "deleted_at")

    def __init__(self, client: Client, sandbox_id: str, raw: Mapping[str, Any]) -> None:
        super().__init__(raw)
        self.client = client
        self._sandbox_id = sandbox_id

    @property
    def id(self) -> str:
        return self.context_id

    def run(self, code: str, timeout: Optional[int] = None, env: Optional[Mapping[str, str]] = None,
            stream: Optional[StreamCallback] = None) -> "Run":
        """Run ``code`` in this context (as ``Sandbox.run``): its globals are the earlier runs'."""
        return _run(self.client, self._sandbox_id, self.context_id, code, timeout, env, stream)

    def run_async(self, code: str, timeout: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> "RunHandle":
        """Queue ``code`` in this context and return at once with a :class:`RunHandle`."""
        return _run_async(self.client, self._sandbox_id, self.context_id, code, timeout, env)

    def refresh(self) -> "CodeContext":
        """Fetch the context's record again; returns self."""
        _Record.__init__(self, self.client.get_context(self._sandbox_id, self.context_id))
        return self

    def delete(self) -> None:
        """End the context's interpreter (idempotent)."""
        self.client.delete_context(self._sandbox_id, self.context_id)
        _Record.__init__(self, dict(self.raw, status="deleted"))

    def __enter__(self) -> "CodeContext":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.delete()
        except errors.SandboxdError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return "CodeContext(%s, status=%r)" % (self.context_id, self.status)


class Sandbox:
    """An isolated environment to run Python in.

    ::

        with Sandbox(mode="container", agent_id="data-processor",
                     filesystem={"read_only": ["/workspace/data"], "read_write": ["/workspace/output"]},
                     resources={"cpu": "0.5", "memory": "512m", "timeout": 300}) as sb:
            run = sb.run("result = 6*7")
            print(run.result)          # 42

    The sandbox is created when the ``with`` block starts (or by :meth:`create`), waiting for it
    to be ready, and deleted when the block ends (or by :meth:`delete`). Settings left out take
    the server's defaults. ``config`` may hold the whole ``config`` object of the API instead
    (the keyword arguments win over it). ``client`` (or ``base_url``/``api_key``) picks the
    server; by default $SANDBOXD_URL and $AGENTCOP_API_KEY / $SANDBOXD_API_KEY.
    """

    def __init__(
        self,
        mode: Optional[str] = None,
        image: Optional[str] = None,
        agent_id: str = "python-sdk",
        filesystem: Optional[Mapping[str, Any]] = None,
        network: Optional[Mapping[str, Any]] = None,
        resources: Optional[Mapping[str, Any]] = None,
        process: Optional[Mapping[str, Any]] = None,
        *,
        config: Optional[Mapping[str, Any]] = None,
        client: Optional[Client] = None,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        ready_timeout: Optional[float] = 300.0,
    ) -> None:
        self.client = client or Client(base_url, api_key)
        self.agent_id = agent_id
        self.mode = mode
        cfg: Dict[str, Any] = dict(config or {})
        for key, value in (
            ("image", image),
            ("filesystem", filesystem),
            ("network", network),
            ("resources", resources),
            ("process", process),
        ):
            if value is not None:
                cfg[key] = dict(value) if isinstance(value, Mapping) else value
        self.config = cfg
        self.ready_timeout = ready_timeout
        self.id: Optional[str] = None
        self.info: Dict[str, Any] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    def create(self) -> "Sandbox":
        """Create the sandbox and wait until it is ready; returns self."""
        if self.id is not None:
            raise errors.SandboxdError("this Sandbox is already created (%s)" % self.id, code="already_created")
        req: Dict[str, Any] = {"agent_id": self.agent_id}
        if self.mode:
            req["mode"] = self.mode
        if self.config:
            req["config"] = self.config
        created = self.client.create_sandbox(req)
        self.id = created["sandbox_id"]
        self.info = dict(created)
        if created.get("status") != "ready":
            try:
                self.info = self.client.wait_ready(self.id, self.ready_timeout)
            except BaseException:
                self._delete_quietly()
                raise
        return self

    def __enter__(self) -> "Sandbox":
        if self.id is None:
            self.create()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.delete()
        else:
            self._delete_quietly()  # don't hide the exception that ended the block

    def _delete_quietly(self) -> None:
        try:
            self.delete()
        except errors.SandboxdError:
            pass

    def delete(self) -> None:
        """Destroy the sandbox now (idempotent). Its record stays, with status "destroyed"."""
        if self.id is not None:
            self.client.delete_sandbox(self.id)
            self.info["status"] = "destroyed"

    def refresh(self) -> "Sandbox":
        """Fetch the sandbox's record (``info``) again; returns self."""
        self.info = self.client.get_sandbox(self._id())
        return self

    @property
    def sandbox_id(self) -> Optional[str]:
        return self.id

    @property
    def status(self) -> Optional[str]:
        """The status last seen (``refresh()`` asks again)."""
        return self.info.get("status")

    @property
    def created_at(self) -> Optional[datetime.datetime]:
        return parse_time(self.info.get("created_at"))

    @property
    def expires_at(self) -> Optional[datetime.datetime]:
        return parse_time(self.info.get("expires_at"))

    def _id(self) -> str:
        if self.id is None:
            raise errors.SandboxdError("the sandbox is not created yet: use `with Sandbox(...)` or .create()", code="not_created")
        return self.id

    @classmethod
    def get(cls, sandbox_id: str, *, client: Optional[Client] = None, base_url: Optional[str] = None, api_key: Optional[str] = None) -> "Sandbox":
        """An existing sandbox (NotFound if there is none). Leaving a ``with`` block deletes it."""
        c = client or Client(base_url, api_key)
        rec = c.get_sandbox(sandbox_id)
        return cls._from_record(rec, c)

    @classmethod
    def _from_record(cls, rec: Mapping[str, Any], client: Client) -> "Sandbox":
        cfg = rec.get("config") if isinstance(rec.get("config"), Mapping) else {}
        sb = cls(mode=rec.get("mode"), agent_id=rec.get("agent_id") or "", config=cfg, client=client)
        sb.id = rec["sandbox_id"]
        sb.info = dict(rec)
        return sb

    @classmethod
    def list(
        cls,
        status: Optional[str] = None,
        agent_id: Optional[str] = None,
        *,
        limit: Optional[int] = None,
        client: Optional[Client] = None,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
    ) -> "List[Sandbox]":
        """The caller's sandboxes, newest first (every page; at most ``limit`` of them)."""
        c = client or Client(base_url, api_key)
        out: "List[Sandbox]" = []
        page = 1
        while True:
            per_page = 500 if limit is None else max(1, min(500, limit - len(out)))
            ans = c.list_sandboxes(status=status, agent_id=agent_id, page=page, limit=per_page)
            recs = ans.get("sandboxes") or []
            out.extend(cls._from_record(r, c) for r in recs)
            if not recs or len(out) >= int(ans.get("total", 0)) or (limit is not None and len(out) >= limit):
                return out[:limit] if limit is not None else out
            page += 1

    def __repr__(self) -> str:
        return "Sandbox(%s, status=%r)" % (self.id or "<not created>", self.status)

    # ---- runs --------------------------------------------------------------------------------

    def run(
        self,
        code: str,
        timeout: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        stream: Optional[StreamCallback] = None,
    ) -> Run:
        """Run ``code`` and return the finished :class:`Run`.

        A run that fails, times out or runs out of memory is returned (see ``run.status``,
        ``run.raise_for_status()``), not raised. ``timeout`` is in seconds (1-600, default 30).
        With ``stream``, ``stream(stream_name, text)`` is called with the output as it is written
        ("stdout" or "stderr"), while the run goes on.
        """
        return _run(self.client, self._id(), None, code, timeout, env, stream)

    def run_async(self, code: str, timeout: Optional[int] = None, env: Optional[Mapping[str, str]] = None) -> RunHandle:
        """Queue ``code`` and return at once with a :class:`RunHandle`."""
        return _run_async(self.client, self._id(), None, code, timeout, env)

    def context(self) -> "CodeContext":
        """A new code context: a long-lived interpreter in this sandbox whose runs share their
        globals, imports, open files and working directory (``ctx.run(code)``). ``with
        sb.context() as ctx:`` deletes it when the block ends."""
        return CodeContext(self.client, self._id(), self.client.create_context(self._id()))

    def contexts(self) -> "List[CodeContext]":
        """This sandbox's code contexts, oldest first (deleted ones too)."""
        ans = self.client.list_contexts(self._id())
        return [CodeContext(self.client, self._id(), c) for c in ans.get("contexts") or []]

    def get_run(self, run_id: str) -> RunHandle:
        """A handle on one of this sandbox's runs (NotFound if there is none)."""
        handle = RunHandle(self.client, self._id(), run_id)
        handle.refresh()
        return handle

    def runs(self, limit: Optional[int] = None) -> "List[Run]":
        """This sandbox's runs, newest first (the first page, or ``limit`` of them)."""
        ans = self.client.list_runs(self._id(), limit=limit)
        return [Run(r) for r in ans.get("runs") or []]

    # ---- files -------------------------------------------------------------------------------

    def upload(self, path: str, src: Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Body]) -> FileWritten:
        """Write a file into the sandbox at ``path`` (inside one of its read_only or read_write
        paths; parents are created). ``src`` is a local file path, bytes, or a binary file
        object; files and streams are sent as they are read, never held in memory whole. The
        SHA-256 the server reports is checked against the bytes sent (ChecksumMismatch).

        To upload text, pass ``text.encode()``: a ``str`` is a local path.
        """
        sid = self._id()
        if isinstance(src, (bytes, bytearray, memoryview)):
            return FileWritten(self.client.put_file(sid, path, bytes(src)))
        if isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                return FileWritten(self.client.put_file(sid, path, f, _remaining(f)))
        return FileWritten(self.client.put_file(sid, path, src, _remaining(src)))

    def download(
        self,
        path: str,
        local_path: Union[None, str, "os.PathLike[str]", Any] = None,
        *,
        offset: Optional[int] = None,
        length: Optional[int] = None,
    ) -> Any:
        """Read the file at ``path`` in the sandbox.

        - ``local_path`` None: returns its bytes.
        - a path (a directory: the file keeps its name): streams it there, through a temporary
          file renamed into place once complete and checked; returns the local path.
        - a binary file object: streams into it; returns the number of bytes written.

        A whole-file download is checked against the SHA-256 in the ETag (ChecksumMismatch).
        ``offset``/``length`` read only that byte range (not checked: the ETag hashes the whole
        file).
        """
        ranged = offset is not None or length is not None
        if local_path is None:
            import io

            buf = io.BytesIO()
            self._download_into(path, buf, offset, length, ranged)
            return buf.getvalue()
        if hasattr(local_path, "write"):
            return self._download_into(path, local_path, offset, length, ranged)
        target = os.fspath(local_path)
        if os.path.isdir(target):
            target = os.path.join(target, posixpath.basename(path.rstrip("/")))
        directory = os.path.dirname(os.path.abspath(target))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".", suffix=".sandboxd", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                self._download_into(path, f, offset, length, ranged)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target

    def _download_into(self, path: str, out: Any, offset: Optional[int], length: Optional[int], ranged: bool) -> int:
        resp = self.client.get_file(self._id(), path, offset=offset, length=length)
        try:
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            etag = resp.getheader("ETag")
            if resp.status == 200 and ctype == "application/json" and not etag:
                raise IsADirectoryError("%s is a directory in sandbox %s: list it with files()" % (path, self.id))
            skip, remaining = 0, None
            if ranged and resp.status == 200:  # the server ignored the range: cut it here
                skip, remaining = offset or 0, length
            hasher = hashlib.sha256()
            n = 0
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                hasher.update(block)
                if skip:
                    cut = min(skip, len(block))
                    block, skip = block[cut:], skip - cut
                if remaining is not None:
                    block = block[:remaining]
                    remaining -= len(block)
                if block:
                    out.write(block)
                    n += len(block)
            want = _etag_sha256(etag)
            if not ranged and want and hasher.hexdigest() != want:
                raise errors.ChecksumMismatch(path, want, hasher.hexdigest())
            return n
        finally:
            resp.close()

    def files(self, path: str = "/") -> "List[FileEntry]":
        """The entries of the directory ``path`` in the sandbox."""
        ans = self.client.list_files(self._id(), path)
        directory = ans.get("path") or path
        return [FileEntry(e, directory) for e in ans.get("entries") or []]

    def delete_file(self, path: str) -> None:
        """Remove the file at ``path`` in the sandbox."""
        self.client.delete_file(self._id(), path)


def _remaining(f: Any) -> Optional[int]:
    """Bytes left in a regular file from its position, or None (then the upload is chunked)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        st = None
    if st is not None:
        import stat

        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            return max(st.st_size - f.tell(), 0)
        except (OSError, ValueError):
            return None
    # In-memory streams (BytesIO) know their size too.
    try:
        pos = f.tell()
        end = f.seek(0, 2)
        f.seek(pos)
        return max(end - pos, 0)
    except (AttributeError, OSError, ValueError):
        return None


def _etag_sha256(etag: Optional[str]) -> Optional[str]:
    if not etag:
        return None
    v = etag.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"').lower()
    if re.fullmatch(r"[0-9a-f]{64}", v):
        return v
    return None

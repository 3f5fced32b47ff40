"""Tests of the SDK against a small fake server in this process: the edge cases a real server
rarely shows (broken streams, corrupted transfers, odd answers). Standard library only."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import threading
import time
import unittest
from unittest import mock
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

import sandboxd
from sandboxd import Client, Sandbox
from sandboxd._sse import read_events


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "FakeServer"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def handle_expect_100(self) -> bool:
        refuse = self.server.refuse_before_body
        if refuse is not None:
            self.server.refused += 1
            self.reply_error(*refuse)
            self.close_connection = True
            return False
        return super().handle_expect_100()

    def do_any(self) -> None:
        u = urlsplit(self.path)
        self.query = {k: v[0] for k, v in parse_qs(u.query).items()}
        self.server.requests.append((self.command, u.path, dict(self.headers)))
        route = self.server.routes.get((self.command, u.path))
        if route is None:
            self.reply_error(404, "not_found", "no route %s %s" % (self.command, u.path))
            return
        route(self)

    do_GET = do_POST = do_PUT = do_DELETE = do_any

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n)

    def reply(self, status: int, obj: Any = None, headers: Optional[Dict[str, str]] = None, raw: Optional[bytes] = None, ctype: str = "application/json") -> None:
        data = raw if raw is not None else (b"" if obj is None else json.dumps(obj).encode())
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if data or status != 204:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply_error(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> None:
        self.reply(status, {"error": code, "message": message, "code": status, "docs": "/docs/errors#" + code}, headers)


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.routes: Dict[Any, Callable[[FakeHandler], None]] = {}
        self.requests: List[Any] = []
        self.refuse_before_body: Optional[tuple] = None
        self.refused = 0
        self.thread = threading.Thread(target=self.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet: clients hang up
        pass

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.server_address[1]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class FakeTestCase(unittest.TestCase):
    def setUp(self) -> None:
        # Independent of the caller's environment (the live tests run with a server's URL and key).
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        for k in ("SANDBOXD_URL", "SANDBOXD_API_KEY", "AGENTCOP_API_KEY"):
            os.environ.pop(k, None)
        self.srv = FakeServer()
        self.addCleanup(self.srv.stop)
        self.client = Client(self.srv.url, "sbxk_test", max_retries=2)

    def route(self, method: str, path: str) -> Callable:
        def deco(fn: Callable[[FakeHandler], None]) -> Callable:
            self.srv.routes[(method, path)] = fn
            return fn

        return deco

    def sandbox(self) -> Sandbox:
        sb = Sandbox(client=self.client)
        sb.id = "sbx_1"
        return sb


class ErrorTests(FakeTestCase):
    def test_codes_map_to_types(self) -> None:
        cases = [
            (400, "invalid_request", sandboxd.InvalidRequest),
            (401, "unauthorized", sandboxd.Unauthorized),
            (403, "image_not_approved", sandboxd.ImageNotApproved),
            (403, "path_not_allowed", sandboxd.PathNotAllowed),
            (404, "not_found", sandboxd.NotFound),
            (409, "sandbox_destroyed", sandboxd.SandboxDestroyed),
            (409, "sandbox_not_ready", sandboxd.SandboxNotReady),
            (413, "payload_too_large", sandboxd.PayloadTooLarge),
            (409, "conflict", sandboxd.Conflict),
            (429, "concurrency_limit", sandboxd.ConcurrencyLimit),
            (429, "run_queue_full", sandboxd.RunQueueFull),
            (400, "unsupported_in_mode", sandboxd.UnsupportedInMode),
            (503, "capacity_exhausted", sandboxd.CapacityExhausted),
            (500, "internal_error", sandboxd.InternalError),
            (418, "brand_new_code", sandboxd.SandboxdError),
        ]
        for status, code, cls in cases:
            with self.subTest(code=code):
                self.srv.routes[("GET", "/api/sandbox/sbx_x")] = lambda h, s=status, c=code: h.reply_error(s, c, "msg " + c, {"Retry-After": "5"})
                with self.assertRaises(cls) as cm:
                    self.client.get_sandbox("sbx_x")
                e = cm.exception
                self.assertIs(type(e), cls)
                self.assertEqual((e.code, e.status, e.message, e.docs, e.retry_after), (code, status, "msg " + code, "/docs/errors#" + code, 5.0))
                self.assertIsInstance(e, sandboxd.SandboxdError)

    def test_not_an_envelope(self) -> None:
        @self.route("GET", "/api/images")
        def _(h: FakeHandler) -> None:
            h.reply(502, raw=b"<html>bad gateway</html>\nmore", ctype="text/html")

        with self.assertRaises(sandboxd.SandboxdError) as cm:
            self.client.images()
        self.assertEqual((cm.exception.code, cm.exception.status, cm.exception.message), ("http_502", 502, "<html>bad gateway</html>"))

    def test_rate_limited_is_retried(self) -> None:
        calls = []

        @self.route("GET", "/api/images")
        def _(h: FakeHandler) -> None:
            calls.append(1)
            if len(calls) < 3:
                h.reply_error(429, "rate_limited", "slow down", {"Retry-After": "0"})
            else:
                h.reply(200, {"images": [{"name": "a"}]})

        self.assertEqual(self.client.images(), [{"name": "a"}])
        self.assertEqual(len(calls), 3)
        calls.clear()
        self.client.max_retries = 1
        with self.assertRaises(sandboxd.RateLimited) as cm:
            self.client.images()
        self.assertEqual(cm.exception.retry_after, 0.0)

    def test_no_key_and_no_server(self) -> None:
        with self.assertRaises(sandboxd.Unauthorized):
            Client(self.srv.url, "").images()
        self.srv.routes[("GET", "/health")] = lambda h: h.reply(200, {"status": "ok"})
        self.assertEqual(Client(self.srv.url, "").health(), {"status": "ok"})  # health needs no key
        url = self.srv.url
        self.srv.stop()
        self.addCleanup(lambda: None)
        with self.assertRaises(sandboxd.ConnectionFailed) as cm:
            Client(url, "k").images()
        self.assertIn("cannot reach sandboxd at " + url, str(cm.exception))
        self.srv = FakeServer()  # for the cleanup

    def test_key_header_and_env(self) -> None:
        self.srv.routes[("GET", "/api/images")] = lambda h: h.reply(200, {"images": []})
        os.environ["SANDBOXD_URL"] = self.srv.url.replace("http://", "")
        os.environ["SANDBOXD_API_KEY"] = "from-env"
        c = Client()
        self.assertEqual(c.base_url, self.srv.url)
        c.images()
        self.assertEqual(self.srv.requests[-1][2].get("X-AgentCop-Key"), "from-env")
        os.environ["AGENTCOP_API_KEY"] = "vendor"
        self.assertEqual(Client().api_key, "vendor")
        self.assertEqual(Client(api_key="arg").api_key, "arg")
        os.environ.pop("SANDBOXD_URL")
        self.assertEqual(Client().base_url, "http://127.0.0.1:8080")


class SandboxTests(FakeTestCase):
    def test_create_waits_for_ready_and_deletes(self) -> None:
        polls = []
        deleted = []

        @self.route("POST", "/api/sandbox/create")
        def _(h: FakeHandler) -> None:
            req = json.loads(h.body())
            self.assertEqual(req, {"agent_id": "a", "mode": "container", "config": {
                "image": "img", "filesystem": {"read_only": ["/d"]}, "resources": {"cpu": "0.5"}}})
            h.reply(202, {"sandbox_id": "sbx_1", "status": "provisioning", "mode": "container"})

        @self.route("GET", "/api/sandbox/sbx_1")
        def _(h: FakeHandler) -> None:
            polls.append(1)
            h.reply(200, {"sandbox_id": "sbx_1", "status": "ready" if len(polls) >= 3 else "provisioning",
                          "created_at": "2026-04-06T14:23:11Z", "expires_at": "2026-04-06T14:53:11.123456789Z"})

        @self.route("DELETE", "/api/sandbox/sbx_1")
        def _(h: FakeHandler) -> None:
            deleted.append(1)
            h.reply(204)

        with Sandbox(mode="container", image="img", agent_id="a", filesystem={"read_only": ["/d"]},
                     resources={"cpu": "0.5"}, client=self.client) as sb:
            self.assertEqual((sb.id, sb.status, len(polls)), ("sbx_1", "ready", 3))
            self.assertEqual(sb.expires_at.microsecond, 123456)
            self.assertEqual(sb.created_at.tzinfo.utcoffset(None).total_seconds(), 0)
        self.assertEqual(deleted, [1])

    def test_provisioning_error(self) -> None:
        self.srv.routes[("POST", "/api/sandbox/create")] = lambda h: h.reply(202, {"sandbox_id": "sbx_1", "status": "provisioning"})
        self.srv.routes[("GET", "/api/sandbox/sbx_1")] = lambda h: h.reply(200, {"sandbox_id": "sbx_1", "status": "error", "error": {"message": "boom"}})
        self.srv.routes[("DELETE", "/api/sandbox/sbx_1")] = lambda h: h.reply(204)
        with self.assertRaises(sandboxd.ProvisioningFailed):
            Sandbox(client=self.client).create()

    def test_exception_in_block_is_not_hidden(self) -> None:
        self.srv.routes[("POST", "/api/sandbox/create")] = lambda h: h.reply(201, {"sandbox_id": "sbx_1", "status": "ready"})
        self.srv.routes[("DELETE", "/api/sandbox/sbx_1")] = lambda h: h.reply_error(500, "internal_error", "x")
        with self.assertRaises(KeyError):
            with Sandbox(client=self.client):
                raise KeyError("mine")

    def test_run_object(self) -> None:
        run = {"run_id": "run_1", "sandbox_id": "sbx_1", "status": "failed", "exit_code": 1, "stdout": "", "stderr": "tb",
               "stdout_truncated": False, "stderr_truncated": False, "result": None,
               "error": {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "tb"},
               "created_at": "2026-04-06T14:23:11.5Z", "started_at": None, "finished_at": "2026-04-06T14:23:12Z",
               "duration_ms": 41, "usage": {"cpu_ms": 38, "memory_peak_bytes": 9}, "network": {"allowed": 0, "denied": 0},
               "future_field": "x"}

        @self.route("POST", "/api/sandbox/sbx_1/run")
        def _(h: FakeHandler) -> None:
            req = json.loads(h.body())
            self.assertEqual(req, {"code": "1/0", "timeout": 5, "env": {"A": "b"}})
            h.reply(200, run)

        r = self.sandbox().run("1/0", timeout=5, env={"A": "b"})
        self.assertEqual((r.id, r.status, r.exit_code, r.error["type"], r.duration_ms, r.usage["cpu_ms"]), ("run_1", "failed", 1, "ZeroDivisionError", 41, 38))
        self.assertEqual(r.created_at.microsecond, 500000)
        self.assertIsNone(r.started_at)
        self.assertEqual(r.future_field, "x")
        self.assertFalse(r.ok)
        self.assertTrue(r.done)
        with self.assertRaises(sandboxd.RunFailed) as cm:
            r.raise_for_status()
        self.assertIn("ZeroDivisionError", str(cm.exception))
        self.assertEqual(r.to_dict(), run)


def sse(events: List[tuple]) -> bytes:
    out = b""
    for ev in events:
        name, ident, data = ev
        if ident:
            out += b"id: " + ident.encode() + b"\n"
        out += b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"
    return out


class EventTests(FakeTestCase):
    def test_parser(self) -> None:
        stream = (b": hello\r\nevent: stdout\r\nid: 3.0\r\ndata: {\"data\": \"a\"}\r\n\r\n"
                  b"retry: 5\nfoo\ndata: x\ndata\ndata:  y\n\n"
                  b"id: 9.9\n\n"
                  b"event: stderr\rdata: z\r\r"
                  b"event: stdout\ndata: cut")
        evs = list(read_events(io.BytesIO(stream)))
        self.assertEqual([(e.event, e.data, e.last_id) for e in evs], [
            ("stdout", '{"data": "a"}', "3.0"), ("message", "x\n\n y", "3.0"), ("stderr", "z", "9.9")])

    def test_follow_resumes_with_last_event_id(self) -> None:
        chunks = [("stdout", "one\n"), ("stderr", "warn\n"), ("stdout", "twö\n"), ("stdout", "three\n")]
        seen_ids: List[Optional[str]] = []

        @self.route("GET", "/api/sandbox/sbx_1/runs/run_1/events")
        def _(h: FakeHandler) -> None:
            last = h.headers.get("Last-Event-ID")
            seen_ids.append(last)
            lo, le = (int(x) for x in last.split(".")) if last else (0, 0)
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.end_headers()
            o = e = 0
            sent = 0
            for stream, text in chunks:
                n = len(text.encode())
                if stream == "stdout":
                    o += n
                else:
                    e += n
                if o <= lo and e <= le:
                    continue
                if len(seen_ids) == 1 and sent == 2:  # the first connection breaks mid-event
                    h.wfile.write(b"event: stdout\nid: %d.%d\ndata: {\"da" % (o, e))
                    h.wfile.flush()
                    h.close_connection = True
                    return
                h.wfile.write(sse([(stream, "%d.%d" % (o, e), {"data": text})]))
                h.wfile.flush()
                sent += 1
            h.wfile.write(b": keep-alive\n\n")
            h.wfile.write(sse([("end", None, {"run_id": "run_1", "status": "completed", "stdout": "one\ntwö\nthree\n"})]))
            h.close_connection = True

        got: List[tuple] = []
        handle = sandboxd.RunHandle(self.client, "sbx_1", "run_1")
        run = handle.stream(lambda s, t: got.append((s, t)))
        self.assertEqual(got, chunks)
        self.assertEqual(seen_ids, [None, "4.5"])
        self.assertEqual((run.status, handle.status), ("completed", "completed"))
        # events() from a given position
        evs = list(handle.events(last_event_id="9.5"))
        self.assertEqual([(e.type, e.text) for e in evs[:-1]], [("stdout", "three\n")])
        self.assertEqual(evs[-1].run.stdout, "one\ntwö\nthree\n")

    def test_silent_stream_is_reopened(self) -> None:
        conns = []

        @self.route("GET", "/api/sandbox/sbx_1/runs/run_1/events")
        def _(h: FakeHandler) -> None:
            conns.append(h.headers.get("Last-Event-ID"))
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.end_headers()
            if len(conns) == 1:
                h.wfile.write(sse([("stdout", "2.0", {"data": "a\n"})]))
            if len(conns) < 8:
                h.wfile.flush()
                time.sleep(0.3)  # silent: longer than the client's stream_timeout
                h.close_connection = True
                return
            h.wfile.write(sse([("end", None, {"run_id": "run_1", "status": "completed"})]))
            h.close_connection = True

        self.client.stream_timeout = 0.1
        got: List[str] = []
        run = sandboxd.RunHandle(self.client, "sbx_1", "run_1").stream(lambda s, t: got.append(t))
        self.assertEqual((run.status, got, len(conns)), ("completed", ["a\n"], 8))
        self.assertEqual(conns[1:], ["2.0"] * 7)

    def test_follow_gives_up(self) -> None:
        self.srv.routes[("GET", "/api/sandbox/sbx_1/runs/run_1/events")] = lambda h: h.reply(200, raw=b"", ctype="text/event-stream")
        start = time.monotonic()
        with self.assertRaises(sandboxd.ConnectionFailed):
            sandboxd.RunHandle(self.client, "sbx_1", "run_1").stream(lambda s, t: None)
        self.assertLess(time.monotonic() - start, 10)
        self.srv.routes.clear()
        with self.assertRaises(sandboxd.NotFound):
            sandboxd.RunHandle(self.client, "sbx_1", "run_1").stream(lambda s, t: None)


class FileTests(FakeTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.stored: Dict[str, bytes] = {}
        self.lie = False

        @self.route("PUT", "/api/sandbox/sbx_1/files")
        def _(h: FakeHandler) -> None:
            data = h.body()
            self.stored[h.query["path"]] = data
            digest = "0" * 64 if self.lie else hashlib.sha256(data).hexdigest()
            h.reply(201, {"path": h.query["path"], "size": len(data), "sha256": digest})

        @self.route("GET", "/api/sandbox/sbx_1/files")
        def _(h: FakeHandler) -> None:
            path = h.query["path"]
            if path.endswith("/") and path.rstrip("/") not in self.stored:  # sandboxd serves a file at "file/"
                h.reply(200, {"path": path, "entries": [{"name": "a.bin", "size": 3, "type": "file", "modified_at": "2026-04-06T14:23:11Z"}]})
                return
            data = self.stored.get(path.rstrip("/"))
            if data is None:
                h.reply_error(404, "not_found", "no file " + path)
                return
            etag = '"%s"' % hashlib.sha256(data).hexdigest()
            if self.lie:
                data = data[:-1] + b"!"
            rng = h.headers.get("Range")
            if rng:
                a, _, b = rng[len("bytes="):].partition("-")
                part = data[int(a): int(b) + 1 if b else None]
                h.reply(206, raw=part, headers={"ETag": etag, "Content-Range": "bytes %s-%d/%d" % (a, int(a) + len(part) - 1, len(data))}, ctype="application/octet-stream")
                return
            h.reply(200, raw=data, headers={"ETag": etag}, ctype="application/octet-stream")

    def test_round_trip_streams(self) -> None:
        sb = self.sandbox()
        data = os.urandom(3 * 1024 * 1024 + 5)
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "src.bin")
            with open(src, "wb") as f:
                f.write(data)
            fw = sb.upload("/workspace/data/src.bin", src)
            self.assertEqual((fw.size, fw.sha256), (len(data), hashlib.sha256(data).hexdigest()))
            put = [r for r in self.srv.requests if r[0] == "PUT"][-1]
            self.assertEqual(put[2].get("Content-Length"), str(len(data)))  # a file: its length, not chunked
            self.assertEqual(put[2].get("Expect"), "100-continue")
            # a non-seekable stream: chunked
            r, w = os.pipe()
            threading.Thread(target=lambda: (os.write(w, b"piped"), os.close(w)), daemon=True).start()
            with os.fdopen(r, "rb") as pipe:
                fw = sb.upload("/workspace/data/p", pipe)
            self.assertEqual(self.stored["/workspace/data/p"], b"piped")
            self.assertEqual([r for r in self.srv.requests if r[0] == "PUT"][-1][2].get("Transfer-Encoding"), "chunked")
            sb.upload("/workspace/data/b", io.BytesIO(b"bytesio"))
            sb.upload("/workspace/data/c", b"")
            self.assertEqual((self.stored["/workspace/data/b"], self.stored["/workspace/data/c"]), (b"bytesio", b""))

            out = sb.download("/workspace/data/src.bin", d)  # a directory: keeps the name
            self.assertEqual(out, os.path.join(d, "src.bin"))
            with open(out, "rb") as f:
                self.assertEqual(f.read(), data)
            self.assertEqual(sb.download("/workspace/data/src.bin"), data)
            buf = io.BytesIO()
            self.assertEqual(sb.download("/workspace/data/src.bin", buf), len(data))
            self.assertEqual(sb.download("/workspace/data/src.bin", offset=10, length=5), data[10:15])
            self.assertEqual(sb.download("/workspace/data/src.bin", offset=len(data) - 3), data[-3:])
            self.assertEqual(sorted(os.listdir(d)), ["src.bin"])  # no temporary file left

    def test_corruption_is_detected(self) -> None:
        sb = self.sandbox()
        self.lie = True
        with self.assertRaises(sandboxd.ChecksumMismatch):
            sb.upload("/workspace/data/x", b"abc")
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(sandboxd.ChecksumMismatch):
                sb.download("/workspace/data/x", os.path.join(d, "x"))
            self.assertEqual(os.listdir(d), [])  # the bad bytes never took the name

    def test_listing_and_errors(self) -> None:
        sb = self.sandbox()
        [e] = sb.files("/workspace/data")
        self.assertEqual((e.name, e.path, e.size, e.is_file, e.modified_at.year), ("a.bin", "/workspace/data/a.bin", 3, True, 2026))
        self.assertEqual(self.srv.requests[-1][1], "/api/sandbox/sbx_1/files")
        with self.assertRaises(IsADirectoryError):
            sb.download("/workspace/data/")
        sb.upload("/workspace/data/f", b"file")
        with self.assertRaises(NotADirectoryError):
            sb.files("/workspace/data/f")
        with self.assertRaises(sandboxd.NotFound):
            sb.download("/workspace/data/missing")

    def test_refusal_before_the_body(self) -> None:
        sb = self.sandbox()
        self.srv.refuse_before_body = (413, "payload_too_large", "too big")
        reads = []

        class Big(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, b: Any) -> int:
                reads.append(len(b))
                b[: len(b)] = b"\0" * len(b)
                return len(b)

        with self.assertRaises(sandboxd.PayloadTooLarge):
            sb.upload("/workspace/data/big", io.BufferedReader(Big()))
        self.assertEqual((self.srv.refused, reads), (1, []))


if __name__ == "__main__":
    unittest.main()

"""Tests of the SDK against a real sandboxd.

They run when SANDBOXD_URL and SANDBOXD_API_KEY name a server (``go test ./clients/python``, part
of ``make test``, starts one and sets them); otherwise they skip, unless SANDBOXD_TEST_LIVE=1
says they must run. The key's account must allow 2 live sandboxes (the Free plan allows 3).
SANDBOXD_TEST_MAX_UPLOAD, when set, is the server's upload limit in bytes (to test 413).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
import time
import unittest
from typing import List, Tuple

import sandboxd
from sandboxd import Client, Sandbox

URL = os.environ.get("SANDBOXD_URL", "")
KEY = os.environ.get("SANDBOXD_API_KEY", "")
REQUIRED = os.environ.get("SANDBOXD_TEST_LIVE") == "1"

if REQUIRED and not (URL and KEY):
    raise RuntimeError("SANDBOXD_TEST_LIVE=1 but SANDBOXD_URL or SANDBOXD_API_KEY is not set")

FS = {"read_only": ["/workspace/data"], "read_write": ["/workspace/out"], "blocked": ["/workspace/out/private"]}


@unittest.skipUnless(URL and KEY, "needs a server: set SANDBOXD_URL and SANDBOXD_API_KEY (go test ./clients/python does)")
class LiveTests(unittest.TestCase):
    sb: Sandbox

    @classmethod
    def setUpClass(cls) -> None:
        cls.client = Client(URL, KEY)
        cls.sb = Sandbox(mode="container", agent_id="sdk-live", filesystem=FS,
                         resources={"cpu": "0.5", "memory": "256m", "timeout": 600}, client=cls.client).create()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.sb.delete()

    def test_context_manager(self) -> None:
        with Sandbox(mode="container", agent_id="sdk-ctx", resources={"timeout": 60}, client=self.client) as sb:
            self.assertEqual(sb.status, "ready")
            self.assertTrue(sb.id.startswith("sbx_"))
            run = sb.run("print('hello')\nresult = 6*7")
            self.assertEqual((run.status, run.exit_code, run.stdout, run.stderr, run.result, run.error),
                             ("completed", 0, "hello\n", "", 42, None))
            self.assertTrue(run.ok)
            self.assertTrue(run.run_id.startswith("run_"))
            self.assertIsNotNone(run.finished_at)
            self.assertIsInstance(run.duration_ms, int)
            self.assertIn("cpu_ms", run.usage)
            self.assertEqual(set(run.network), {"allowed", "denied"})
            failed = sb.run("x = 1\n1/0")
            self.assertEqual((failed.status, failed.exit_code, failed.error["type"]), ("failed", 1, "ZeroDivisionError"))
            self.assertIn("line 2", failed.error["traceback"])
            with self.assertRaises(sandboxd.RunFailed):
                failed.raise_for_status()
            self.assertEqual(sb.run("import os\nresult = os.environ['GREETING']", env={"GREETING": "hi"}).result, "hi")
            self.assertEqual(sb.run("while True: pass", timeout=1).status, "timeout")
            sid = sb.id
        rec = Sandbox.get(sid, client=self.client)
        self.assertEqual(rec.status, "destroyed")
        self.assertEqual(rec.info["destroy_reason"], "deleted")
        self.assertEqual(rec.info["runs"]["total"], 4)
        with self.assertRaises(sandboxd.SandboxDestroyed):
            rec.run("1")

    def test_code_context(self) -> None:
        with self.sb.context() as ctx:
            self.assertTrue(ctx.id.startswith("ctx_"))
            self.assertEqual(ctx.status, "ready")
            self.assertEqual(ctx.run("rows = [1, 2, 3]").status, "completed")
            run = ctx.run("rows.append(4)\nresult = sum(rows)")
            self.assertEqual((run.status, run.result, run.context, run.context_reset), ("completed", 10, ctx.id, None))
            self.assertFalse(self.sb.run("result = 'rows' in globals()").result)
            self.assertEqual(ctx.run("import os\nos._exit(3)").status, "failed")
            self.assertEqual(ctx.refresh().status, "reset")
            run = ctx.run("result = 'rows' in globals()")
            self.assertFalse(run.result)
            self.assertIn("status 3", run.context_reset["reason"])
            self.assertIn(ctx.id, [c.id for c in self.sb.contexts()])
        self.assertEqual(ctx.status, "deleted")
        with self.assertRaises(sandboxd.NotFound):
            ctx.run("1")

    def test_streaming_is_live(self) -> None:
        got: List[Tuple[float, str, str]] = []
        code = "import sys, time\nprint('first', flush=True)\nprint('warn', file=sys.stderr, flush=True)\ntime.sleep(1)\nprint('second')\nresult = 'done'"
        run = self.sb.run(code, stream=lambda stream, text: got.append((time.monotonic(), stream, text)))
        end = time.monotonic()
        self.assertEqual((run.status, run.result, run.stdout, run.stderr), ("completed", "done", "first\nsecond\n", "warn\n"))
        self.assertEqual("".join(t for _, s, t in got if s == "stdout"), "first\nsecond\n")
        self.assertEqual("".join(t for _, s, t in got if s == "stderr"), "warn\n")
        first = next(at for at, s, t in got if "first" in t)
        self.assertLess(first, end - 0.7, "the first output arrived with the end of the run: not streamed")

    def test_async_wait_cancel_events(self) -> None:
        handle = self.sb.run_async("import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)\nresult = 'ok'")
        self.assertTrue(handle.run_id.startswith("run_"))
        run = handle.wait(timeout=60)
        self.assertEqual((run.status, run.stdout, run.result, handle.done), ("completed", "0\n1\n2\n", "ok", True))
        # events() after the end: the whole output again, then the run.
        evs = list(handle.events())
        self.assertEqual("".join(e.text for e in evs if e.type == "stdout"), "0\n1\n2\n")
        self.assertEqual((evs[-1].type, evs[-1].run.run_id), ("end", run.run_id))
        # resume after the first event
        rest = list(handle.events(last_event_id=evs[0].id))
        self.assertEqual("".join(e.text for e in rest if e.type == "stdout"), "0\n1\n2\n"[len(evs[0].text):])

        slow = self.sb.run_async("import time\ntime.sleep(60)", timeout=120)
        time.sleep(0.3)
        cancelled = slow.cancel()
        self.assertIn(cancelled.status, ("cancelled", "running"))
        self.assertEqual(slow.wait(timeout=30).status, "cancelled")
        self.assertIn(run.run_id, [r.run_id for r in self.sb.runs()])
        self.assertEqual(self.sb.get_run(run.run_id).refresh().result, "ok")

    def test_files_round_trip(self) -> None:
        data = os.urandom(5 * 1024 * 1024 // 2 + 3)  # under the test server's 4 MiB limit
        digest = hashlib.sha256(data).hexdigest()
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "input.bin")
            with open(src, "wb") as f:
                f.write(data)
            fw = self.sb.upload("/workspace/data/in/input.bin", src)
            self.assertEqual((fw.path, fw.size, fw.sha256), ("/workspace/data/in/input.bin", len(data), digest))
            run = self.sb.run("import hashlib\nb = open('/workspace/data/in/input.bin','rb').read()\n"
                              "open('/workspace/out/copy.bin','wb').write(b)\nresult = hashlib.sha256(b).hexdigest()")
            self.assertEqual(run.result, digest)
            local = self.sb.download("/workspace/out/copy.bin", d + "/out.bin")
            with open(local, "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)
            self.assertEqual(self.sb.download("/workspace/out/copy.bin", offset=100, length=10), data[100:110])
            self.assertEqual(self.sb.upload("/workspace/out/t.txt", "héllo".encode()).size, 6)
            self.assertEqual(self.sb.download("/workspace/out/t.txt"), "héllo".encode())

        names = {e.name: e for e in self.sb.files("/workspace/out")}
        self.assertEqual(names["copy.bin"].size, len(data))
        self.assertEqual(names["copy.bin"].type, "file")
        self.assertTrue(self.sb.files("/workspace/data")[0].is_dir)
        with self.assertRaises(IsADirectoryError):
            self.sb.download("/workspace/out")
        with self.assertRaises(NotADirectoryError):
            self.sb.files("/workspace/out/t.txt")
        with self.assertRaises(sandboxd.Conflict):
            self.sb.upload("/workspace/out/t.txt/under", b"x")
        self.sb.delete_file("/workspace/out/t.txt")
        with self.assertRaises(sandboxd.NotFound):
            self.sb.download("/workspace/out/t.txt")

        max_upload = int(os.environ.get("SANDBOXD_TEST_MAX_UPLOAD") or 0)
        if max_upload:
            with tempfile.TemporaryFile() as big:
                big.truncate(max_upload + 1)
                with self.assertRaises(sandboxd.PayloadTooLarge):
                    self.sb.upload("/workspace/out/big.bin", big)
            r, w = os.pipe()

            def feed() -> None:
                try:
                    chunk = b"x" * 65536
                    for _ in range(max_upload // len(chunk) + 2):
                        os.write(w, chunk)
                except OSError:
                    pass
                finally:
                    os.close(w)

            threading.Thread(target=feed, daemon=True).start()
            with os.fdopen(r, "rb") as pipe:  # no length known: chunked, cut by the server
                with self.assertRaises(sandboxd.PayloadTooLarge):
                    self.sb.upload("/workspace/out/big.bin", pipe)

    def test_listing(self) -> None:
        mine = [s for s in Sandbox.list(agent_id="sdk-live", client=self.client)]
        self.assertIn(self.sb.id, [s.id for s in mine])
        self.assertTrue(all(s.info["agent_id"] == "sdk-live" for s in mine))
        again = Sandbox.get(self.sb.id, client=self.client)
        self.assertEqual((again.status, again.config["filesystem"]["read_only"]), ("ready", ["/workspace/data"]))
        self.assertLessEqual(len(Sandbox.list(limit=1, client=self.client)), 1)

    def test_readme_example(self) -> None:
        readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        example = text.split("```python\n", 1)[1].split("```", 1)[0]
        old = os.getcwd()
        with tempfile.TemporaryDirectory() as d:
            os.chdir(d)
            try:
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
                with open("report.json") as f:
                    self.assertEqual(json.load(f), {"total": 200})
            finally:
                os.chdir(old)
        self.assertEqual(out.getvalue(), "rows: 2\ncompleted {'rows': 2, 'total': 200}\n")

    def test_typed_errors(self) -> None:
        with self.assertRaises(sandboxd.ImageNotApproved) as cm:
            Sandbox(image="not/approved:1", client=self.client).create()
        self.assertEqual((cm.exception.status, cm.exception.code), (403, "image_not_approved"))
        with self.assertRaises(sandboxd.NotFound):
            Sandbox.get("sbx_doesnotexist", client=self.client)
        with self.assertRaises(sandboxd.Unauthorized):
            Sandbox.list(client=Client(URL, "sbxk_wrong"))
        with self.assertRaises(sandboxd.InvalidRequest):
            Sandbox(resources={"timeout": 99999}, client=self.client).create()
        for path in ("/etc/passwd", "/workspace/out/private/x", "/workspace/out/../../etc/x", "/tmp/x"):
            with self.subTest(path=path):
                with self.assertRaises(sandboxd.PathNotAllowed):
                    self.sb.upload(path, b"x")
        with self.assertRaises(sandboxd.PathNotAllowed):
            self.sb.download("/etc/passwd")


if __name__ == "__main__":
    unittest.main()

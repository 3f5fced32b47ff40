# The in-sandbox runner: executes one run's code and reports `result` and the uncaught exception.
# Every driver runs this file (package pyrunner embeds it), so the semantics below are the same in
# every mode. It is started as `python -I -u -B -c BOOTSTRAP <runner-len> <limit> [<code> <result>]`
# where BOOTSTRAP reads and executes this file; then:
#
#   code:   the user's code. Default: the rest of fd 3 after this file (sandbox-agent writes this
#           file followed by the code to fd 3). With argv[3]: the file of that name, read whole
#           (WASI has no inherited descriptors beyond stdio; the wasm driver serves these files).
#   result: one JSON object written at the end. Default: fd 4. With argv[4]: the file of that name,
#           opened before the code runs.
#   agent:  the agent channel of the run's `agent` object (see _sandbox_agent and agent.go). Default:
#           fd 6. With argv[5]: the file of that name, opened before the code runs.
#     {"result": <JSON of the global `result`, or its repr() as a JSON string>,
#      "error": {"type", "message", "traceback"}}   (either key may be absent).
#
# The code runs as a fresh __main__ module, compiled with filename "<run>". Uncaught exception:
# traceback to stderr (via sys.excepthook), error in the JSON, exit 1. SystemExit: exit like Python,
# not an error. KeyboardInterrupt: reported as an error, then exit by SIGINT, like Python (130
# where there are no signals, as Python does).
# A `result` whose JSON is longer than <limit> is replaced by a string saying it was omitted.
#
# The process ends as Python's own exit would — non-daemon threads joined, atexit handlers run,
# what the code's globals hold finalised (unclosed files flushed, __del__), stdio flushed, Python's
# exit status — but by os._exit, skipping the interpreter's teardown of every module (half of a
# print(1) run's time in the process); objects only other modules hold are not finalised, which
# Python does not promise either.
#
# The runner avoids imports on the success path (json costs ~6 ms at start-up); modules it needs
# later are imported with the start-up sys.path, so files in the working directory cannot shadow them.
import sys, os


def _sandbox_run():
    limit = int(sys.argv[2])
    imp = _importer(list(sys.path))

    code_src = sys.argv[3] if len(sys.argv) > 3 else 3
    if len(sys.argv) > 4:
        res_fd = os.open(sys.argv[4], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    else:
        res_fd = 4
        try:
            os.set_inheritable(4, False)
        except OSError:
            pass
    if type(code_src) is int:
        src = _read_all(code_src)  # no file object: fewer pages written than open().read()
    else:
        with open(code_src, "rb") as f:
            src = f.read()
    agent_globals, _ = _sandbox_agent(sys.argv[5] if len(sys.argv) > 5 else 6, imp, globals().pop("_agent_pre", None))

    builtins = sys.modules["builtins"]
    old_main = sys.modules.get("__main__")
    mod = type(sys)("__main__")
    g = mod.__dict__
    g["__builtins__"] = builtins
    g.update(agent_globals)
    sys.modules["__main__"] = mod
    sys.argv[:] = ["-c"]
    # Unlike `python -c`, the working directory is not on sys.path: no directory a run can write
    # is, so nothing a run leaves behind can shadow a module a later run imports.

    # What start-up made is never garbage: the collector stops looking at it (gc.freeze), so its
    # collections — during the run and the one at exit (see _leave) — see only what the run made.
    import gc
    gc.freeze()
    del gc
    # A crash in C code (SIGSEGV, SIGABRT, …) prints the Python stack it happened in to stderr,
    # where the run's report would otherwise say nothing (faulthandler is built in: no import).
    try:
        import faulthandler
        faulthandler.enable()
        del faulthandler
    except Exception:
        pass

    exc, exit_arg, payload = _execute(src, g, limit, imp)
    try:
        while payload:
            n = os.write(res_fd, payload)
            payload = payload[n:]
    except OSError:
        pass
    try:
        os.close(res_fd)
    except OSError:
        pass

    _flush()
    del old_main

    if exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            try:
                import _signal
                _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
                os.kill(os.getpid(), _signal.SIGINT)
            except BaseException:
                pass
            sys.exit(130)
        _leave(1, g)
    _leave(exit_arg, g)


def _read_all(fd):
    """The bytes of descriptor fd to its end; fd is closed."""
    parts = []
    while True:
        c = os.read(fd, 1 << 20)
        if not c:
            break
        parts.append(c)
    os.close(fd)
    return b"".join(parts)


def _importer(std_path):
    """imp(name): the module, imported with the start-up sys.path (std_path), so that files in
    the working directory cannot shadow it."""
    def imp(name):
        m = sys.modules.get(name)
        if m is not None:
            return m
        saved = sys.path[:]
        sys.path[:] = std_path
        try:
            __import__(name)
        finally:
            sys.path[:] = saved
        return sys.modules[name]
    return imp


# _live[0] is true while user code runs: a context's SIGINT handler raises KeyboardInterrupt only then.
_live = [False]


def _execute(src, g, limit, imp):
    """Runs src (bytes) in the globals g; returns (the uncaught exception or None, SystemExit's
    argument, the JSON report as bytes)."""
    exc = None
    exit_arg = 0
    rich = _Rich(imp)
    try:
        d = g.get("display")
        if d is None or getattr(d, "_sandbox_display", False):
            g["display"] = rich.display
    except BaseException:
        pass
    shown = None
    try:
        try:
            code, last = _split_last(src)
            _live[0] = True
            exec(code, g)
            if last is not None:
                shown = eval(last, g)
        except SystemExit as e:
            exit_arg = e.code
        except BaseException as e:
            tb = e.__traceback__
            while tb is not None and tb.tb_frame.f_code in (_execute.__code__, _split_last.__code__):
                tb = tb.tb_next  # drop the runner's own frames
            exc = e.with_traceback(tb)
        # Rendering runs the code's own methods (__repr__, _repr_*_, savefig): it stays
        # interruptible in a context (a timeout's SIGINT), which add() and figures() absorb.
        try:
            if exc is None:
                rich.trailing(shown)
            rich.figures()
        except BaseException:
            pass
    finally:
        _live[0] = False

    doc = []
    rich.report(doc)
    # result
    try:
        rv = g.get("result")
    except BaseException:
        rv = None
    if rv is not None:
        doc.append('"result":' + _encode(rv, limit, imp))

    if exc is not None:
        err = _format_error(exc, src, imp)
        try:
            json = imp("json")
            doc.append('"error":' + json.dumps(err))
        except BaseException:
            pass

    return exc, exit_arg, ("{" + ",".join(doc) + "}").encode("utf-8", "surrogatepass")


def _split_last(src):
    """(the code object of src, or of src without its last statement when that is an expression;
    that expression's code object for eval, or None). Found without the ast module (~2 ms to
    import): the last lines of src, from a line that is not indented, compile as an expression and
    the lines before them as statements; else src compiles whole (a syntax error is raised here)."""
    try:
        text = src.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not text.startswith("\ufeff"):
        lines = text.splitlines(True)
        end = len(lines)
        while end and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
            end -= 1
        for k in range(end - 1, max(end - 40, 0) - 1, -1):
            first = lines[k][:1]
            if first in (" ", "\t", "#", ")", "]", "}", "\n", "\r", "@") or not first:
                continue
            tail = "".join(lines[k:end])
            try:
                last = compile("\n" * k + tail, "<run>", "eval", dont_inherit=True)
            except SyntaxError:
                continue
            except BaseException:
                break
            try:
                head = compile("".join(lines[:k]), "<run>", "exec", dont_inherit=True)
            except BaseException:
                break
            return head, last
    return compile(src, "<run>", "exec", dont_inherit=True), None


# Limits of a run's rich outputs (package pyrunner, rich.go, holds the host's own, which it
# enforces whatever this says): items, bytes in all (binary before base64, text in UTF-8), and
# what they take in the report (base64, JSON escapes): the report must stay under the cap of
# its reader (rich.go, MaxReportExtra), else it is dropped whole, `result` and error with it.
# The display's JSON is at most _MAX_DISPLAY bytes.
_MAX_OUTPUTS = 32
_MAX_OUTPUT_BYTES = 8 << 20
_MAX_OUTPUT_JSON = 12 << 20
_MAX_DISPLAY = 1 << 20
# MIME types of _repr_*_ methods, richest first; a value with none of them is text/plain (repr).
_REPRS = (("_repr_png_", "image/png"), ("_repr_jpeg_", "image/jpeg"), ("_repr_svg_", "image/svg+xml"),
          ("_repr_html_", "text/html"), ("_repr_markdown_", "text/markdown"), ("_repr_json_", "application/json"))


class _Rich:
    """A run's rich outputs: display(obj) items, the trailing expression's value, matplotlib's
    open figures; reported as "display" (the trailing value's repr) and "outputs" (items of
    {"type", "kind", "data": text, or base64 for image/png and image/jpeg}), "outputs_truncated"."""

    def __init__(self, imp):
        self.imp = imp
        self.items = []
        self.size = 0
        self.encoded = 0
        self.figs = []  # the figures shown (display(fig), a trailing fig): not shown again at the end
        self.truncated = False
        self.shown = None
        rich = self

        def display(*objs):
            """Shows each object as a rich output of the run (its _repr_html_, _repr_png_, … or
            its repr), as Jupyter's display() does; matplotlib figures as PNG."""
            for o in objs:
                rich.add(o, "display", True)
        display._sandbox_display = True
        self.display = display

    def put(self, mime, data, kind):
        if type(data) is bytes:
            n, enc = len(data), (len(data) + 2) // 3 * 4
        else:
            n = len(data.encode("utf-8", "surrogatepass"))
            enc = len(self.imp("json").dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if (len(self.items) >= _MAX_OUTPUTS or self.size + n > _MAX_OUTPUT_BYTES
                or self.encoded + enc > _MAX_OUTPUT_JSON):
            self.truncated = True
            return
        self.size += n
        self.encoded += enc
        self.items.append((mime, kind, data))

    def form(self, obj):
        """(MIME type, data: str or bytes) of obj's richest form, or None."""
        mods = sys.modules
        mpl = mods.get("matplotlib.figure")
        if mpl is not None and isinstance(obj, mpl.Figure):
            self.figs.append(obj)
            return "image/png", self.png(obj)
        for meth, mime in _REPRS:
            try:
                f = getattr(obj, meth, None)
            except BaseException:
                f = None
            if f is None or isinstance(obj, type):
                continue
            try:
                data = f()
            except BaseException:
                continue
            if type(data) is tuple and data:
                data = data[0]  # (data, metadata)
            if data is None:
                continue
            if mime == "application/json":
                try:
                    data = self.imp("json").dumps(data, allow_nan=False)
                except BaseException:
                    continue
            elif mime in ("image/png", "image/jpeg") and type(data) is str:
                try:
                    data = self.imp("binascii").a2b_base64(data)
                except BaseException:
                    continue
            if type(data) is bytes and mime in ("image/png", "image/jpeg") or type(data) is str:
                return mime, data
        return None

    def png(self, fig):
        io = self.imp("io")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()

    def add(self, obj, kind, plain):
        try:
            f = self.form(obj)
            if f is None and plain:
                f = "text/plain", _repr(obj)
            if f is not None:
                self.put(f[0], f[1], kind)
        except BaseException:
            pass

    def trailing(self, value):
        """The value of the code's trailing expression: its repr is the report's "display" (None
        is not shown), its rich form an output of kind "result"."""
        if value is None:
            return
        self.shown = _repr(value)
        self.add(value, "result", False)

    def figures(self):
        """matplotlib's open figures become PNG outputs and are closed — only if the code
        imported pyplot (never imported here)."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        try:
            nums = plt.get_fignums()
            for n in nums:
                try:
                    fig = plt.figure(n)
                    if not any(fig is f for f in self.figs):
                        self.put("image/png", self.png(fig), "figure")
                except BaseException:
                    pass
            if nums:
                plt.close("all")
        except BaseException:
            pass

    def report(self, doc):
        if self.shown is None and not self.items and not self.truncated:
            return
        try:
            json = self.imp("json")
            if self.shown is not None:
                s = self.shown[:_MAX_DISPLAY]
                d = json.dumps(s, ensure_ascii=False)
                while len(d.encode("utf-8", "surrogatepass")) > _MAX_DISPLAY:
                    s = s[:len(s) * 3 // 4]
                    d = json.dumps(s, ensure_ascii=False)
                doc.append('"display":' + d)
            if self.items:
                b64 = self.imp("binascii").b2a_base64
                out = []
                for mime, kind, data in self.items:
                    if type(data) is bytes:
                        data = b64(data, newline=False).decode("ascii")
                    out.append({"type": mime, "kind": kind, "data": data})
                doc.append('"outputs":' + json.dumps(out, ensure_ascii=False))
            if self.truncated:
                doc.append('"outputs_truncated":true')
        except BaseException:
            pass


def _repr(v):
    try:
        r = repr(v)
        if type(r) is not str:
            raise TypeError
        return r
    except BaseException:
        return "<unrepresentable %s object>" % _type_name(type(v))


def _exit_status(arg):
    """The exit status of `raise SystemExit(arg)` (a non-int argument is printed to stderr)."""
    if arg is None:
        return 0
    if isinstance(arg, int):
        return arg if -(1 << 31) <= arg < (1 << 31) else -1
    try:
        sys.stderr.write(str(arg) + "\n")
    except BaseException:
        pass
    return 1


# The agent exceptions, made once per process: in a code context every run gets its own `agent`,
# but `except AgentCallError` must catch what an object kept from an earlier run raises.
_agent_error_classes = []


def _agent_errors():
    if _agent_error_classes:
        return _agent_error_classes

    class AgentCallError(Exception):
        """agent.run or agent.call got no answer; status: the endpoint's HTTP status, or None."""
        __module__, __qualname__ = "builtins", "AgentCallError"

        def __init__(self, message, status=None):
            Exception.__init__(self, message)
            self.status = status

    class AgentNotConfigured(AgentCallError):
        """The operator configured no endpoint for this sandbox's agent_id."""
        __module__, __qualname__ = "builtins", "AgentNotConfigured"

    _agent_error_classes[:] = [AgentCallError, AgentNotConfigured]
    return _agent_error_classes


def _agent_type():
    """A class Agent and its cell [info, call] that _sandbox_agent fills in: what the run's
    `agent` answers (info: agent_id, sandbox_id, run_id) and how it calls (call)."""
    cur = [("", "", ""), None]

    class Agent:
        """The agent this sandbox runs for (its agent_id) and a way to it: agent.run(task, **kw),
        agent.call(tool, **kw), answered by the endpoint the operator configured for it."""
        __module__, __qualname__, __slots__ = "builtins", "Agent", ()
        id = property(lambda self: cur[0][0], doc="the sandbox's agent_id")
        sandbox_id = property(lambda self: cur[0][1], doc="the sandbox's id")
        run_id = property(lambda self: cur[0][2], doc="this run's id")

        def run(self, task, **kwargs):
            """Ask the agent's endpoint to run task (a str); returns its JSON answer, decoded."""
            return cur[1]("run", "task", task, kwargs)

        def call(self, tool, **kwargs):
            """Call tool (a name) at the agent's endpoint; returns its JSON answer, decoded."""
            return cur[1]("call", "tool", tool, kwargs)

        def __repr__(self):
            return "<agent %r sandbox=%r run=%r>" % cur[0]

    return Agent, cur


def _sandbox_agent(chan, imp, pre=None):
    """The globals `agent`, `AgentCallError` and `AgentNotConfigured` of a run (API.md §3).

    agent.id, agent.sandbox_id and agent.run_id say who the run is; agent.run(task, **kw) and
    agent.call(tool, **kw) send one JSON request line on the agent channel (chan: a descriptor, or
    the name of a file to open) and return the JSON answer, decoded; the host forwards the request
    to the endpoint the operator configured for the sandbox's agent_id (package pyrunner, agent.go,
    has the channel's lines and limits). A call that gets no answer raises AgentCallError (its
    `status`: the endpoint's HTTP status, else None or the channel's own 400/413/429), or
    AgentNotConfigured when the operator configured no endpoint for the agent_id. Calls are made
    one at a time (a lock), from the run's own process only: a forked child shares the channel's
    descriptor, and its calls would interleave with the parent's, so they are refused.

    pre is what _agent_type() returned, made before this process was forked (a zygote's: a fresh
    run's process, which serves one run), so that no class is built per run; else (a context's
    runs, a launched process) each call builds its own, and an `agent` kept from an earlier run
    of a context still answers as that run's.
    """
    import _thread

    fd, info = -1, ("", "", "")
    try:
        if type(chan) is str:
            fd = os.open(chan, os.O_RDWR)
        else:
            os.set_inheritable(chan, False)
            fd = chan
        hello = b""
        while not hello.endswith(b"\n") and len(hello) < 4096:
            c = os.read(fd, 4096 - len(hello))
            if not c:
                break
            hello += c
        parts = hello[:-1].decode("utf-8", "replace").split("\t")
        if len(parts) == 3:
            info = tuple(parts)
    except OSError:
        if fd >= 0:
            try:
                os.close(fd)  # a context's interpreter lives on: no descriptor left per run
            except OSError:
                pass
        fd = -1

    AgentCallError, AgentNotConfigured = _agent_errors()

    lock = _thread.allocate_lock()
    owner = os.getpid()
    state = [fd, False]  # the channel (-1: taken by a call, or none), closed (the run is over)
    max_request, max_answer = 1 << 20, (8 << 20) + (64 << 10)  # agent.go's limits

    def exchange(req):
        # One request line out, one answer line back; a channel left mid-line is not used again.
        fd = state[0]
        if fd < 0 or state[1]:
            raise AgentCallError("this run has no agent channel (closed, broken, or its run is over)")
        state[0] = -1
        try:
            while req:
                req = req[os.write(fd, req):]
            parts, n = [], 0
            while True:
                c = os.read(fd, 1 << 16)
                if not c:
                    raise AgentCallError("the agent channel was closed before its answer")
                parts.append(c)
                n += len(c)
                if c.endswith(b"\n"):
                    break
                if n > max_answer:
                    raise AgentCallError("the agent channel's answer is over its limit")
        except BaseException as e:
            try:
                os.close(fd)  # a channel left mid-line is not used again
            except OSError:
                pass
            if isinstance(e, OSError):
                raise AgentCallError("the agent channel failed: %s" % e) from None
            raise
        if state[1]:
            try:
                os.close(fd)  # its run ended during the call (a thread of a context's run)
            except OSError:
                pass
        else:
            state[0] = fd
        return b"".join(parts)

    def call(method, key, name, args):
        if type(name) is not str:
            raise TypeError("agent.%s: the %s must be a str, not %s" % (method, key, type(name).__name__))
        with lock:  # the import too: another thread could see the module half made
            json = imp("json")
        try:
            req = json.dumps({"method": method, key: name, "args": args}, allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as e:
            raise TypeError("agent.%s: the keyword arguments must be JSON-serialisable: %s" % (method, e)) from None
        if len(req) - 1 > max_request:
            raise AgentCallError("agent.%s: the request is %d bytes of JSON, over the 1 MiB limit" % (method, len(req) - 1), 413)
        if os.getpid() != owner:
            raise AgentCallError("agent.%s: only the run's own process makes agent calls, not a process it forked" % method)
        with lock:
            ans = exchange(req)
        try:
            doc = json.loads(ans)
            ok, err = doc.get("ok"), doc.get("error")
        except Exception:
            raise AgentCallError("agent.%s: an answer that is not JSON came on the agent channel" % method) from None
        if ok is True:
            return doc.get("result")
        typ = AgentNotConfigured if err == "AgentNotConfigured" else AgentCallError
        status = doc.get("status")
        raise typ(str(doc.get("message")), status if type(status) is int else None)

    Agent, cur = pre if pre is not None else _agent_type()
    cur[0], cur[1] = info, call

    def close():
        # The run is over (a context's: its interpreter lives on): this object's channel is closed
        # and never used again — its number may be reused by a later run's file.
        state[1] = True
        fd, state[0] = state[0], -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    return {"agent": Agent(), "AgentCallError": AgentCallError, "AgentNotConfigured": AgentNotConfigured}, close


def _flush():
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            s.flush()
        except BaseException:
            pass


def _leave(arg, g):
    """Ends the process as `raise SystemExit(arg)` at the top level would: non-daemon threads
    joined, atexit handlers run, what the program's globals still hold finalised (files it did not
    close are flushed, __del__ runs), stdio flushed, the same exit status — then os._exit, without
    the interpreter's own teardown of every module (~1.5 ms of a print(1) run's ~3)."""
    code = _exit_status(arg)
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
    except BaseException:
        pass
    try:
        import atexit
        atexit._run_exitfuncs()
    except BaseException:
        pass
    try:
        g.clear()
        import gc
        gc.collect()
    except BaseException:
        pass
    _flush()
    os._exit(code)


def _encode(v, limit, imp):
    """JSON text for v: its JSON if json.dumps works, else its repr() as a JSON string."""
    s = None
    if v is True:
        s = "true"
    elif v is False:
        s = "false"
    elif type(v) is int:
        try:
            s = str(v)
        except BaseException:
            s = None
    if s is None:
        try:
            json = imp("json")
        except BaseException:
            return "null"
        try:
            s = json.dumps(v, allow_nan=False)
        except BaseException:
            try:
                r = repr(v)
                if type(r) is not str:
                    raise TypeError
            except BaseException:
                r = "<unrepresentable %s object>" % _type_name(type(v))
            if len(r) > limit:
                r = r[:limit]
            s = json.dumps(r)
    if len(s) > limit:
        try:
            json = imp("json")
            s = json.dumps("<result omitted: %d bytes of JSON exceed the %d-byte limit>" % (len(s), limit))
        except BaseException:
            s = "null"
    return s


def _type_name(t):
    try:
        mod = t.__module__
        name = t.__qualname__
    except BaseException:
        return "?"
    if mod in ("builtins", "__main__") or not isinstance(mod, str):
        return name
    return mod + "." + name


def _format_error(exc, src, imp):
    t = type(exc)
    tb = exc.__traceback__
    try:
        if isinstance(exc, SyntaxError) and isinstance(exc.msg, str):
            msg = exc.msg
        else:
            msg = str(exc)
    except BaseException:
        msg = "<exception str() failed>"
    text = ""
    try:
        linecache = imp("linecache")
        lines = src.decode("utf-8", "replace").splitlines(True)
        linecache.cache["<run>"] = (len(src), None, lines, "<run>")
        traceback = imp("traceback")
        text = "".join(traceback.format_exception(t, exc, tb))
    except BaseException:
        pass
    # Print it like Python would: through sys.excepthook, unless it is the default one.
    try:
        hook = sys.excepthook
        if hook is sys.__excepthook__ and text:
            sys.stderr.write(text)
        else:
            hook(t, exc, tb)
    except BaseException:
        try:
            sys.__excepthook__(t, exc, tb)
        except BaseException:
            pass
    cap = 256 << 10
    return {"type": _type_name(t), "message": msg[:cap], "traceback": text[-cap:]}


# A code context (sandbox-agent): a long-lived interpreter that runs one run after another in the
# same __main__ globals. Started like a run process but with `_sandbox_context_fd` (a connected
# unix stream socket to the agent) in the bootstrap's globals; the agent writes the environment
# block there (the bootstrap reads it), then "<working directory>\n"; the context changes to that
# directory and answers "H\n". Then, for each run, the agent sends "R<seq: 8 hex>\n" with five
# descriptors (SCM_RIGHTS): stdout, stderr, code, result, and the run's agent channel (the
# globals `agent`, `AgentCallError` and `AgentNotConfigured` are the run's own, as in a fresh run). The code descriptor holds what a fresh
# run's fd 3 holds after the runner: "<8 hex: length>K=V\0…" (set in os.environ, on top of what is
# there) and the source. The context makes the first two its fds 1 and 2 (sys.stdout/sys.stderr
# are reset to them), runs the code as a fresh run would — compiled as "<run>", `result` and the
# uncaught exception reported as JSON on the result descriptor — then points 1 and 2 at /dev/null
# and answers "D<seq> <exit status> <CPU µs of its own> <CPU µs of its reaped children>\n"
# (cumulative). Between runs the interpreter is not dumpable (no process of the sandbox's uid may
# ptrace it or write its memory while another run runs); it is during its own runs. Between runs SIGCHLD is ignored (the children the agent kills after a run leave no
# zombies; a Popen of an earlier run then reads returncode 0, as Python does on ECHILD).
# SystemExit ends the run with its status and keeps the interpreter. SIGINT raises
# KeyboardInterrupt while user code runs (the agent's interrupt at a timeout or cancel; exit
# status 130) and is ignored between runs. A context ends when its socket does.
def _sandbox_context(ctl):
    import socket, _signal, resource
    limit = int(sys.argv[2])
    imp = _importer(list(sys.path))
    sock = socket.socket(fileno=ctl)
    line = b""
    while not line.endswith(b"\n") and len(line) < 4096:
        c = sock.recv(1)
        if not c:
            os._exit(0)
        line += c
    os.chdir(line[:-1].decode())
    builtins = sys.modules["builtins"]
    mod = type(sys)("__main__")
    g = mod.__dict__
    g["__builtins__"] = builtins
    sys.modules["__main__"] = mod
    sys.argv[:] = ["-c"]

    def on_sigint(signum, frame):
        if _live[0]:
            raise KeyboardInterrupt

    _signal.signal(_signal.SIGINT, on_sigint)
    try:
        import faulthandler
        faulthandler.enable()
        del faulthandler
    except Exception:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    _context_dumpable(0)  # a launched interpreter is dumpable after its exec
    sock.sendall(b"H\n")
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 10, 5)
        while msg and len(msg) < 10:
            more = sock.recv(10 - len(msg))
            if not more:
                break
            msg += more
        if len(msg) != 10 or len(fds) != 5 or msg[:1] != b"R":
            os._exit(0)  # the agent is gone, or the context is being deleted
        _context_run(msg[1:9], fds, g, limit, imp, null, sock, resource)


def _context_run(seq, fds, g, limit, imp, null, sock, resource):
    import _signal
    _live[0] = False  # whatever a previous run left: SIGINT is for user code of this run only
    _context_dumpable(1)  # as a fresh run's process is
    # The run's peak RSS (the agent reads VmHWM after it) starts from here. Only the interpreter
    # itself can reset it: between runs it is not dumpable, so its /proc files are not the agent's.
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
        try:
            os.write(fd, b"5")
        finally:
            os.close(fd)
    except OSError:
        pass
    # Between runs SIGCHLD is ignored, so that the children the agent kills after a run are reaped
    # by the kernel (no zombies wait for the next run); the run's code gets the default back.
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    try:
        while True:  # children a previous run left (the agent killed them) are reaped here
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
    except ChildProcessError:
        pass
    out, err, code_fd, res_fd, chan = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    _context_stdio()
    status = 0
    close_agent = None
    try:
        agent_globals, close_agent = _sandbox_agent(chan, imp)
        g.update(agent_globals)
        with open(code_fd, "rb") as f:
            data = f.read()
        n = int(data[:8], 16)
        for kv in data[8:8 + n].split(b"\0")[:-1]:
            k, _, v = kv.partition(b"=")
            os.environb[k] = v
        status = _context_execute(data[8 + n:], g, limit, imp, res_fd)
    except BaseException:
        status = 1 if status == 0 else status
    _close_quietly(res_fd)
    if close_agent is not None:
        close_agent()
    else:
        os.close(chan)
    _flush()
    os.dup2(null, 1)
    os.dup2(null, 2)
    _live[0] = False
    _context_dumpable(0)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    us = lambda r: int((r.ru_utime + r.ru_stime) * 1e6)
    sock.sendall(b"D%s %d %d %d\n" % (seq, status, us(me), us(ch)))


def _context_dumpable(on):
    """Sets the interpreter's PR_SET_DUMPABLE (the zygote's _sandbox_dumpable, else prctl through
    ctypes: a launched interpreter)."""
    f = globals().get("_sandbox_dumpable")
    if f is None:
        import ctypes
        f = globals()["_sandbox_dumpable"] = lambda on, _prctl=ctypes.CDLL(None).prctl: _prctl(4, on, 0, 0, 0)
    f(on)


def _context_execute(src, g, limit, imp, res_fd):
    """Runs a context's run (src in the context's globals g, as _execute does), writes its report
    to res_fd (as a fresh run, a report that cannot be written is lost) and returns its exit
    status: SystemExit's, 1 for an uncaught exception, 130 for KeyboardInterrupt."""
    exc, exit_arg, payload = _execute(src, g, limit, imp)
    if exc is None:
        status = _exit_status(exit_arg)
    else:
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    try:
        while payload:
            payload = payload[os.write(res_fd, payload):]
    except OSError:
        pass
    return status


# A code context in WASM mode (the wasm driver's worker, package wasm/worker: context.go). WASI has
# no sockets, descriptor passing or signals, so the worker serves the context's private in-memory
# directory d (/.sandbox) with a new set of files for each run. Started by the bootstrap with
# `_sandbox_context_dir` = d in its globals and, from argv[3] on, the working directories to try
# (the first, the context's own, is made if missing). For each run the loop reads d/run, which
# blocks until the worker hands over the next run: "<output limit>\n" then the run's environment
# as "K=V\0"… (set in os.environ on top of what is there); an empty read (the context is being
# deleted) ends the instance. It opens d/status and d/result, reads d/code and binds the run's
# agent channel, d/agent — each file opens once, all before the code runs — runs the code as a
# fresh run would (_execute: compiled as "<run>", `result` and the uncaught exception as JSON on
# d/result), flushes stdout/stderr (the worker points the instance's stdio at the run's streams
# while the run lasts, and discards what is written between runs), and writes the exit status to
# d/status: closing it ends the run for the worker, which then puts the next run's files in d.
# SystemExit ends the run with its status and keeps the interpreter. Nothing interrupts a run: a
# timeout kills the worker, and every context of the sandbox with it.
def _sandbox_context_wasi(d):
    imp = _importer(list(sys.path))
    for i, wd in enumerate(sys.argv[3:]):
        try:
            if i == 0:
                try:
                    os.mkdir(wd, 0o700)
                except FileExistsError:
                    pass
            os.chdir(wd)
            break
        except OSError:
            pass
    mod = type(sys)("__main__")
    g = mod.__dict__
    g["__builtins__"] = sys.modules["builtins"]
    sys.modules["__main__"] = mod
    sys.argv[:] = ["-c"]
    while True:
        try:
            h = _read_file(d + "/run")
        except OSError:
            h = b""
        if not h:
            _flush()
            os._exit(0)
        _context_run_wasi(d, h, g, imp)


def _read_file(path):
    """The whole content of file path (os calls only: the loop does not depend on what a run may
    have done to the builtins)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = []
        while True:
            c = os.read(fd, 1 << 20)
            if not c:
                return b"".join(parts)
            parts.append(c)
    finally:
        os.close(fd)


def _context_run_wasi(d, header, g, imp):
    status, close_agent, st_fd, res_fd = 1, None, -1, -1
    try:
        limit, _, env = header.partition(b"\n")
        limit = int(limit)
        for kv in env.split(b"\0")[:-1]:
            k, _, v = kv.partition(b"=")
            os.environb[k] = v
        st_fd = os.open(d + "/status", os.O_WRONLY)
        res_fd = os.open(d + "/result", os.O_WRONLY)
        src = _read_file(d + "/code")
        agent_globals, close_agent = _sandbox_agent(d + "/agent", imp)
        g.update(agent_globals)
        _context_stdio()
        status = _context_execute(src, g, limit, imp, res_fd)
    except BaseException:
        pass
    _close_quietly(res_fd)
    if close_agent is not None:
        close_agent()
    _flush()
    try:
        os.write(st_fd, b"%d" % status)
    except OSError:
        pass
    _close_quietly(st_fd)


def _close_quietly(fd):
    try:
        os.close(fd)
    except OSError:
        pass


def _context_stdio():
    """sys.stdout and sys.stderr write to fds 1 and 2 again, whatever the last run did to them."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        s = getattr(sys, "__%s__" % name)
        try:
            ok = s is not None and not s.closed and s.fileno() == fd
        except BaseException:
            ok = False
        if not ok:
            s = open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
            setattr(sys, "__%s__" % name, s)
        setattr(sys, name, s)


def _sandbox_main():
    """The process's job, as its globals say: a code context's interpreter, or one run."""
    if "_sandbox_context_fd" in globals():
        _sandbox_context(_sandbox_context_fd)
    elif "_sandbox_context_dir" in globals():
        _sandbox_context_wasi(_sandbox_context_dir)
    else:
        _sandbox_run()


# A zygote (sandbox-agent's zygote.py) executes this file once with _sandbox_zygote set, to define
# what is above, and each process it forks calls _sandbox_main in those globals (its own copy):
# defining it all again in every run cost ~4 ms of CPU and ~90 copy-on-write faults per run.
if "_sandbox_zygote" not in globals():
    _sandbox_main()

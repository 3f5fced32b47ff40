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
    std_path = list(sys.path)
    main_code = _sandbox_run.__code__

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

    code_src = sys.argv[3] if len(sys.argv) > 3 else 3
    if len(sys.argv) > 4:
        res_fd = os.open(sys.argv[4], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    else:
        res_fd = 4
        try:
            os.set_inheritable(4, False)
        except OSError:
            pass
    with open(code_src, "rb") as f:
        src = f.read()
    agent_globals = _sandbox_agent(sys.argv[5] if len(sys.argv) > 5 else 6, imp)

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

    exc = None
    exit_arg = 0
    try:
        code = compile(src, "<run>", "exec", dont_inherit=True)
        exec(code, g)
    except SystemExit as e:
        exit_arg = e.code
    except BaseException as e:
        tb = e.__traceback__
        if tb is not None and tb.tb_frame.f_code is main_code:
            tb = tb.tb_next  # drop the runner's own frame
        exc = e.with_traceback(tb)

    doc = []
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

    payload = ("{" + ",".join(doc) + "}").encode("utf-8", "surrogatepass")
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


def _sandbox_agent(chan, imp):
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
        fd = -1

    class AgentCallError(Exception):
        """agent.run or agent.call got no answer; status: the endpoint's HTTP status, or None."""
        __module__, __qualname__ = "builtins", "AgentCallError"

        def __init__(self, message, status=None):
            Exception.__init__(self, message)
            self.status = status

    class AgentNotConfigured(AgentCallError):
        """The operator configured no endpoint for this sandbox's agent_id."""
        __module__, __qualname__ = "builtins", "AgentNotConfigured"

    lock = _thread.allocate_lock()
    owner = os.getpid()
    state = [fd]
    max_request, max_answer = 1 << 20, (8 << 20) + (64 << 10)  # agent.go's limits

    def exchange(req):
        # One request line out, one answer line back; a channel left mid-line is not used again.
        fd = state[0]
        if fd < 0:
            raise AgentCallError("this run has no agent channel (closed or broken)")
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
        except OSError as e:
            raise AgentCallError("the agent channel failed: %s" % e) from None
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

    class Agent:
        """The agent this sandbox runs for (its agent_id) and a way to it: agent.run(task, **kw),
        agent.call(tool, **kw), answered by the endpoint the operator configured for it."""
        __module__, __qualname__, __slots__ = "builtins", "Agent", ()
        id = property(lambda self: info[0], doc="the sandbox's agent_id")
        sandbox_id = property(lambda self: info[1], doc="the sandbox's id")
        run_id = property(lambda self: info[2], doc="this run's id")

        def run(self, task, **kwargs):
            """Ask the agent's endpoint to run task (a str); returns its JSON answer, decoded."""
            return call("run", "task", task, kwargs)

        def call(self, tool, **kwargs):
            """Call tool (a name) at the agent's endpoint; returns its JSON answer, decoded."""
            return call("call", "tool", tool, kwargs)

        def __repr__(self):
            return "<agent %r sandbox=%r run=%r>" % info

    return {"agent": Agent(), "AgentCallError": AgentCallError, "AgentNotConfigured": AgentNotConfigured}


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
    if arg is None:
        code = 0
    elif isinstance(arg, int):
        code = arg if -(1 << 31) <= arg < (1 << 31) else -1
    else:
        try:
            sys.stderr.write(str(arg) + "\n")
        except BaseException:
            pass
        code = 1
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


_sandbox_run()

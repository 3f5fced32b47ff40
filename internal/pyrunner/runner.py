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

    builtins = sys.modules["builtins"]
    old_main = sys.modules.get("__main__")
    mod = type(sys)("__main__")
    g = mod.__dict__
    g["__builtins__"] = builtins
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

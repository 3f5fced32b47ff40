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
    try:
        code = compile(src, "<run>", "exec", dont_inherit=True)
        _live[0] = True
        exec(code, g)
        _live[0] = False
    except SystemExit as e:
        _live[0] = False
        exit_arg = e.code
    except BaseException as e:
        _live[0] = False
        tb = e.__traceback__
        if tb is not None and tb.tb_frame.f_code is _execute.__code__:
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

    return exc, exit_arg, ("{" + ",".join(doc) + "}").encode("utf-8", "surrogatepass")


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
# directory and answers "H\n". Then, for each run, the agent sends "R<seq: 8 hex>\n" with four
# descriptors (SCM_RIGHTS): stdout, stderr, code, result. The code descriptor holds what a fresh
# run's fd 3 holds after the runner: "<8 hex: length>K=V\0…" (set in os.environ, on top of what is
# there) and the source. The context makes the first two its fds 1 and 2 (sys.stdout/sys.stderr
# are reset to them), runs the code as a fresh run would — compiled as "<run>", `result` and the
# uncaught exception reported as JSON on the result descriptor — then points 1 and 2 at /dev/null
# and answers "D<seq> <exit status> <CPU µs of its own> <CPU µs of its reaped children>\n"
# (cumulative). Between runs SIGCHLD is ignored (the children the agent kills after a run leave no
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
    sock.sendall(b"H\n")
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, 10, 4)
        while msg and len(msg) < 10:
            more = sock.recv(10 - len(msg))
            if not more:
                break
            msg += more
        if len(msg) != 10 or len(fds) != 4 or msg[:1] != b"R":
            os._exit(0)  # the agent is gone, or the context is being deleted
        _context_run(msg[1:9], fds, g, limit, imp, null, sock, resource)


def _context_run(seq, fds, g, limit, imp, null, sock, resource):
    import _signal
    # Between runs SIGCHLD is ignored, so that the children the agent kills after a run are reaped
    # by the kernel (no zombies wait for the next run); the run's code gets the default back.
    _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
    try:
        while True:  # children a previous run left (the agent killed them) are reaped here
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
    except ChildProcessError:
        pass
    out, err, code_fd, res_fd = fds
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    _context_stdio()
    status = 0
    try:
        with open(code_fd, "rb") as f:
            data = f.read()
        n = int(data[:8], 16)
        for kv in data[8:8 + n].split(b"\0")[:-1]:
            k, _, v = kv.partition(b"=")
            os.environb[k] = v
        exc, exit_arg, payload = _execute(data[8 + n:], g, limit, imp)
        if exc is None:
            status = _exit_status(exit_arg)
        else:
            status = 130 if isinstance(exc, KeyboardInterrupt) else 1
        while payload:
            payload = payload[os.write(res_fd, payload):]
    except BaseException:
        status = 1 if status == 0 else status
    try:
        os.close(res_fd)
    except OSError:
        pass
    _flush()
    os.dup2(null, 1)
    os.dup2(null, 2)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    us = lambda r: int((r.ru_utime + r.ru_stime) * 1e6)
    sock.sendall(b"D%s %d %d %d\n" % (seq, status, us(me), us(ch)))


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


if "_sandbox_context_fd" in globals():
    _sandbox_context(_sandbox_context_fd)
else:
    _sandbox_run()

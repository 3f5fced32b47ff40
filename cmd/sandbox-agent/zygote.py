# The zygote: a Python that has started once and forks every run's process (see zygote.go for
# where it lives and what it was given before this code runs). Globals set by the bootstrap:
#   _blob: the runner's source, NUL, the end of the launcher's bootstrap (bootstrapRead +
#          bootstrapRun in run.go), NUL, the no-spawn seccomp program (struct sock_filter array)
#          that a run without allow_spawn installs on itself.
#   sys.argv[1]: the descriptor of the connection to the agent (the host made it).
#
# Protocol on the connection to the agent (after the line "zygote"):
#   agent → zygote: 23-byte requests "F<id: 8 hex> <allow_spawn 0|1> <max_output: 10 digits>\n"
#                   carrying 7 descriptors (SCM_RIGHTS) that become the run's 0-6: /dev/null,
#                   stdout, stderr, code, result, status, agent channel. "C" instead of "F" forks a
#                   code context's interpreter: its fd 3 is its socket to the agent, and the runner
#                   loops on it (runner.py, _sandbox_context); its other descriptors are /dev/null
#                   but 5 (status).
#   zygote → agent: "P <id> <pid>\n" once the process is forked (pid: in the sandbox's PID
#                   namespace; 0 if it died before it could say), then "X <id> <wait status>
#                   <user µs> <system µs> <max RSS KiB>\n" once it is reaped.
# The forked process is what a fresh `python -I -u -B` started by the launcher is: its own session,
# the descriptors above and no other, no_new_privs and the container's seccomp profile (inherited),
# the no-spawn filter unless allow_spawn, the launcher's working directory (runDir). Then it runs the
# launcher's bootstrap from where that has the runner: environment and code from fd 3, the runner.
# Unlike a launched one it is not dumpable (ptrace, /proc/<pid>/mem: no process of the sandbox's
# uid may touch it) until its run arrives: an idle standby lives through other runs (a context's),
# whose code must not reach the next fresh run. `_sandbox_dumpable(on)` in its globals sets it:
# the bootstrap turns it on once it has the run's environment (bootstrapRun in run.go), a
# context's interpreter for each of its runs only (runner.py).
import os, sys, socket, select, fcntl, ctypes, gc


def _zygote():
    runner_src, start_src, nospawn = _blob.split(b"\0", 2)
    # The runner is defined here once (its functions and classes: runner.py, _sandbox_zygote), in
    # globals each forked process runs its bootstrap in; the bootstrap's exec(_r) then only calls it.
    runner = {"__name__": "__main__", "__builtins__": __builtins__, "_sandbox_zygote": True}
    exec(compile(runner_src, "<sandbox-runner>", "exec"), runner)
    del runner["_sandbox_zygote"], runner_src
    # The classes every run's globals get (AgentCallError, AgentNotConfigured, the `agent`'s): a
    # class statement per run wrote ~40 pages.
    runner["_agent_errors"]()
    runner["_agent_pre"] = runner["_agent_type"]()
    runner["_r"] = compile("_sandbox_main()", "<sandbox-runner>", "exec")
    start = compile(start_src, "<sandbox-bootstrap>", "exec")
    libc = ctypes.CDLL(None, use_errno=True)
    prog = None
    if nospawn:
        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        filt = ctypes.create_string_buffer(nospawn, len(nospawn))
        prog = SockFprog(len(nospawn) // 8, ctypes.addressof(filt))
    # No process of the sandbox's user may ptrace this one or read its memory; each child turns it back.
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.sendall(b"zygote\n")
    ctl = sock.fileno()
    children = {}  # pidfd -> (id, pid)
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    # What every run does at its start is done here once, before the fork: a forked run then only
    # reads what the zygote made, and each page it writes instead is a copy-on-write fault (the
    # bulk of a fresh run's CPU on these VMs: ~400 faults at ~30 µs). The modules the runner
    # imports on every run (faulthandler's crash report is enabled here and inherited: a run's fd 2
    # is its stderr; atexit and _signal at its end; json for any `result` but a bool or an int:
    # 0.4 MiB more per idle sandbox, where importing it costs each such run ~6 ms) and the
    # environment block its runs get when they ask for nothing else (_zenv: the bootstrap keeps
    # os.environ when a run's block is it).
    import faulthandler, atexit, _signal, json
    faulthandler.enable()
    zenv = b"".join(k + b"=" + v + b"\0" for k, v in os.environb.items())
    gc.collect()
    gc.freeze()  # the children's collections skip what the zygote made

    def send(line):
        sock.sendall(line.encode())

    while True:
        for fd, _ in poller.poll():
            if fd != ctl:
                rid, pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                _, status, ru = os.wait4(pid, 0)
                send("X %s %d %d %d %d\n" % (rid, status, int(ru.ru_utime * 1e6), int(ru.ru_stime * 1e6), ru.ru_maxrss))
                continue
            msg, fds, _, _ = socket.recv_fds(sock, 23, 7)
            while msg and len(msg) < 23:
                more = sock.recv(23 - len(msg))
                if not more:
                    break
                msg += more
            if len(msg) < 23 or len(fds) != 7 or msg[:1] not in (b"F", b"C"):
                os._exit(0)  # the agent is gone (or broke the protocol): the sandbox is ending
            rid = msg[1:9].decode()
            allow_spawn = msg[10:11] == b"1"
            max_out = int(msg[12:22])
            r = w = -1
            try:
                r, w = os.pipe()
                pid = os.fork()
            except OSError:  # e.g. the sandbox's pids limit: no process, and the zygote goes on
                for f in fds + [r, w]:
                    if f >= 0:
                        os.close(f)
                send("P %s 0\nX %s %d 0 0 0\n" % (rid, rid, 127 << 8))
                continue
            if pid == 0:
                sock.detach()  # its descriptor is closed below; the object must not close another
                _child(fds, w, allow_spawn, max_out, runner, start, libc, prog, msg[:1] == b"C", zenv)
            os.close(w)
            for f in fds:
                os.close(f)
            b = os.read(r, 32)
            os.close(r)
            send("P %s %d\n" % (rid, int(b) if b else 0))
            pfd = os.pidfd_open(pid)
            children[pfd] = (rid, pid)
            poller.register(pfd, select.POLLIN)


def _child(fds, w, allow_spawn, max_out, runner, start, libc, prog, context, zenv):
    try:
        os.setsid()  # first: once its pid is out, a kill of its group (-pid) must reach it
        os.write(w, b"%d" % os.getpid())
        high = [fcntl.fcntl(f, fcntl.F_DUPFD, 64) for f in fds]
        for i, f in enumerate(high):
            os.dup2(f, i)
        os.closerange(7, 1 << 20)
        if not allow_spawn:
            if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
        os.chdir(next(d for d in ("/.sandbox/work", "/tmp", "/") if os.path.isdir(d)))  # as runDir in run.go
    except BaseException as e:
        try:
            os.write(5, ("zygote child: %r" % (e,)).encode())
        finally:
            os._exit(127)
    os.close(5)
    sys.argv[:] = ["-c", "", str(max_out)]
    g = runner  # this process's copy of the zygote's: the runner's globals
    g["_zenv"] = zenv
    g["_sandbox_dumpable"] = lambda on, _prctl=libc.prctl: _prctl(4, on, 0, 0, 0)  # PR_SET_DUMPABLE
    if context:
        g["_sandbox_context_fd"] = 3
    del fds, w, libc, prog
    exec(start, g)  # the launcher's bootstrap from the runner on: environment, then the runner
    os._exit(0)


_zygote()

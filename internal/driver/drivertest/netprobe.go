package drivertest

// NetProbe is Python that tries network operations and collects {name: outcome} in the dict
// `out`: fetch(name, host, port, host_header=None) sends an HTTP/1.0 request over a plain socket
// (no proxy) and records the body of a 200, "<status> <body>" otherwise, "refused" (refused,
// reset or closed without an answer), "nxdomain", or the error's type; urlget(name, url) does
// the same through urllib (the environment's proxy); attempt(name, f) records "ok [<what f
// returned>]" or the errno's name; udp(host, port) sends "ping" and returns the answer;
// dns_a(name, server) asks server over UDP for name's A record and returns its address.
const NetProbe = `
import errno, os, socket, urllib.request, urllib.error
out = {}
def fetch(name, host, port, host_header=None, timeout=10):
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except (ConnectionRefusedError, ConnectionResetError):
        out[name] = "refused"; return
    except socket.gaierror as e:
        out[name] = "nxdomain" if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)) else "gaierror %d" % e.errno; return
    except OSError as e:
        out[name] = type(e).__name__; return
    try:
        s.sendall(("GET / HTTP/1.0\r\nHost: %s\r\n\r\n" % (host_header or host)).encode())
        data = b""
        while True:
            b = s.recv(4096)
            if not b:
                break
            data += b
    except (ConnectionResetError, BrokenPipeError):
        out[name] = "refused"; return
    except OSError as e:
        out[name] = type(e).__name__; return
    finally:
        s.close()
    if not data:
        out[name] = "refused"; return
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    out[name] = body.decode() if " 200 " in status else status.split(" ", 1)[1] + " " + body.decode().strip()
def urlget(name, url):
    try:
        out[name] = urllib.request.urlopen(url, timeout=10).read().decode()
    except urllib.error.HTTPError as e:
        out[name] = "%d %s" % (e.code, e.read().decode().strip())
    except Exception as e:
        out[name] = type(e).__name__
def attempt(name, f):
    try:
        r = f()
        out[name] = "ok" if r is None else "ok " + str(r)
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
def udp(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        s.sendto(b"ping", (host, port))
        return s.recvfrom(100)[0].decode()
    finally:
        s.close()
def dns_a(name, server):
    q = bytes.fromhex("abcd01000001000000000000") + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00\x00\x01\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(q, (server, 53))
        r = s.recvfrom(512)[0]
        return ".".join(str(b) for b in r[-4:])
    finally:
        s.close()
`

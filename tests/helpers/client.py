"""Test client, run inside a pod's namespace (and usually its cgroup).

    python client.py ask HOST PORT [N]      N requests on one connection; prints each answer
    python client.py bulk HOST PORT BYTES   sends BYTES through the app's echo, checks them; prints seconds
    python client.py churn HOST PORT N [MS] N connections of one request each, each held open MS
                                            milliseconds after its answer; prints "ok=<n> failed=<n>"
    python client.py hold HOST PORT N MS    N requests on one connection, MS milliseconds apart
    python client.py churn_then_ask HOST PORT N M
                                            churn N, then ask M on one connection at once; prints the
                                            TCP segments this namespace sent during the ask: "segs=<n>"
    python client.py flood HOST PORT BYTES  writes BYTES as fast as it can to a slow reader; prints the
                                            peak kernel TCP memory seen (pages) and any write error
    python client.py names HOST PORT [MS]   one request; prints a JSON line with the socket's
                                            getpeername(), getsockname() and the app's answer; with MS,
                                            holds the connection MS ms and prints the names again
    python client.py names_reuse HOST PORT  the names of a redirected socket, then of a new socket
                                            with the same 4-tuple that dialled the proxy itself
    python client.py names_after_refused HOST PORT PORT2
                                            one socket: a refused connect to HOST:PORT, then a connect
                                            to loopback PORT2; prints the names of the second
"""

import hashlib
import os
import select
import socket
import sys
import threading
import time


def ask(host: str, port: int, n: int = 1, pause_ms: int = 0) -> None:
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        for _ in range(n):
            s.sendall(b"who\n")
            print(f.readline().decode().strip(), flush=True)
            time.sleep(pause_ms / 1000)


def bulk(host: str, port: int, size: int) -> None:
    block = os.urandom(1 << 20)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(f"echo {size}\n".encode())

        def sender():
            left = size
            while left:
                chunk = block[: min(left, len(block))]
                s.sendall(chunk)
                sent_hash.update(chunk)
                left -= len(chunk)

        t = threading.Thread(target=sender)
        t.start()
        got = 0
        while got < size:
            select.select([s], [], [])  # read when readable, as event-driven clients do
            data = s.recv(1 << 20)
            if not data:
                break
            recv_hash.update(data)
            got += len(data)
        t.join()
    ok = got == size and sent_hash.digest() == recv_hash.digest()
    print(f"{'ok' if ok else 'MISMATCH'} bytes={got} seconds={time.monotonic() - start:.2f}", flush=True)
    sys.exit(0 if ok else 1)


def churn(host: str, port: int, n: int, hold_ms: int = 0) -> None:
    ok = failed = 0
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"who\n")
                if s.makefile("rb").readline():
                    ok += 1
                else:
                    failed += 1
                time.sleep(hold_ms / 1000)
        except OSError:
            failed += 1
    print(f"ok={ok} failed={failed}", flush=True)


def tcp_out_segs() -> int:
    with open("/proc/net/snmp") as f:
        tcp = [line.split() for line in f if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("OutSegs")])


def churn_then_ask(host: str, port: int, n: int, m: int) -> None:
    """In one process, so the long connection opens right after the short ones."""
    churn(host, port, n)
    before = tcp_out_segs()
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")
        for _ in range(m):
            s.sendall(b"who\n")
            f.readline()
    print(f"segs={tcp_out_segs() - before}", flush=True)


def tcp_memory_pages() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    return 0


def flood(host: str, port: int, size: int) -> None:
    block = b"x" * (1 << 16)
    peak, error = tcp_memory_pages(), None
    with socket.create_connection((host, port), timeout=120) as s:
        s.sendall(f"slowsink {size}\n".encode())
        left = size
        try:
            while left:
                left -= s.send(block[: min(left, len(block))])
                peak = max(peak, tcp_memory_pages())
            select.select([s], [], [])
            reply = s.makefile("rb").readline().strip().decode()
        except OSError as e:
            error, reply = e.strerror, ""
    print(f"reply={reply or '-'} peak_tcp_pages={peak} error={error}", flush=True)


def _names(s: socket.socket) -> dict:
    return {"peer": list(s.getpeername()[:2]), "local": list(s.getsockname()[:2])}


def names(host: str, port: int, hold_ms: int = 0) -> None:
    import json
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"who\n")
        print(json.dumps({**_names(s), "answer": s.makefile("rb").readline().decode().strip()}), flush=True)
        if hold_ms:
            time.sleep(hold_ms / 1000)
            print(json.dumps(_names(s)), flush=True)


def names_reuse(host: str, port: int) -> None:
    """A redirected connection, closed with a reset (no TIME_WAIT, so its local
    address is free at once), then a new socket on the same local address
    dialling the proxy's outbound listener itself: the first one's 4-tuple."""
    import json
    import struct
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"who\n")
        s.makefile("rb").readline()
        first = _names(s)
        local, family = s.getsockname(), s.family
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    print(json.dumps(first), flush=True)
    if family == socket.AF_INET:
        listener = "127.0.0.2"
    elif local[0].startswith("::ffff:"):
        listener = "::ffff:127.0.0.2"
    else:
        listener = local[0]   # IPv6 is redirected to the pod's own address
    with socket.socket(family) as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(local)
        again.settimeout(10)
        again.connect((listener, 15001))
        print(json.dumps(_names(again)), flush=True)


def names_after_refused(host: str, port: int, second_port: int) -> None:
    """One socket: connect to HOST:PORT, which must be refused, then, on the
    same socket, to 127.0.0.1:SECOND_PORT (the same loopback form for an
    AF_INET6 socket); prints the names of the second connection."""
    import json
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.connect((host, port))   # blocking: a failed non-blocking connect needs one more call to reset
            raise SystemExit(f"the first connect to {host}:{port} was not refused")
        except ConnectionRefusedError:
            pass
        s.settimeout(10)
        s.connect(("::ffff:127.0.0.1" if family == socket.AF_INET6 else "127.0.0.1", second_port))
        s.sendall(b"who\n")
        print(json.dumps({**_names(s), "answer": s.makefile("rb").readline().decode().strip()}), flush=True)


if __name__ == "__main__":
    cmd, host, port, *rest = sys.argv[1:]
    {"ask": ask, "bulk": bulk, "churn": churn, "hold": ask, "flood": flood,
     "churn_then_ask": churn_then_ask, "names": names,
     "names_reuse": names_reuse, "names_after_refused": names_after_refused}[cmd](host, int(port), *map(int, rest))

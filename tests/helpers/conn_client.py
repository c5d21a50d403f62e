"""Connection-level test client for the datapath's fallback paths, run inside
a pod's namespace and cgroup.

    python conn_client.py bound HOST PORT        binds its socket itself (port chosen by the kernel)
                                                 before connecting; prints the answer
    python conn_client.py concurrent HOST PORT N opens N connections, asks on each, keeps them all
                                                 open, asks on each again; prints answers: "ok=<n> failed=<n>"
"""

import socket
import sys


def ask(s: socket.socket, f) -> bool:
    s.sendall(b"who\n")
    return bool(f.readline())


def bound(host: str, port: int) -> None:
    with socket.socket() as s:
        s.settimeout(10)
        s.bind(("0.0.0.0", 0))
        s.connect((host, port))
        s.sendall(b"who\n")
        print(s.makefile("rb").readline().decode().strip(), flush=True)


def concurrent(host: str, port: int, n: int) -> None:
    conns, answers = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=10)
            f = s.makefile("rb")
            conns.append((s, f))
            answers += ask(s, f)
        except OSError:
            pass
    for s, f in conns:
        try:
            answers += ask(s, f)
        except OSError:
            pass
        s.close()
    print(f"ok={answers} failed={2 * n - answers}", flush=True)


if __name__ == "__main__":
    cmd, host, port, *rest = sys.argv[1:]
    {"bound": bound, "concurrent": concurrent}[cmd](host, int(port), *map(int, rest))

"""The test app: for every line received, answers "<name> <peer ip:port>";
a line "echo N" switches the connection to echoing the next N bytes back;
a line "slowsink N" makes it read N bytes slowly (64 KiB every 5 ms), then
answer "done".

It waits for a socket to be readable before reading, as event-driven servers
(nginx, Envoy, Go's runtime) do: see the README's kernel limitations for what a
blocking read can see on a spliced socket.

    python line_app.py --name POD [--port 8080]
"""

import argparse
import select
import socket
import threading
import time


class Reader:
    def __init__(self, conn: socket.socket):
        self.conn, self.buf = conn, bytearray()

    def _fill(self, n: int = 1 << 18) -> bool:
        select.select([self.conn], [], [])
        data = self.conn.recv(n)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            if not self._fill():
                return b""
        i = self.buf.index(b"\n") + 1
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out

    def some(self, limit: int) -> bytes:
        if not self.buf and not self._fill(limit):
            return b""
        out = bytes(self.buf[:limit])
        del self.buf[:limit]
        return out


def handle(conn: socket.socket, name: str) -> None:
    peer = "%s:%d" % conn.getpeername()[:2]
    r = Reader(conn)
    try:
        while True:
            line = r.line()
            if not line:
                return
            if line.startswith((b"echo ", b"slowsink ")):
                left = int(line.split()[1])
                slow = line.startswith(b"slowsink ")
                while left:
                    chunk = r.some(min(left, 1 << 16 if slow else 1 << 18))
                    if not chunk:
                        return
                    left -= len(chunk)
                    if slow:
                        time.sleep(0.005)
                    else:
                        conn.sendall(chunk)
                if slow:
                    conn.sendall(b"done\n")
                continue
            conn.sendall(f"{name} {peer}\n".encode())
    except OSError:
        pass
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--ipv6", action="store_true", help="also listen on [::]:PORT (IPv6 only; IPv4 stays on 0.0.0.0)")
    args = ap.parse_args()
    listeners = [listen(socket.AF_INET, "0.0.0.0", args.port)]
    if args.ipv6:
        listeners.append(listen(socket.AF_INET6, "::", args.port))
    for ls in listeners[1:]:
        threading.Thread(target=serve, args=(ls, args.name), daemon=True).start()
    print("ready", flush=True)
    serve(listeners[0], args.name)


def listen(family: int, host: str, port: int) -> socket.socket:
    ls = socket.socket(family)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    ls.bind((host, port))
    ls.listen(512)
    return ls


def serve(ls: socket.socket, name: str) -> None:
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn, name), daemon=True).start()


if __name__ == "__main__":
    main()

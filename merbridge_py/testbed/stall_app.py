"""A writer and a reader that stops reading (issue 20, backpressure): how
many bytes does the path accept from a writer while its reader is paused,
and do they all arrive, in order, once it reads again?

    python -m merbridge_py.testbed.stall_app serve --port 9310 [--ack-every N]
    python -m merbridge_py.testbed.stall_app offer --host 10.0.0.2 --port 9310 \
        --total BYTES [--rate BYTES_PER_S] [--seconds S] [--idle-seconds S] [--ack-every N]

serve: accepts one connection at a time. Paused (the default): prints
"accepted", reads nothing until a line arrives on its stdin, then reads to
EOF. With --ack-every N it never pauses: it answers one byte after every N
bytes it read (a reader that keeps up, in lock step with its writer). Either
way it prints one JSON line per connection: bytes read, whether they were
the expected stream in order, and the offset of the first wrong byte.

offer: connects and offers --total bytes of the stream, at --rate bytes per
second (0: as fast as the socket takes them), through a non-blocking socket
so that what the path accepts is what it holds: it stops offering after
--seconds, or once nothing was accepted for --idle-seconds (the path holds
the writer back), or at --total. Then it prints one JSON line (accepted
bytes, the accepted count each second), shuts its sending side down, and
waits for the reader to close. With --ack-every N it sends N bytes, waits
for the reader's byte, and so on.

The stream: the little-endian u64 sequence 0, 1, 2, ..., so every 8 bytes
name their own position: a moved, lost or repeated chunk cannot pass.
Standard library only, so it starts fast inside a pod.
"""

from __future__ import annotations

import argparse
import array
import json
import select
import socket
import sys
import time

CHUNK = 256 << 10


def stream_bytes(offset: int, length: int) -> bytes:
    """`length` bytes of the stream, starting at byte `offset`."""
    first, last = offset // 8, (offset + length + 7) // 8
    words = array.array("Q", range(first, last))
    if sys.byteorder != "little":
        words.byteswap()
    skip = offset - first * 8
    return words.tobytes()[skip:skip + length]


class StreamCheck:
    """Checks bytes against the stream as they arrive."""

    def __init__(self):
        self.bytes = 0
        self.first_bad: int | None = None

    def feed(self, data: bytes) -> None:
        if self.first_bad is None and data != stream_bytes(self.bytes, len(data)):
            expected = stream_bytes(self.bytes, len(data))
            self.first_bad = self.bytes + next(i for i, (a, b) in enumerate(zip(data, expected)) if a != b)
        self.bytes += len(data)

    def result(self) -> dict:
        return {"bytes": self.bytes, "in_order": self.first_bad is None, "first_bad": self.first_bad}


def recv_waiting(sock: socket.socket, size: int) -> bytes:
    """recv() that waits for readability first: a blocking recv() on a socket
    in a sockmap can end with EAGAIN on a wake-up that brought no data (the
    kernel's tcp_bpf_recvmsg; README, "Kernel limitations")."""
    while True:
        select.select([sock], [], [])
        try:
            return sock.recv(size)
        except BlockingIOError:
            continue


def serve(port: int, ack_every: int) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        check = StreamCheck()
        with conn:
            if not ack_every:
                print("accepted", flush=True)
                if not sys.stdin.readline():
                    return
            pending = 0
            while True:
                want = min(CHUNK, ack_every - pending) if ack_every else CHUNK
                data = recv_waiting(conn, want)
                if not data:
                    break
                check.feed(data)
                pending += len(data)
                if ack_every and pending == ack_every:
                    conn.sendall(b"k")
                    pending = 0
        print(json.dumps(check.result()), flush=True)


def write(host: str, port: int, total: int, rate: float, seconds: float, idle_seconds: float,
          ack_every: int) -> dict:
    sock = socket.create_connection((host, port), timeout=30)
    started = time.monotonic()
    accepted = 0
    per_second: list[int] = []
    if ack_every:
        while accepted < total:
            n = min(ack_every, total - accepted)
            sock.sendall(stream_bytes(accepted, n))
            accepted += n
            if recv_waiting(sock, 1) != b"k":
                raise SystemExit("the reader closed before answering")
    else:
        sock.setblocking(False)
        last_progress = started
        pending = b""
        while accepted < total:
            now = time.monotonic()
            if seconds and now - started >= seconds:
                break
            if now - last_progress >= idle_seconds:
                break
            while len(per_second) < int(now - started):
                per_second.append(accepted)
            allowed = total - accepted
            if rate:
                allowed = min(allowed, int(rate * (now - started)) - accepted)
            if allowed <= 0:
                time.sleep(min(0.01, max(0.0, (accepted + 1) / rate - (now - started))))
                continue
            if not pending:
                pending = stream_bytes(accepted, min(CHUNK, allowed))
            try:
                sent = sock.send(pending[:allowed])
            except BlockingIOError:
                select.select([], [sock], [], 0.1)
                continue
            accepted += sent
            pending = pending[sent:]
            if sent:
                last_progress = time.monotonic()
        per_second.append(accepted)
    result = {"accepted": accepted, "offered_seconds": round(time.monotonic() - started, 2),
              "accepted_per_second": per_second}
    print(json.dumps(result), flush=True)
    sock.setblocking(True)
    sock.settimeout(None)
    sock.shutdown(socket.SHUT_WR)
    while recv_waiting(sock, CHUNK):   # the reader closes once it has read everything
        pass
    sock.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.testbed.stall_app",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--ack-every", type=int, default=0)
    w = sub.add_parser("offer")
    w.add_argument("--host", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--total", type=int, required=True)
    w.add_argument("--rate", type=float, default=0.0, help="bytes per second; 0: as fast as accepted")
    w.add_argument("--seconds", type=float, default=0.0, help="stop offering after this long; 0: no limit")
    w.add_argument("--idle-seconds", type=float, default=5.0)
    w.add_argument("--ack-every", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.ack_every)
    else:
        if args.total <= 0 or args.rate < 0 or args.ack_every < 0:
            parser.error("--total must be positive, --rate and --ack-every not negative")
        write(args.host, args.port, args.total, args.rate, args.seconds, args.idle_seconds, args.ack_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())

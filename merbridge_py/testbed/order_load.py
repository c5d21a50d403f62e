"""Byte-order stress load: many short connections that write in several calls
right after connect, and a server that checks every byte (issue 20).

Why: each end of a spliced connection joins the sockhash in its own sockops
callback. A message sent before the peer has joined goes through TCP into the
peer's receive queue; one sent after is redirected into the peer's psock
ingress queue, which the kernel reads first. If that can happen, the reader
sees later bytes before earlier ones. This load makes the window as likely as
a Python client can: it writes a header the moment connect() returns, then
the body in 2-4 more writes of varied sizes (some over 64 KiB).

    python -m merbridge_py.testbed.order_load serve --port 9300 [--workers 2] \
        [--first-read-delay-ms 2] [--defer-accept 5] [--fastopen] [--ready-file F]          # JSON tally on SIGTERM
    python -m merbridge_py.testbed.order_load send --target 10.0.0.2:9300 \
        --connections 20000 [--workers 4] [--bind 127.0.0.6] [--seed 1] [--fastopen]

Wire format, client -> server: a 16-byte header (magic "MBO1", connection
number, body length, per-connection key; big-endian u32 each), then the body:
the big-endian u32 word sequence 0, 1, 2, ... XORed with the key, cut to the
body length. Every byte depends on its position and its connection, so a
moved chunk cannot pass. The server reads until it holds as many bytes as
the header announces (or to EOF), checks, and answers one status byte:
  "K" exact; "R" reordered (the right bytes, the right count, wrong order);
  "C" corrupted (other bytes); "S" short (fewer bytes than the header says,
  or no header at all).
The server also counts per status (and answers it could not send), and prints its tally as one JSON line on
SIGTERM. The client prints one JSON document: connections, bytes, status
counts, errors (connect/send/no answer) with the first few described.
Standard library only, so it starts fast inside a pod.
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

MAGIC = b"MBO1"
HEADER = struct.Struct("!4sIII")
MAX_BODY = 256 << 10
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)   # linux/tcp.h
STATUSES = {b"K": "ok", b"R": "reordered", b"C": "corrupted", b"S": "short"}
# Body words 0..MAX_BODY/4, big-endian; a connection's body is this XORed with its key.
_WORDS = b"".join(struct.pack("!I", i) for i in range(MAX_BODY // 4 + 1))


def body_of(key: int, length: int) -> bytes:
    words = (length + 3) // 4
    mask = int.from_bytes(struct.pack("!I", key) * words, "big")
    return (int.from_bytes(_WORDS[:words * 4], "big") ^ mask).to_bytes(words * 4, "big")[:length]


def stream_of(number: int, key: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, number, length, key) + body_of(key, length)


def check(received: bytes) -> bytes:
    """The status byte for what one connection delivered."""
    at = received.find(MAGIC)
    if at < 0 or len(received) - at < HEADER.size:
        return b"S"
    _, number, length, key = HEADER.unpack_from(received, at)
    if length > MAX_BODY:
        return b"C"
    expected = stream_of(number, key, length)
    if received == expected:
        return b"K"
    if len(received) < len(expected):
        return b"S"
    if len(received) == len(expected) and sorted(received) == sorted(expected):
        return b"R"
    return b"C"


# --- server -----------------------------------------------------------------------


def _complete(received: bytearray) -> bool:
    """Whether `received` holds as many bytes as its header announces. The
    client does not half-close (a proxy need not pass a FIN on at once), so
    this or EOF ends a connection's stream."""
    at = received.find(MAGIC)
    if at < 0 or len(received) - at < HEADER.size:
        return False
    _, _, length, _ = HEADER.unpack_from(received, at)
    return len(received) >= HEADER.size + length


def _serve_worker(port: int, host: str, first_read_delay: float, defer_accept: int, fastopen: bool, tallies,
                  stop_event) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the parent tells us through stop_event
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if defer_accept:
        # As nginx's `listen ... deferred`: the connection is established on
        # this side only when its first data arrives, so that data reaches
        # the socket before the socket's sockops callback runs.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, defer_accept)
    if fastopen:
        # Data in the SYN reaches the socket before either end's sockops
        # callback (needs net.ipv4.tcp_fastopen with bit 2 in this namespace).
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 256)
    listener.bind((host, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    tally = {name: 0 for name in STATUSES.values()}
    tally.update(connections=0, bytes=0, examples=[], answer_errors=0, answer_error_examples=[])
    waiting: list[tuple[float, int, socket.socket]] = []   # (first read allowed at, fd, socket)
    buffers: dict[socket.socket, bytearray] = {}
    while not stop_event.is_set():
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            _, _, conn = heapq.heappop(waiting)
            sel.register(conn, selectors.EVENT_READ, "conn")
        timeout = 0.2 if not waiting else max(0.0, waiting[0][0] - now)
        for key, _ in sel.select(min(timeout, 0.2)):
            if key.data is None:
                for _ in range(64):
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    buffers[conn] = bytearray()
                    if first_read_delay > 0:
                        # Let the TCP-path and redirected bytes of the first
                        # writes both be queued before the first read.
                        heapq.heappush(waiting, (time.monotonic() + first_read_delay, conn.fileno(), conn))
                    else:
                        sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            try:
                chunk = conn.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if chunk:
                buffers[conn] += chunk
                if not _complete(buffers[conn]):
                    continue
            received = bytes(buffers.pop(conn))
            sel.unregister(conn)
            status = check(received)
            tally["connections"] += 1
            tally["bytes"] += len(received)
            tally[STATUSES[status]] += 1
            if status != b"K" and len(tally["examples"]) < 5:
                tally["examples"].append({"status": STATUSES[status], "length": len(received),
                                          "head": received[:32].hex()})
            try:
                if conn.send(status) != 1:
                    raise BlockingIOError("0 bytes sent")
            except OSError as e:
                # Not the client's bytes but our answer went wrong: a
                # redirect can fail where TCP would have queued (EAGAIN).
                tally["answer_errors"] += 1
                if len(tally["answer_error_examples"]) < 5:
                    tally["answer_error_examples"].append(repr(e))
            conn.close()
    tallies.put(tally)


def serve(args) -> int:
    stop_event = multiprocessing.Event()
    tallies = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_serve_worker,
                                       args=(args.port, args.host, args.first_read_delay_ms / 1000, args.defer_accept, args.fastopen, tallies,
                                             stop_event))
               for _ in range(args.workers)]
    for w in workers:
        w.start()
    # A flag, not stop_event.set(): the handler runs on the main thread, which
    # may hold the event's lock inside wait() at that moment.
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    # Ready once every worker's listener accepts.
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection((args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1",
                                      args.port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_event.set()
                raise
            time.sleep(0.05)
    if args.ready_file:
        Path(args.ready_file).write_text("ready\n")
    print("ready", flush=True)
    while not stopping:
        time.sleep(0.2)
    stop_event.set()
    total = {name: 0 for name in STATUSES.values()}
    total.update(connections=0, bytes=0, examples=[], answer_errors=0, answer_error_examples=[])
    for _ in workers:
        t = tallies.get(timeout=30)
        for k, v in t.items():
            total[k] = total[k] + v
    for w in workers:
        w.join(10)
    total["connections"] -= 1   # the readiness probe above: no header, counted short
    total["short"] -= 1
    total["examples"] = [e for e in total["examples"] if e["length"]][:5]
    print(json.dumps(total), flush=True)
    return 0


# --- client -----------------------------------------------------------------------


def _sizes(rng: random.Random) -> tuple[int, list[int]]:
    """A body length and how it is cut into writes: mostly small bodies (one
    request's worth), one in eight over 64 KiB."""
    length = rng.randint(65 << 10, MAX_BODY) if rng.random() < 0.125 else rng.randint(1, 16 << 10)
    writes = rng.randint(2, 4)
    cuts = sorted(rng.randint(0, length) for _ in range(writes - 1))
    return length, [b - a for a, b in zip([0] + cuts, cuts + [length])]


def _send_worker(index: int, args, results) -> None:
    rng = random.Random(args.seed * 1000003 + index)
    host, _, port = args.target.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tally = {name: 0 for name in STATUSES.values()}
    tally.update(connections=0, bytes=0, errors=0, error_examples=[])
    count = args.connections // args.workers + (1 if index < args.connections % args.workers else 0)
    deadline = time.monotonic() + args.duration if args.duration else None
    for n in range(count):
        if deadline and time.monotonic() > deadline:
            break
        number = index << 24 | n
        key = rng.getrandbits(32)
        length, writes = _sizes(rng)
        data = stream_of(number, key, length)
        s = socket.socket(family)
        s.settimeout(args.timeout)
        step = "connect"
        try:
            if args.bind:
                s.bind((args.bind, 0))
            if args.fastopen:
                s.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
            s.connect((host, int(port)))
            # No pause from here on: the header goes out the moment connect returns.
            step = "send"
            s.sendall(data[:HEADER.size])
            at = HEADER.size
            for w in writes:
                s.sendall(data[at:at + w])
                at += w
            step = "answer"
            status = s.recv(1)
            if status not in STATUSES:
                raise ConnectionError(f"answer {status!r}")
            tally[STATUSES[status]] += 1
            tally["connections"] += 1
            tally["bytes"] += len(data)
        except OSError as e:
            tally["errors"] += 1
            if len(tally["error_examples"]) < 5:
                tally["error_examples"].append(f"{step}: {e!r}")
        finally:
            s.close()
    results.put(tally)


def send(args) -> int:
    started = time.monotonic()
    results = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_send_worker, args=(i, args, results)) for i in range(args.workers)]
    for w in workers:
        w.start()
    total = {name: 0 for name in STATUSES.values()}
    total.update(connections=0, bytes=0, errors=0, error_examples=[])
    for _ in workers:
        t = results.get()
        for k, v in t.items():
            total[k] = total[k] + v
    for w in workers:
        w.join()
    total["error_examples"] = total["error_examples"][:10]
    total["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(total), flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="check every connection's bytes; JSON tally on SIGTERM")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--first-read-delay-ms", type=float, default=0.0,
                   help="wait this long after accept before the first read (lets both queues fill)")
    s.add_argument("--defer-accept", type=int, default=0, metavar="SECONDS",
                   help="TCP_DEFER_ACCEPT on the listener (as nginx's `deferred`)")
    s.add_argument("--fastopen", action="store_true", help="accept TCP Fast Open (data in the SYN)")
    s.add_argument("--ready-file")
    c = sub.add_parser("send", help="open connections that write in several calls right after connect")
    c.add_argument("--target", required=True, help="IP:PORT or [IPv6]:PORT")
    c.add_argument("--connections", type=int, required=True)
    c.add_argument("--workers", type=int, default=4)
    c.add_argument("--bind", help="source address (127.0.0.6: the inbound leg of a pod, spliced)")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--fastopen", action="store_true",
                   help="TCP_FASTOPEN_CONNECT: the header rides in the SYN once the server's cookie is known")
    c.add_argument("--timeout", type=float, default=30.0)
    c.add_argument("--duration", type=float, default=0.0, help="stop early after this many seconds (0: never)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be at least 1")
    return send(args)


if __name__ == "__main__":
    sys.exit(main())

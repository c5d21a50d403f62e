"""A minimal transparent proxy standing in for Envoy in the datapath tests.

Listens on the outbound and inbound ports, asks getsockopt(SOL_IP,
SO_ORIGINAL_DST) for every accepted connection, logs what it was told to
stderr ("<listener port> <original dst> <peer>"), and forwards to that address
(inbound upstreams come from 127.0.0.6, as Envoy's do). Event-driven with
non-blocking sockets and bounded buffers, as Envoy is: it stops reading one
side while the other side's buffer is full. Run as uid 1337 inside a pod's
namespace and cgroup.

    python forwarding_sidecar.py [--outbound 15001] [--inbound 15006] 2>>LOG
"""

import argparse
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80
BUF = 1 << 18
HIGH_WATER = 1 << 20   # stop reading a side whose peer has this much unsent


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET6:   # IP6T_SO_ORIGINAL_DST, as Envoy asks on an IPv6 listener
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, packed_ip = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed_ip), port
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed_ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed_ip), port


class Side:
    """One socket of a proxied pair, with the bytes waiting to be written to it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.pending = bytearray()
        self.peer: "Side | None" = None
        self.read_closed = False
        self.shut_wr = False


class Proxy:
    def __init__(self, log, mapped_upstreams: bool = False):
        self.sel = selectors.DefaultSelector()
        self.log = log
        self.mapped_upstreams = mapped_upstreams

    def listen(self, port: int, inbound: bool, family: int = socket.AF_INET) -> None:
        ls = socket.socket(family)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:   # as Istio's dual-stack Envoy: [::] beside 0.0.0.0
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        ls.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
        ls.listen(512)
        ls.setblocking(False)
        self.sel.register(ls, selectors.EVENT_READ, ("listener", port, inbound))

    def accept(self, ls: socket.socket, port: int, inbound: bool) -> None:
        conn, peer = ls.accept()
        try:
            ip, dport = original_dst(conn)
        except OSError as e:
            print(f"{port} error {e.errno}", file=self.log, flush=True)
            conn.close()
            return
        print(f"{port} {ip}:{dport} {peer[0]}:{peer[1]}", file=self.log, flush=True)
        ipv6 = ":" in ip and not ip.startswith("::ffff:")
        ip = ip.removeprefix("::ffff:")
        if self.mapped_upstreams and not ipv6:   # an IPv4 upstream through an AF_INET6 socket, as a JVM dials
            up = socket.socket(socket.AF_INET6)
            ip = f"::ffff:{ip}"
            if inbound:
                up.bind(("::ffff:127.0.0.6", 0))
        else:
            up = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
            if inbound:
                up.bind(("::6" if ipv6 else "127.0.0.6", 0))
        up.setblocking(False)
        try:
            up.connect((ip, dport))
        except BlockingIOError:
            pass
        conn.setblocking(False)
        down_side, up_side = Side(conn), Side(up)
        down_side.peer, up_side.peer = up_side, down_side
        for side in (down_side, up_side):
            self.sel.register(side.sock, selectors.EVENT_READ, ("side", side))

    def update(self, side: Side) -> None:
        events = 0
        if not side.read_closed and len(side.peer.pending) < HIGH_WATER:
            events |= selectors.EVENT_READ
        if side.pending:
            events |= selectors.EVENT_WRITE
        try:
            if events:
                self.sel.modify(side.sock, events, ("side", side))
            else:
                self.sel.unregister(side.sock)
        except (KeyError, ValueError):
            if events:
                self.sel.register(side.sock, events, ("side", side))

    def close_pair(self, side: Side, why: Exception | None) -> None:
        if side.sock.fileno() == -1:   # closed with its peer earlier in the same batch of events
            return
        if why is not None:
            print(f"pipe {side.sock.getsockname()}: {why}", file=self.log, flush=True)
        for s in (side, side.peer):
            try:
                self.sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            s.sock.close()

    def on_side(self, side: Side, mask: int) -> None:
        if side.sock.fileno() == -1:   # an event of this batch for a pair closed by an earlier one
            return
        try:
            if mask & selectors.EVENT_READ:
                data = side.sock.recv(BUF)
                if data:
                    side.peer.pending += data
                else:
                    side.read_closed = True
            if side.pending and mask & selectors.EVENT_WRITE:
                sent = side.sock.send(side.pending)
                del side.pending[:sent]
            for s in (side, side.peer):
                if s.peer.read_closed and not s.pending and not s.shut_wr:
                    s.sock.shutdown(socket.SHUT_WR)
                    s.shut_wr = True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.close_pair(side, e)
            return
        if side.shut_wr and side.peer.shut_wr:
            self.close_pair(side, None)
            return
        self.update(side)
        self.update(side.peer)

    def run(self) -> None:
        while True:
            for key, mask in self.sel.select():
                kind, *rest = key.data
                if kind == "listener":
                    self.accept(key.fileobj, *rest)
                else:
                    self.on_side(rest[0], mask)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outbound", type=int, default=15001)
    ap.add_argument("--inbound", type=int, default=15006)
    ap.add_argument("--ipv6", action="store_true", help="also listen on [::] (inbound upstreams from ::6)")
    ap.add_argument("--mapped-upstreams", action="store_true",
                    help="dial IPv4 upstreams with AF_INET6 sockets to ::ffff:a.b.c.d")
    args = ap.parse_args()
    proxy = Proxy(sys.stderr, args.mapped_upstreams)
    proxy.listen(args.outbound, False)
    proxy.listen(args.inbound, True)
    if args.ipv6:
        proxy.listen(args.outbound, False, socket.AF_INET6)
        proxy.listen(args.inbound, True, socket.AF_INET6)
    print("ready", flush=True)
    proxy.run()


if __name__ == "__main__":
    sys.exit(main())

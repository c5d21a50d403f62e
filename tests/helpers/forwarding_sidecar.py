"""A minimal transparent proxy standing in for Envoy in the datapath tests.

Listens on the outbound and inbound ports, asks getsockopt(SOL_IP,
SO_ORIGINAL_DST) for every accepted connection, logs what it was told to
stderr ("<listener port> <original dst> <peer>"), and
forwards to that address (inbound upstreams come from 127.0.0.6, as Envoy's
do). Run as uid 1337 inside a pod's namespace and cgroup.

    python forwarding_sidecar.py [--outbound 15001] [--inbound 15006] 2>>LOG
"""

import argparse
import socket
import struct
import sys
import threading

SO_ORIGINAL_DST = 80
BUF = 1 << 18


def original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed_ip = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed_ip), port


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(BUF)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def handle(conn: socket.socket, listener_port: int, inbound: bool, log, lock) -> None:
    try:
        try:
            ip, port = original_dst(conn)
        except OSError as e:
            with lock:
                log.write(f"{listener_port} error {e.errno}\n")
                log.flush()
            return
        peer = "%s:%d" % conn.getpeername()
        with lock:
            log.write(f"{listener_port} {ip}:{port} {peer}\n")
            log.flush()
        up = socket.socket()
        if inbound:
            up.bind(("127.0.0.6", 0))
        up.connect((ip, port))
        t = threading.Thread(target=pipe, args=(up, conn), daemon=True)
        t.start()
        pipe(conn, up)
        t.join()
        up.close()
    finally:
        conn.close()


def serve(port: int, inbound: bool, log, lock) -> None:
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(512)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=handle, args=(conn, port, inbound, log, lock), daemon=True).start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outbound", type=int, default=15001)
    ap.add_argument("--inbound", type=int, default=15006)
    args = ap.parse_args()
    log, lock = sys.stderr, threading.Lock()
    threading.Thread(target=serve, args=(args.inbound, True, log, lock), daemon=True).start()
    print("ready", flush=True)
    serve(args.outbound, False, log, lock)


if __name__ == "__main__":
    sys.exit(main())

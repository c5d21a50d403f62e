"""The application container of every test-bed pod: a small threaded HTTP/1.1
server (keep-alive) on one or more ports.

  GET /whoami     -> {"pod": NAME, "peer": "ip:port", "port": LOCAL_PORT}; `peer` is
                     the client address this socket sees: 127.0.0.6 (IPv6:
                     "[::6]:port") means the request came through the pod's
                     inbound sidecar
  GET /           -> a small fixed body
  GET /bytes?n=N  -> N bytes (throughput tests)

Run as `python -m merbridge_py.testbed.app --name POD --port 8080 [--port 9090]
[--ipv6] [--ready-file PATH]`. With --ipv6 (a dual-stack pod) every port is
also served on [::], by an IPv6-only socket beside the IPv4 one, so each
family's peer shows in its own form (a dual-stack socket would show IPv4
peers as ::ffff:a.b.c.d). Standard library only, so it starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from .client import format_address

MAX_BYTES = 1 << 31
CHUNK = b"x" * 65536


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class _Server6(_Server):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def _handler(pod: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mbp-testbed-app"

        def log_message(self, *args):  # quiet: the test bed logs nothing by default
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:  # say so, or clients reusing the connection see a reset
                self.send_header("Connection", "close")
            # Headers and body in one write: no Nagle/delayed-ACK stall
            # between them on a keep-alive connection.
            self._headers_buffer.append(b"\r\n" + body)
            self.flush_headers()

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/whoami":
                peer = format_address(self.client_address)
                port = self.connection.getsockname()[1]
                self._send(200, json.dumps({"pod": pod, "peer": peer, "port": port}).encode())
            elif url.path == "/":
                self._send(200, f"hello from {pod}\n".encode(), "text/plain")
            elif url.path == "/bytes":
                self._send_bytes(parse_qs(url.query).get("n", ["0"])[0])
            else:
                self._send(404, b'{"error": "not found"}')

        def _send_bytes(self, n_text: str) -> None:
            try:
                n = int(n_text)
            except ValueError:
                n = -1
            if not 0 <= n <= MAX_BYTES:
                self._send(400, b'{"error": "n must be an integer in [0, 2**31]"}')
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                chunk = CHUNK[:min(n, len(CHUNK))]
                self.wfile.write(chunk)
                n -= len(chunk)

    return Handler


def serve(name: str, ports: list[int], ready_file: str | None = None, ipv6: bool = False) -> None:
    servers = [_Server(("0.0.0.0", port), _handler(name)) for port in ports]
    if ipv6:
        servers += [_Server6(("::", port), _handler(name)) for port in ports]
    for s in servers:
        s.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
    if ready_file:  # every port is bound: tell whoever started us
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, ready_file)
    # Serve until killed: SIGTERM's default action ends the process at once,
    # which is all a test bed's teardown needs.
    threading.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m merbridge_py.testbed.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="pod name reported by /whoami")
    parser.add_argument("--port", type=int, action="append", required=True, help="port to serve (repeatable)")
    parser.add_argument("--ready-file", help="created once every port is bound")
    parser.add_argument("--ipv6", action="store_true", help="also serve every port on [::] (a dual-stack pod)")
    args = parser.parse_args(argv)
    serve(args.name, args.port, args.ready_file, ipv6=args.ipv6)


if __name__ == "__main__":
    main()

"""The agent's local HTTP endpoints: /healthz, /readyz, /metrics (Prometheus),
/status (JSON for `merbridge-py status`)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {addr!r} is not HOST:PORT (e.g. 127.0.0.1:16019)")
    return host or "0.0.0.0", int(port)


class AgentHTTPServer:
    def __init__(self, addr: str, agent, metrics, is_attached, extra_routes=None, mode=lambda: None):
        self.agent, self.metrics, self.is_attached, self.mode = agent, metrics, is_attached, mode
        self.extra_routes = extra_routes or {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # access logs would drown the event log
                pass

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/healthz":
                    self._send(200, b"ok\n")
                elif path == "/readyz":
                    ok = server.is_attached() and server.agent.ready.is_set()
                    self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                elif path == "/metrics":
                    self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/status":
                    body = json.dumps({"attached": server.is_attached(), "ready": server.agent.ready.is_set(),
                                       "mode": server.mode(), "pods": server.agent.status(),
                                       "source_error": getattr(server.metrics.source, "last_error", None)},
                                      indent=2).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"not found\n")

            def do_POST(self):
                route = server.extra_routes.get(self.path.split("?")[0])
                if route is None:
                    self._send(404, b"not found\n")
                    return
                # Admin calls change the node's datapath: only from the node itself
                # (kubectl exec into the agent's pod reaches 127.0.0.1 too).
                if not self.client_address[0].startswith("127."):
                    self._send(403, b'{"error": "admin endpoints answer loopback only"}\n', "application/json")
                    return
                length = int(self.headers.get("Content-Length") or 0)
                code, body = route(self.rfile.read(length))
                self._send(code, json.dumps(body).encode(), "application/json")

        host, port = parse_addr(addr)
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

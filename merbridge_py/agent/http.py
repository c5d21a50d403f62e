"""The agent's two HTTP endpoints.

- The network port (--metrics-addr; on the node's network in a cluster) is
  read-only and says nothing about pods: GET /metrics, /healthz, /readyz.
- The admin socket (--admin-socket: a unix socket, mode 0600, in a directory
  only root may enter) serves GET /status (every pod with its IP and reason)
  and POST /mode (switch this node's datapath). Reaching it takes root on the
  node or `kubectl exec` into the agent's pod.

Each server runs an asyncio loop in a thread of its own, so an idle or slow
client costs a coroutine, not a thread. A connection carries one request and
must deliver it within REQUEST_DEADLINE. With MAX_CONNECTIONS open, a new one
pushes out the oldest still waiting for its request: a flood of idle
connections only closes flood connections, and a probe gets through. Answers
that do work (metrics, status, a mode switch) run on a pool of
HANDLER_THREADS threads. A malformed request gets a 4xx; nothing a client
sends stops the server.

The network port is unauthenticated, so a flood of scrapes must not starve
the kubelet's probes (a failed liveness probe restarts the agent), nor take
the node's CPU: /healthz and /readyz are answered on the event loop itself
(they read two flags and must never block), never queued behind pool work;
/metrics may have at most MAX_PENDING_SCRAPES requests in the pool and start
at most SCRAPES_PER_SECOND on average. Beyond either, a scrape is held
REJECT_DELAY and gets 503 (counted). A scrape itself costs the same whatever
the map sizes (merbridge_py/agent/metrics.py), so the flood's cost is bounded.
Measured (tests/test_agent_scrape_flood.py, a loaded 2-core machine): a
flood answered as fast as it came (~530 scrapes/s) kept the loop busy and
put /healthz's p99 at ~230 ms; bounded to 50 scrapes/s, the agent used 6-8%
of a core and the p99 was 13-54 ms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("merbridge_py.http")

MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 4096
REQUEST_DEADLINE = 5.0      # seconds from accept to the whole request read, and again to write the answer
MAX_CONNECTIONS = 256
HANDLER_THREADS = 2
MAX_PENDING_SCRAPES = 2 * HANDLER_THREADS   # /metrics requests in the pool or queued for it
# Far above any scraper's need (Prometheus: one every few seconds per replica)
# and tests polling a few metrics at 10 Hz, far below a flood's rate.
SCRAPES_PER_SECOND = 50.0
SCRAPE_BURST = 50           # scrapes that may start at once after a quiet spell
REJECT_DELAY = 1.0          # seconds a turned-away request waits for its 503 (its Retry-After)

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 409: "Conflict", 413: "Content Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}

# (method, path) -> handler(request body) -> (status, body, content type)
Handler = Callable[[bytes], tuple[int, bytes, str]]
Routes = dict[tuple[str, str], Handler]


class AdminSocketError(OSError):
    pass


def parse_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--metrics-addr {addr!r} is not HOST:PORT (e.g. 127.0.0.1:16019)")
    return host or "0.0.0.0", int(port)


class _BadRequest(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    """(method, path without query, body) of one HTTP/1.x request."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"request line and headers exceed {MAX_HEADER_BYTES} bytes")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    headers = {}
    for line in filter(None, lines[1:]):
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(400, "chunked bodies are not accepted; send Content-Length")
    length = headers.get("content-length", "0")
    if not (length.isascii() and length.isdigit()):
        raise _BadRequest(400, f"Content-Length {length[:20]!r} is not a number")
    if int(length) > MAX_BODY_BYTES:
        raise _BadRequest(413, f"body larger than {MAX_BODY_BYTES} bytes")
    body = await reader.readexactly(int(length))
    return parts[0], parts[1].split("?", 1)[0], body


def _response(code: int, body: bytes, ctype: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n").encode() + body


def _error(code: int, message: str) -> bytes:
    return _response(code, json.dumps({"error": message}).encode() + b"\n", JSON)


class RequestBound:
    """How much of the agent one path may take: at most `max_pending` of its
    requests in the pool at once, and at most `per_second` started on average
    (a token bucket holding at most `burst`). Only the event loop's thread uses it."""

    def __init__(self, max_pending: int, per_second: float, burst: int):
        self.max_pending, self.per_second, self.burst = max_pending, per_second, burst
        self.pending = 0
        self._tokens = float(burst)
        self._refilled = time.monotonic()

    def admit(self) -> str | None:
        """None, and the request counts as started; or why it may not start now."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._refilled) * self.per_second)
        self._refilled = now
        if self.pending >= self.max_pending:
            return f"{self.pending} requests for this path are being answered"
        if self._tokens < 1:
            return f"more than {self.per_second:.0f} requests a second for this path"
        self._tokens -= 1
        return None


class EndpointServer:
    """Serves `routes` on an already bound listening socket until stop()."""

    def __init__(self, sock: socket.socket, routes: Routes, name: str, peer_check=None,
                 on_loop: frozenset[str] = frozenset(), bounds: dict[str, RequestBound] | None = None,
                 on_reject=None):
        """`on_loop`: paths whose handlers are answered on the event loop, not
        the pool (they must not block). `bounds`: path -> its RequestBound;
        a request beyond it gets 503 and `on_reject(path)`."""
        self.sock, self.routes, self.name, self.peer_check = sock, routes, name, peer_check
        self.on_loop, self.bounds, self.on_reject = on_loop, dict(bounds or {}), on_reject
        self._waiting: OrderedDict[asyncio.StreamWriter, None] = OrderedDict()   # no request read yet
        self._open = 0
        self._pool = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix=f"{name}-handler")
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEADER_BYTES))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for writer in list(self._waiting):
                writer.transport.abort()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS and self._waiting:
            oldest, _ = self._waiting.popitem(last=False)
            oldest.transport.abort()
        self._open += 1
        self._waiting[writer] = None
        try:
            answer = await self._answer(reader, writer)
            self._waiting.pop(writer, None)
            writer.write(answer)
            await asyncio.wait_for(writer.drain(), REQUEST_DEADLINE)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass   # the client left, stalled, or was pushed out: nothing to answer
        finally:
            self._open -= 1
            self._waiting.pop(writer, None)
            writer.close()

    async def _answer(self, reader, writer) -> bytes:
        try:
            method, path, body = await asyncio.wait_for(_read_request(reader), REQUEST_DEADLINE)
        except _BadRequest as e:
            return _error(e.code, str(e))
        except asyncio.TimeoutError:
            return _error(408, f"no complete request within {REQUEST_DEADLINE:.0f} s")
        self._waiting.pop(writer, None)
        if self.peer_check is not None and (refusal := self.peer_check(writer.get_extra_info("socket"))):
            return _error(403, refusal)
        handler = self.routes.get((method, path))
        if handler is None:
            allowed = sorted(m for m, p in self.routes if p == path)
            if not allowed:
                return _error(404, f"no endpoint {path[:100]}")
            return _response(405, b'{"error": "method not allowed"}\n', JSON, f"Allow: {', '.join(allowed)}\r\n")
        bound = self.bounds.get(path)
        if bound is not None and (refusal := bound.admit()):
            if self.on_reject is not None:
                self.on_reject(path)
            # Held before the answer, as Retry-After says: a client that retries
            # at once (a scraping loop) then costs the loop one request a second,
            # not thousands that would delay every probe behind them.
            await asyncio.sleep(REJECT_DELAY)
            return _response(503, json.dumps({"error": f"{refusal}; retry later"}).encode() + b"\n", JSON,
                             f"Retry-After: {max(1, math.ceil(REJECT_DELAY))}\r\n")
        try:
            if path in self.on_loop:
                code, out, ctype = handler(body)
            else:
                if bound is not None:
                    bound.pending += 1
                try:
                    code, out, ctype = await self._loop.run_in_executor(self._pool, handler, body)
                finally:
                    if bound is not None:
                        bound.pending -= 1
        except Exception:
            log.exception("%s %s failed", method, path)
            return _error(500, "internal error; see the agent's log")
        return _response(code, out, ctype)


# --- the two listeners -------------------------------------------------------------------

def bind_network(addr: str) -> socket.socket:
    host, port = parse_addr(addr)
    # A full accept queue drops new SYNs, and a dropped SYN is retried after 1 s: the kubelet's whole probe
    # timeout. With 128, a burst of 1,000 connections (a flood) cost one probe 1.02 s in CI while the loop
    # caught up; the kernel caps this at net.core.somaxconn.
    return socket.create_server((host, port), backlog=socket.SOMAXCONN)


def bind_admin_socket(path: Path) -> socket.socket:
    """A unix socket at `path`, mode 0600, in a directory created 0700 if
    missing and refused if others may write to it (they could swap the socket).
    A socket file left by a dead agent is replaced; one a live agent answers on is not."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.parent.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or st.st_uid != os.geteuid():
        raise AdminSocketError(f"--admin-socket directory {path.parent} must be owned by this user and writable "
                               "by nobody else (it guards who can switch this node's datapath)")
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AdminSocketError(f"--admin-socket {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
            raise AdminSocketError(f"another agent answers on --admin-socket {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def root_or_self_only(sock: socket.socket) -> str | None:
    """Refusal message unless the peer runs as root or as this agent's user
    (the file mode already says so; the kernel's word on the peer makes sure)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return None if uid in (0, os.geteuid()) else f"uid {uid} may not use the admin socket"


PROBES = frozenset({"/healthz", "/readyz"})   # answered on the event loop: keep their handlers non-blocking


def network_routes(agent, metrics, is_serving) -> Routes:
    def readyz(_body):
        ok = is_serving() and agent.ready.is_set()
        return (200, b"ready\n", TEXT) if ok else (503, b"not ready\n", TEXT)
    return {("GET", "/healthz"): lambda _body: (200, b"ok\n", TEXT),
            ("GET", "/readyz"): readyz,
            ("GET", "/metrics"): lambda _body: (200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)}


def admin_routes(agent, metrics, is_serving, modes) -> Routes:
    def status(_body):
        body = {"attached": is_serving(), "ready": agent.ready.is_set(), "mode": modes.mode, "pods": agent.status(),
                "source_error": getattr(metrics.source, "last_error", None),
                "kernel": metrics.kernel.to_json() if getattr(metrics, "kernel", None) is not None else None,
                "backlog_tracing": getattr(getattr(metrics, "datapath", None), "backlog_tracing", None)}
        body.update(modes.status())   # mode, its origin and since when, whether the ConfigMap was read (issue 18)
        return 200, json.dumps(body, indent=2).encode(), JSON

    def mode(body):
        code, answer = modes.http_route(body)
        return code, json.dumps(answer).encode(), JSON
    return {("GET", "/status"): status, ("POST", "/mode"): mode}


class AgentEndpoints:
    """Both servers of one agent; bound on construction (errors surface there)."""

    def __init__(self, metrics_addr: str, admin_socket: Path, agent, metrics, is_serving, modes):
        self.admin_socket = Path(admin_socket)
        net_sock = bind_network(metrics_addr)
        try:
            admin_sock = bind_admin_socket(self.admin_socket)
        except OSError:
            net_sock.close()
            raise
        self._admin_inode = os.stat(self.admin_socket).st_ino
        self.network = EndpointServer(net_sock, network_routes(agent, metrics, is_serving), "http",
                                      on_loop=PROBES, bounds={"/metrics": RequestBound(
                                          MAX_PENDING_SCRAPES, SCRAPES_PER_SECOND, SCRAPE_BURST)},
                                      on_reject=getattr(metrics, "count_rejected", None))
        self.admin = EndpointServer(admin_sock, admin_routes(agent, metrics, is_serving, modes), "admin",
                                    peer_check=root_or_self_only)

    @property
    def address(self) -> tuple[str, int]:
        return self.network.sock.getsockname()[:2]

    def start(self) -> None:
        self.network.start()
        self.admin.start()

    def stop(self) -> None:
        self.network.stop()
        self.admin.stop()
        self.network.sock.close()
        self.admin.sock.close()
        try:   # only our own socket file: a successor may have bound a new one there
            if os.stat(self.admin_socket).st_ino == self._admin_inode:
                self.admin_socket.unlink()
        except FileNotFoundError:
            pass

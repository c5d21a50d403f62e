"""The agent's endpoints (merbridge_py/agent/http.py): what the network port
and the admin socket serve, that malformed requests get a 4xx and leave the
server serving, and that a flood of idle connections from another process
does not keep /healthz from answering. The servers run in this process with
a stand-in agent; every client is another process, as on a node."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from merbridge_py.agent import http
from merbridge_py.agent.mode import ModeController
from merbridge_py.agent.status import agent_request

FLOOD = 1000


class FakeDatapath:
    def __init__(self):
        self.mode = "ebpf"

    def set_mode(self, mode):
        self.mode = mode


class FakeAgent:
    def __init__(self):
        self.ready = threading.Event()
        self.ready.set()

    def status(self):
        return [{"pod": "default/secret-pod", "ip": "10.9.9.9", "accelerated": True, "reason": "accelerated"}]


class FakeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        Counter("merbridge_test_total", "a sample", registry=self.registry).inc()
        self.source = None      # the pod source, whose last_error /status shows


@pytest.fixture
def endpoints(tmp_path):
    modes = ModeController(FakeDatapath())
    eps = http.AgentEndpoints("127.0.0.1:0", tmp_path / "admin" / "agent.sock", FakeAgent(), FakeMetrics(),
                              lambda: True, modes)
    eps.start()
    eps.modes = modes
    try:
        yield eps
    finally:
        eps.stop()


def from_another_process(code: str, timeout: float = 60) -> dict:
    """Run `code` (which prints one JSON line) in a new Python process."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def raw(address, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` as it is, return the whole answer (the server closes after one)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_code(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_network_port_is_read_only_and_lists_no_pods(endpoints):
    host, port = endpoints.address
    seen = from_another_process(f"""
        import json, urllib.request, urllib.error
        base = "http://{host}:{port}"
        out = {{}}
        def call(path, data=None):
            req = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
        for path in ("/healthz", "/readyz", "/metrics", "/status", "/"):
            out["GET " + path] = call(path)
        out["POST /mode"] = call("/mode", b'{{"mode": "iptables"}}')
        out["POST /healthz"] = call("/healthz", b'{{"mode": "iptables"}}')
        print(json.dumps(out))
    """)
    assert seen["GET /healthz"][0] == 200 and seen["GET /readyz"][0] == 200
    assert seen["GET /metrics"][0] == 200 and "merbridge_test_total 1.0" in seen["GET /metrics"][1]
    assert seen["GET /status"][0] == 404 and seen["GET /"][0] == 404
    assert seen["POST /mode"][0] == 404 and seen["POST /healthz"][0] == 405
    assert not any("secret-pod" in body or "10.9.9.9" in body for _, body in seen.values())
    assert endpoints.modes.mode == "ebpf", "a POST on the network port changed the mode"


def test_admin_socket_serves_status_and_mode_root_only(endpoints):
    path = endpoints.admin_socket
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert agent_request(path, "/status")["pods"][0]["pod"] == "default/secret-pod"
    assert agent_request(path, "/mode", {"mode": "iptables"}) == {"mode": "iptables"}
    assert endpoints.modes.mode == "iptables"
    # another user is refused by the file mode, and by the server if the mode were wrong
    refused = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sys.executable,
                              "-c", f"import socket; socket.socket(socket.AF_UNIX).connect({str(path)!r})"],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "PermissionError" in refused.stderr


@pytest.mark.parametrize("request_bytes, code", [
    (b"POST /mode HTTP/1.1\r\nContent-Length: abc\r\n\r\n{}", 400),
    (b"POST /mode HTTP/1.1\r\nContent-Length: -5\r\n\r\n{}", 400),
    (b"POST /mode HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /mode HTTP/1.1\r\nContent-Length: 9\r\n\r\nnot json!", 400),
    (b'POST /mode HTTP/1.1\r\nContent-Length: 15\r\n\r\n{"mode": "xdp"}', 400),
    (b"POST /mode HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
    (b"DELETE /mode HTTP/1.1\r\n\r\n", 405),
    (b"BLAH\r\n\r\n", 400),
    (b"GET /status HTTP/1.1\r\nX: " + b"y" * 10000 + b"\r\n\r\n", 431),
    (b"GET /status HTTP/1.1\r\nno colon here\r\n\r\n", 400),
])
def test_malformed_request_gets_4xx_and_server_keeps_serving(endpoints, request_bytes, code):
    assert status_code(raw(str(endpoints.admin_socket), request_bytes)) == code
    assert endpoints.modes.mode == "ebpf"
    assert agent_request(endpoints.admin_socket, "/status")["mode"] == "ebpf"
    assert status_code(raw(endpoints.address, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200


def test_a_request_that_never_completes_times_out(endpoints, monkeypatch):
    monkeypatch.setattr(http, "REQUEST_DEADLINE", 0.5)
    start = time.monotonic()
    answer = raw(endpoints.address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")   # no blank line: headers never end
    assert status_code(answer) == 408 and time.monotonic() - start < 5


def test_a_flood_of_idle_connections_does_not_stop_healthz(endpoints):
    """FLOOD idle TCP connections from another process, held open while that
    process also times /healthz on a fresh connection; before the flood, the
    same probes for comparison. The bound is one of correctness (answers at
    all, within the kubelet's default 1 s probe timeout), not of speed."""
    host, port = endpoints.address
    seen = from_another_process(f"""
        import json, socket, statistics, time
        def probe():
            start = time.monotonic()
            s = socket.create_connection(("{host}", {port}), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.1\\r\\n\\r\\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            s.close()
            assert answer.startswith(b"HTTP/1.1 200"), answer
            return time.monotonic() - start
        before = [probe() for _ in range(20)]
        flood = []
        for _ in range({FLOOD}):
            flood.append(socket.create_connection(("{host}", {port}), timeout=5))
        during = []
        for _ in range(20):
            during.append(probe())
            time.sleep(0.05)
        print(json.dumps({{"before": statistics.median(before), "during": statistics.median(during),
                          "during_max": max(during), "flood": len(flood)}}))
    """)
    print(f"\n/healthz median {seen['before'] * 1000:.1f} ms before, {seen['during'] * 1000:.1f} ms "
          f"(max {seen['during_max'] * 1000:.1f} ms) with {seen['flood']} idle connections open")
    assert seen["flood"] == FLOOD
    assert seen["during_max"] < 1.0


def test_admin_socket_refuses_an_unsafe_directory_and_a_live_agent(tmp_path, endpoints):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(http.AdminSocketError, match="writable by nobody else"):
        http.bind_admin_socket(shared / "agent.sock")
    with pytest.raises(http.AdminSocketError, match="another agent answers"):
        http.bind_admin_socket(endpoints.admin_socket)
    # a socket file left by a dead agent is replaced
    stale = tmp_path / "stale" / "agent.sock"
    http.bind_admin_socket(stale).close()
    http.bind_admin_socket(stale).close()


class BlockingCollector:
    """A /metrics that does not answer until released: scrapes stuck in every pool thread."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def collect(self):
        self.entered.release()
        self.release.wait(30)
        return []


def test_probes_answer_while_every_scrape_thread_is_stuck_and_extra_scrapes_are_turned_away(tmp_path, monkeypatch):
    """/healthz and /readyz do not wait for the pool; once MAX_PENDING_SCRAPES
    scrapes are taken, more get 503 after REJECT_DELAY (counted) instead of queueing."""
    monkeypatch.setattr(http, "REJECT_DELAY", 0.2)
    metrics, blocker = FakeMetrics(), BlockingCollector()
    metrics.registry.register(blocker)
    rejected = []
    metrics.count_rejected = rejected.append
    eps = http.AgentEndpoints("127.0.0.1:0", tmp_path / "admin" / "agent.sock", FakeAgent(), metrics,
                              lambda: True, ModeController(FakeDatapath()))
    eps.start()
    stuck = []
    try:
        def scrape():
            stuck.append(status_code(raw(eps.address, b"GET /metrics HTTP/1.1\r\n\r\n", timeout=30)))
        scrapers = [threading.Thread(target=scrape) for _ in range(http.MAX_PENDING_SCRAPES)]
        for t in scrapers:
            t.start()
        for _ in range(http.HANDLER_THREADS):   # every pool thread is inside a scrape
            assert blocker.entered.acquire(timeout=10)
        deadline = time.monotonic() + 10       # and the rest of them are queued for the pool
        while eps.network.bounds["/metrics"].pending < http.MAX_PENDING_SCRAPES:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # (raw() would time out after 10 s: the stuck scrapes are held for 30)
        assert status_code(raw(eps.address, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
        assert status_code(raw(eps.address, b"GET /readyz HTTP/1.1\r\n\r\n")) == 200
        start = time.monotonic()
        answer = raw(eps.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status_code(answer) == 503 and b"Retry-After: 1" in answer
        assert time.monotonic() - start >= http.REJECT_DELAY, "a turned-away scrape was answered before its delay"
        assert rejected == ["/metrics"]
        assert stuck == []
        blocker.release.set()
        for t in scrapers:
            t.join(30)
        assert stuck == [200] * http.MAX_PENDING_SCRAPES
        assert status_code(raw(eps.address, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
    finally:
        blocker.release.set()
        eps.stop()


def test_a_bound_admits_its_rate_and_no_more_at_once():
    bound = http.RequestBound(max_pending=4, per_second=10, burst=3)
    assert [bound.admit() for _ in range(3)] == [None] * 3     # the burst
    assert "more than 10 requests a second" in bound.admit()
    time.sleep(0.25)                                           # refilled at 10 a second
    assert bound.admit() is None
    bound.pending = 4
    time.sleep(0.25)
    assert "4 requests" in bound.admit()

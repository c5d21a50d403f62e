"""The load client that the toggle and restart tests trust to count every
failure: it must see each kind of failure, and no failure where there is none.
Runs against servers on loopback in this process (no namespaces, fast)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from merbridge_py.testbed import app
from merbridge_py.testbed.load import Target, run


@pytest.fixture
def whoami_server():
    """The test bed's app, answering as pod "b"."""
    server = app._Server(("127.0.0.1", 0), app._handler("b"))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def one_answer_server():
    """Answers the first request of each connection correctly, then closes it
    without answering the second: a keep-alive connection that breaks."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                body = b'{"pod": "b"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)
                conn.recv(4096)   # the second request; closed unanswered

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()


def load(port: int, pod: str = "b", **kw):
    args = dict(keepalive=1, newconn=1, duration=0.6, rotate=0.0, timeout=2.0) | kw
    return asyncio.run(run([Target(pod, "127.0.0.1", port)], **args))


def test_counts_every_request_and_rotates_keepalive_connections(whoami_server):
    tally = load(whoami_server, keepalive=2, rotate=0.2)
    assert tally.requests > 20 and tally.failed == 0 and tally.failures == []
    assert not any(c.broken for c in tally.keepalive)
    # two workers, each replacing its connection every 0.2 s over 0.6 s
    assert len({c.worker for c in tally.keepalive}) == 2 and len(tally.keepalive) >= 4
    served_by_keepalive = sum(c.requests for c in tally.keepalive)
    assert tally.connections == len(tally.keepalive) + (tally.requests - served_by_keepalive)


def test_an_answer_from_the_wrong_pod_is_a_failure(whoami_server):
    tally = load(whoami_server, pod="x", newconn=0)
    assert tally.requests == tally.failed > 0
    assert {f["kind"] for f in tally.failures} == {"response"}
    assert "answered by pod 'b', expected 'x'" in tally.failures[0]["error"]


def test_a_keepalive_connection_closed_under_a_request_is_broken(one_answer_server):
    tally = load(one_answer_server, newconn=0)
    assert tally.failed > 0 and {f["kind"] for f in tally.failures} == {"broken"}
    # every connection served one request and broke on the second, except
    # perhaps the last, which the deadline may have cut short
    *done, last = tally.keepalive
    assert all(c.requests == 1 and c.broken for c in done) and last.requests <= 1
    assert tally.requests - tally.failed == sum(c.requests for c in tally.keepalive)


def test_a_refused_connect_is_a_failed_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # bound, not listening: connects are refused
        tally = load(port, keepalive=0, duration=0.2)
    assert tally.requests == tally.failed > 0
    assert {f["kind"] for f in tally.failures} == {"connect"}

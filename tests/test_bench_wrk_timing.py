"""wrk with the bench's scripts against a tiny keep-alive server in a scratch
namespace: the percentiles are of the requests as timed (Little's law holds:
with c connections busy all the time, mean latency x rate <= c), and every
request was timed."""

import os
import subprocess
import sys
import time

import pytest

from merbridge_py import sandbox
from merbridge_py.bench import loads

pytestmark = pytest.mark.bpf      # needs root for the namespace

SERVER = """
import socket, threading
RESP = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 18080)); s.listen(64)
def serve(c):
    buf = b""
    while True:
        try:
            d = c.recv(65536)
        except OSError:
            return
        if not d:
            return
        buf += d
        while b"\\r\\n\\r\\n" in buf:
            _, buf = buf.split(b"\\r\\n\\r\\n", 1)
            c.sendall(RESP)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


@pytest.fixture
def server_ns():
    ns = f"{sandbox.OWNED_PREFIX}benchwrk{os.getpid()}"
    sandbox.netns_add(ns)
    proc = None
    try:
        sandbox.sh("ip", "link", "set", "lo", "up", netns=ns)
        proc = sandbox.spawn([sys.executable, "-c", SERVER], netns=ns)
        deadline = time.monotonic() + 20
        while ":18080" not in sandbox.sh("ss", "-Hltn", netns=ns):
            assert proc.poll() is None and time.monotonic() < deadline, "test server did not start"
            time.sleep(0.1)
        yield ns
    finally:
        if proc is not None:
            sandbox.stop(proc)
        sandbox.netns_delete(ns)


@pytest.mark.parametrize("connections", [1, 3])
def test_report_script_times_every_request(server_ns, tmp_path, connections):
    script = tmp_path / "report.lua"
    script.write_text(loads.WRK_REPORT_LUA)
    argv = loads.wrk_argv("127.0.0.1", connections, 2, str(script), new_connection=False, port=18080)
    out = subprocess.run(["ip", "netns", "exec", server_ns] + argv, capture_output=True, text=True, timeout=60)
    r = loads.parse_wrk(out.stdout)           # also checks that every request was timed
    assert 0 < r.p50_us <= r.p90_us <= r.p99_us
    # Little's law: c connections each with one request outstanding at a time
    # spend at most c x the run's duration in requests
    mean_us = int(out.stdout.split("mean_us=")[1].split()[0])
    assert mean_us * r.requests <= connections * r.duration_s * 1e6 * 1.02, out.stdout
    assert r.wrk_corrected_p99_us is not None


def test_fixedrate_script_keeps_its_schedule_and_times_requests(server_ns, tmp_path):
    script = tmp_path / "fixed.lua"
    script.write_text(loads.WRK_FIXEDRATE_LUA)
    argv = loads.wrk_fixedrate_argv("127.0.0.1", 2, 2, str(script), rps=200, payload_bytes=64, port=18080)
    out = subprocess.run(["ip", "netns", "exec", server_ns] + argv, capture_output=True, text=True, timeout=60)
    r = loads.parse_wrk(out.stdout)
    assert r.late_slots is not None and 250 <= r.requests <= 500, out.stdout
    assert 0 < r.p50_us <= r.p99_us

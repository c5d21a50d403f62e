"""Backpressure at any rate (issue 20): a reader that stops reading must not
let a writer push everything into kernel memory through the eBPF path.

Through Envoy sidecars, same node, ebpf mode, with bulk detection out of
the way (its threshold at its maximum, so only backpressure can hold a
writer back; before it, the writer below had all of TOTAL accepted): a
writer offers TOTAL bytes as fast as its socket takes them to an app that
has not read a byte. The bytes accepted must stay under what TCP could hold
on the three legs (app -> sidecar, sidecar -> sidecar, sidecar -> app) plus
the backlog limit per spliced leg and the sidecars' buffers; the switch to
TCP must be counted; and once the reader reads, every byte must arrive, in
order. A second test shows readers' progress is counted (the fexit side): a
reader in lock step with its writer moves many times the limit and no
socket switches. Where the kernel refuses fexit programs (the agent says
why: EPERM, e.g. kernel lockdown, as on this project's own machines) the
agent's default fallback keeps the limit without counting reads (the
budget): the first test holds as it is (counted as backpressure), and in the
second every spliced socket switches to TCP after the limit, its bytes
still arriving in order.
Nothing here is timed: the writer stops offering when the
path has accepted nothing for a while, which only makes the count smaller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from unittest import mock

import pytest

from helpers.reader_hooks import a_reader_hook_must_load
from helpers.splicing import probes_allow_splicing
from merbridge_py import kernel_probes, sandbox
from merbridge_py.loader import TRACING_REFUSED
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

PORT = 9310
LOCKSTEP_PORT = 9311
BACKLOG_BYTES = 1 << 20
TOTAL = 256 << 20
LEGS = 3
ENVOY_BUFFERS = 4 << 20       # two sidecars, a 1 MiB per-connection buffer limit each way
BACKPRESSURE = 'merbridge_splice_skipped_total{reason="backpressure"}'
SPLICED = "merbridge_spliced_bytes_total"
APP = [sys.executable, "-m", "merbridge_py.testbed.stall_app"]


@pytest.fixture(scope="module")
def bed():
    env = {"MERBRIDGE_BACKLOG_BYTES": str(BACKLOG_BYTES), "MERBRIDGE_BULK_BYTES": str((1 << 32) - 1)}
    if not probes_allow_splicing():
        # backpressure is about spliced sockets: where FIONREAD rules splicing out (6.1), force it
        # (this app sizes no read with FIONREAD)
        env[kernel_probes.SPLICE_MODE_ENV] = kernel_probes.SPLICE_SK_MSG
    with mock.patch.dict(os.environ, env):   # the agents inherit it; restored afterwards
        with Testbed.up(f"bp{os.getpid() % 10000}{uuid.uuid4().hex[:3]}", nodes=1,
                        pods=[PodSpec("a", node=0), PodSpec("b", node=0)], mode="ebpf") as tb:
            yield tb


def tcp_buffer_max(tb: Testbed, pod: str) -> int:
    """What TCP lets one connection hold at most in this pod: the largest
    receive buffer plus the largest send buffer (tcp_rmem/tcp_wmem, per
    network namespace)."""
    rmem = sandbox.sh("cat", "/proc/sys/net/ipv4/tcp_rmem", netns=tb.pod(pod).netns).split()
    wmem = sandbox.sh("cat", "/proc/sys/net/ipv4/tcp_wmem", netns=tb.pod(pod).netns).split()
    return int(rmem[2]) + int(wmem[2])


def reader_tracing(tb: Testbed) -> str:
    """"attached", or "unavailable" where the kernel may refuse both reader
    hooks (before 6.4, fexit refused under lockdown); any other reason, or
    the fallback on a kernel that must take a hook, is a bug."""
    m = tb.agent_metrics("node0")
    status = subprocess.run([sys.executable, "-m", "merbridge_py.cli", "status", "--json", "--admin-socket",
                             str(tb.admin_socket("node0"))], capture_output=True, text=True, timeout=60)
    tracing = json.loads(status.stdout)["backlog_tracing"]
    print(f"backpressure: reader tracing {tracing}")   # which hook, in the VMs' logs too
    if m['merbridge_backlog_tracing{state="attached"}'] == 1:
        return "attached"
    must = a_reader_hook_must_load()
    assert must is None, f"no reader hook attached ({tracing}) although {must}"
    assert m['merbridge_backlog_tracing{state="unavailable"}'] == 1, m
    assert f"({TRACING_REFUSED}:" in tracing, tracing
    return "unavailable"


def test_a_paused_reader_holds_the_writer_back(bed):
    tracing = reader_tracing(bed)
    before = bed.agent_metrics("node0")
    server = bed.exec("b", APP + ["serve", "--port", str(PORT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.STDOUT, text=True)
    writer = None
    try:
        assert server.stdout.readline().strip() == "ready"
        writer = bed.exec("a", APP + ["offer", "--host", bed.pod("b").ip, "--port", str(PORT), "--total", str(TOTAL),
                                      "--idle-seconds", "8"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "accepted"
        line = writer.stdout.readline()
        assert line, writer.stderr.read()
        accepted = json.loads(line)["accepted"]
        middle = bed.agent_metrics("node0")
        server.stdin.write("resume\n")   # read everything now
        server.stdin.flush()
        read = json.loads(server.stdout.readline())
        assert writer.wait(timeout=300) == 0, writer.stderr.read()
    finally:
        for proc in (server, writer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    bound = LEGS * (BACKLOG_BYTES + max(tcp_buffer_max(bed, p) for p in ("a", "b"))) + ENVOY_BUFFERS
    assert accepted < min(bound, TOTAL), (f"the writer had {accepted} bytes accepted by a reader that read "
                                          f"nothing (bound {bound})")
    # where readers' progress cannot be counted, the agent's default fallback (the budget) keeps the limit
    assert middle.get(BACKPRESSURE, 0) > before.get(BACKPRESSURE, 0), \
        f"no spliced socket switched to TCP ({BACKPRESSURE})"
    assert middle.get(SPLICED, 0) > before.get(SPLICED, 0), "nothing was spliced: the test proves nothing"
    assert read == {"bytes": accepted, "in_order": True, "first_bad": None}


def test_a_reader_that_keeps_up_stays_spliced(bed):
    """The reader's progress is counted: 32 times the limit in lock step
    (half the limit outstanding at most) and no socket switches. Where the
    kernel refuses the fexit programs, the fallback instead: every spliced
    socket goes to TCP after the limit, and the bytes still arrive in order."""
    tracing = reader_tracing(bed)
    before = bed.agent_metrics("node0")
    server = bed.exec("b", APP + ["serve", "--port", str(LOCKSTEP_PORT), "--ack-every", str(BACKLOG_BYTES // 2)],
                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        done = bed.exec_in("a", APP + ["offer", "--host", bed.pod("b").ip, "--port", str(LOCKSTEP_PORT),
                                       "--total", str(32 * BACKLOG_BYTES), "--ack-every", str(BACKLOG_BYTES // 2)],
                           timeout=300)
        assert done.returncode == 0, done.stderr
        read = json.loads(server.stdout.readline())
    finally:
        server.kill()
        server.wait()
    after = bed.agent_metrics("node0")
    assert read == {"bytes": 32 * BACKLOG_BYTES, "in_order": True, "first_bad": None}
    if tracing == "unavailable":
        # the budget fallback: nothing counts as read, so the spliced sockets of this transfer
        # (each sends 32 times the limit) switch to TCP after the limit, the bytes arriving all the same
        assert after.get(SPLICED, 0) > before.get(SPLICED, 0), "nothing was spliced: the test proves nothing"
        assert after.get(BACKPRESSURE, 0) > before.get(BACKPRESSURE, 0), \
            "the budget fallback let a spliced socket send 32 times the limit"
        return
    assert after.get(SPLICED, 0) - before.get(SPLICED, 0) >= 32 * BACKLOG_BYTES, "the transfer was not spliced"
    assert after.get(BACKPRESSURE, 0) == before.get(BACKPRESSURE, 0), \
        "a socket whose reader kept up was switched to TCP: readers' progress is not counted"

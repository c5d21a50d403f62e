"""Issue 20, byte order at the start of a connection, at kernel level (no
Envoy): the agent's sockops + sk_msg programs on one simulated node, the
splice policy "always" so every connection is spliced, and the stress load of
merbridge_py/testbed/order_load.py checking every byte.

Each end joins the sockhash in its own sockops callback; a client that writes
the moment connect() returns may find the server's socket not yet in the
sockhash (its message goes through TCP into the receive queue, counted as a
splice miss), and its next message redirected into the server's ingress
queue, which the kernel reads first. These tests aim at that window:
  - the inbound leg (a client bound to 127.0.0.6 in an accelerated pod, as
    the sidecar's upstream is, to the pod's app): both ends spliced, no proxy
    between the writes and the reader;
  - the whole path a -> sidecar a -> sidecar b -> b (three spliced legs,
    forwarding sidecars that write what they read at once);
with the server waiting a little after accept before its first read, so
bytes of both paths are queued when it reads, and with busy-loop processes
(started and stopped by pid here) taking CPU from the kernel's softirq work.

MERBRIDGE_ORDER_CONNECTIONS sets the connections per case (default 20,000:
the CI size). The full >= 200,000-connection run through Envoy is
benchmarks/byte_order.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from merbridge_py import sandbox
from helpers.splicing import probes_allow_splicing
from merbridge_py.kernel_probes import SPLICE_MODE_ENV, SPLICE_SK_MSG

pytestmark = pytest.mark.bpf

CONNECTIONS = int(os.environ.get("MERBRIDGE_ORDER_CONNECTIONS", "20000"))
ORDER_PORT = 9300
PY = sys.executable


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("order"))
    try:
        for name in ("a", "b"):
            pod = n.add_pod(name, meshed=True)
            n.start_app(pod)
            n.start_sidecar(pod)
        n.write_pods_file()
        with pytest.MonkeyPatch.context() as env:
            # Where the kernel probes turn splicing off (6.1 in the kernel matrix: FIONREAD hides
            # redirected bytes), the agent would splice nothing and this would test plain TCP: force
            # the splice, as tests/test_datapath.py does, so the kernel's sockmap ordering is tested.
            if not probes_allow_splicing():
                env.setenv(SPLICE_MODE_ENV, SPLICE_SK_MSG)
            n.start_agent("--splice", "always")
        yield n
    finally:
        n.close()


def metric(node, name: str) -> float:
    m = re.search(rf"^{name}(?:_total)? (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


class CpuHogs:
    """Busy-loop processes on every core, started and stopped by pid."""

    def __init__(self, count: int):
        self.procs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(count)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def run_order_load(node, server_pod, client_pod, target: str, connections: int, bind: str | None = None,
                   first_read_delay_ms: float = 2.0, defer_accept: int = 0, fastopen: bool = False,
                   timeout: float = 1800) -> tuple[dict, dict]:
    server = sandbox.spawn([PY, "-m", "merbridge_py.testbed.order_load", "serve", "--port", str(ORDER_PORT),
                            "--workers", "2", "--first-read-delay-ms", str(first_read_delay_ms),
                            "--defer-accept", str(defer_accept)] + (["--fastopen"] if fastopen else []),
                           netns=server_pod.netns, cgroup=server_pod.cgroup, stdout=subprocess.PIPE, text=True)
    node.procs.append(server)
    try:
        assert server.stdout.readline().strip() == "ready"
        argv = ["-m", "merbridge_py.testbed.order_load", "send", "--target", target,
                "--connections", str(connections), "--workers", "4"]
        if bind:
            argv += ["--bind", bind]
        if fastopen:
            argv.append("--fastopen")
        client = sandbox.spawn([PY, *argv], netns=client_pod.netns, cgroup=client_pod.cgroup,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        node.procs.append(client)
        out, err = client.communicate(timeout=timeout)
        assert client.returncode == 0, err
        sent = json.loads(out)
    finally:
        server.send_signal(signal.SIGTERM)
    received = json.loads(server.stdout.readline())
    server.wait(30)
    return sent, received


def assert_every_byte_in_order(sent: dict, received: dict, connections: int) -> None:
    assert received["answer_errors"] == 0, received["answer_error_examples"]
    assert sent["errors"] == 0, (sent["error_examples"], received)
    assert (sent["reordered"], sent["corrupted"], sent["short"]) == (0, 0, 0), (sent, received["examples"])
    assert (received["reordered"], received["corrupted"], received["short"]) == (0, 0, 0), received
    assert sent["ok"] == received["ok"] == connections
    assert sent["bytes"] == received["bytes"]


@pytest.mark.parametrize("contention", [False, True], ids=["idle", "cpu-contention"])
def test_inbound_leg_writes_right_after_connect_arrive_in_order(node, contention):
    a = node.pods["a"]
    inserts, misses = metric(node, "merbridge_sockhash_inserts"), metric(node, "merbridge_splice_misses")
    with CpuHogs((os.cpu_count() or 2) if contention else 0):
        sent, received = run_order_load(node, a, a, f"{a.ip}:{ORDER_PORT}", CONNECTIONS, bind="127.0.0.6")
    inserted = metric(node, "merbridge_sockhash_inserts") - inserts
    missed = metric(node, "merbridge_splice_misses") - misses
    print(f"\n{sent['connections']} connections, {sent['bytes']} bytes in {sent['seconds']} s; "
          f"sockhash inserts {inserted:.0f}, splice misses {missed:.0f}; {sent}")
    assert_every_byte_in_order(sent, received, CONNECTIONS)
    # Both ends of every connection were spliced: the load ran where the race is.
    assert inserted >= 2 * CONNECTIONS


@pytest.mark.slow
def test_through_both_sidecars_writes_right_after_connect_arrive_in_order(node):
    a, b = node.pods["a"], node.pods["b"]
    connections = max(1000, CONNECTIONS // 4)   # three legs and two Python forwarders per connection
    inserts = metric(node, "merbridge_sockhash_inserts")
    with CpuHogs(1):
        sent, received = run_order_load(node, b, a, f"{b.ip}:{ORDER_PORT}", connections)
    inserted = metric(node, "merbridge_sockhash_inserts") - inserts
    print(f"\n{sent['connections']} connections through the sidecars in {sent['seconds']} s; "
          f"sockhash inserts {inserted:.0f}; {sent}")
    assert_every_byte_in_order(sent, received, connections)
    assert inserted >= 6 * connections


# Until sk_msg stops redirecting after a miss (branch fionread: send_state.missed),
# this reorders: measured on main, 998 of 1000 connections reordered, the
# body's later bytes read before the header that went through TCP.
_SK_MSG_STICKS_TO_TCP_AFTER_A_MISS = "missed" in (Path(__file__).parent.parent / "ebpf" / "merbridge.h").read_text()


@pytest.mark.xfail(not _SK_MSG_STICKS_TO_TCP_AFTER_A_MISS, strict=True,
                   reason="sk_msg redirects again after a miss: TCP bytes are overtaken (issue 20)")
def test_deferred_accept_server_gets_every_byte_in_order(node):
    """TCP_DEFER_ACCEPT (nginx's `listen ... deferred`) moves the server end's
    sockops callback after the first data: the first write cannot be
    redirected (the server socket is not in the sockhash yet), later ones can."""
    a = node.pods["a"]
    connections = max(1000, CONNECTIONS // 4)
    misses = metric(node, "merbridge_splice_misses")
    sent, received = run_order_load(node, a, a, f"{a.ip}:{ORDER_PORT}", connections, bind="127.0.0.6",
                                    defer_accept=5)
    missed = metric(node, "merbridge_splice_misses") - misses
    print(f"\n{sent['connections']} connections to a deferred-accept server; splice misses {missed:.0f}; {sent}; "
          f"server examples {received['examples']}")
    assert missed >= connections, "the first write of each connection should have missed the peer"
    assert_every_byte_in_order(sent, received, connections)


def netstat(pod, field: str) -> int:
    lines = sandbox.sh("cat", "/proc/net/netstat", netns=pod.netns).splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if field in names.split():
            return int(values.split()[names.split().index(field)])
    raise KeyError(field)


def test_fast_open_data_in_the_syn_arrives_in_order(node):
    """TCP Fast Open: the header rides in the SYN, through TCP, before either
    end's sockops callback has run; later writes may be redirected."""
    a = node.pods["a"]
    sandbox.sh("sysctl", "-q", "-w", "net.ipv4.tcp_fastopen=3", netns=a.netns)
    connections = max(1000, CONNECTIONS // 4)
    syn_data = netstat(a, "TCPFastOpenPassive")
    sent, received = run_order_load(node, a, a, f"{a.ip}:{ORDER_PORT}", connections, bind="127.0.0.6",
                                     fastopen=True)
    syn_data = netstat(a, "TCPFastOpenPassive") - syn_data
    print(f"\n{sent['connections']} connections with TCP Fast Open, {syn_data} with data in the SYN; {sent}; "
          f"server examples {received['examples']}")
    assert syn_data > connections // 2, "TCP Fast Open was not used: the test did not test it"
    assert_every_byte_in_order(sent, received, connections)

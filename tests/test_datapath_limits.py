"""Issue 13: the datapath's fallbacks. A connection the connect hook cannot
redirect safely is left to the normal path (iptables on a real node; this node
has no rules, so it goes straight to the destination) and counted; many short
connections leave the per-connection maps as they found them; a deliberately
small per-connection map still serves every connection.

Pods a and b meshed (test sidecars), one simulated node, no iptables rules.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merbridge_py import sandbox

pytestmark = pytest.mark.bpf

HERE = Path(__file__).resolve().parent
CONN_CLIENT = str(HERE / "helpers" / "conn_client.py")
PER_CONNECTION_MAPS = ("connect_original_dst", "original_dst", "sock_pairs")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("limits"))
    try:
        a, b = n.add_pod("a", meshed=True), n.add_pod("b", meshed=True)
        for pod in (a, b):
            # Tens of thousands of connections to one listener within a minute: let the
            # client side reuse TIME_WAIT ports (the pods' own namespaces only).
            sandbox.sh("sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1", netns=pod.netns)
            sandbox.sh("sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000", netns=pod.netns)
            n.start_app(pod)
            n.start_sidecar(pod)
        n.write_pods_file()
        yield n
    finally:
        n.close()


def conn_client(node, pod, *args, timeout=600) -> str:
    p = sandbox.spawn([sys.executable, CONN_CLIENT, *map(str, args)], netns=node.pods[pod].netns,
                      cgroup=node.pods[pod].cgroup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node.procs.append(p)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out.strip()


def metric(node, name: str, labels: str = "") -> float:
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def map_entries(node) -> dict[str, float]:
    return {m: metric(node, "merbridge_map_entries", f'{{map="{m}"}}') for m in PER_CONNECTION_MAPS}


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def agent(node):
    node.start_agent()
    yield node
    rc, out = node.stop_agent()
    assert rc == 0, out


def test_failed_bind_leaves_the_connection_to_the_normal_path(agent):
    """An app that binds its socket before connecting has a port already, so
    the hook's bpf_bind to the pod IP fails: without that bind the redirected
    connection would come from 127.0.0.1, where 4-tuples of different pods can
    collide in the original_dst map. It must not be redirected."""
    a, b = agent.pods["a"], agent.pods["b"]
    bind_errors = metric(agent, "merbridge_datapath_errors_total", '{kind="bind"}')
    redirects = metric(agent, "merbridge_redirects_total", '{direction="outbound"}')
    records = len(agent.sidecar_records(a))
    name, peer = conn_client(agent, "a", "bound", b.ip, 8080).split()
    assert name == "b"
    assert peer.startswith(f"{a.ip}:"), "not redirected: the app saw the client itself, not a sidecar"
    assert metric(agent, "merbridge_datapath_errors_total", '{kind="bind"}') == bind_errors + 1
    assert metric(agent, "merbridge_redirects_total", '{direction="outbound"}') == redirects
    assert len(agent.sidecar_records(a)) == records
    # the same request without the app's own bind is redirected (the test can tell the two apart)
    r = agent.client(a, "churn", b.ip, 8080, 1)
    assert r.stdout.strip() == "ok=1 failed=0", r.stderr
    assert metric(agent, "merbridge_redirects_total", '{direction="outbound"}') == redirects + 1


CHURN = int(os.environ.get("MERBRIDGE_CHURN_CONNECTIONS", "100000"))  # fewer for a quick local run


def test_connection_churn_returns_the_maps_to_baseline(agent):
    b = agent.pods["b"]
    baseline = map_entries(agent)
    redirects = metric(agent, "merbridge_redirects_total", '{direction="outbound"}')
    start = time.monotonic()
    r = agent.client(agent.pods["a"], "churn", b.ip, 8080, CHURN, timeout=900)
    print(f"churn of {CHURN} connections: {r.stdout.strip()} in {time.monotonic() - start:.0f}s")
    assert r.stdout.strip() == f"ok={CHURN} failed=0", r.stdout + r.stderr
    assert metric(agent, "merbridge_redirects_total", '{direction="outbound"}') - redirects == CHURN
    # Entries go when their sockets close; the last sockets may still be closing.
    assert wait_for(lambda: map_entries(agent) == baseline), (baseline, map_entries(agent))


SMALL_MAP = 64
HELD = 300


def test_connections_beyond_a_small_map_still_succeed(node):
    """Per-connection maps of 64 entries, 300 connections held open at once
    (each one two sockets in the sockhash at each of 3 legs): sockets that
    do not fit are not spliced and use TCP, counted; the original-destination
    maps are LRU and only ever lose entries the proxy has already read."""
    node.start_agent("--max-connections", str(SMALL_MAP))
    try:
        b = node.pods["b"]
        insert_errors = metric(node, "merbridge_datapath_errors_total", '{kind="sockhash_insert"}')
        out = conn_client(node, "a", "concurrent", b.ip, 8080, HELD)
        print(f"{HELD} held connections with {SMALL_MAP}-entry maps: {out}; entries {map_entries(node)}")
        assert out == f"ok={2 * HELD} failed=0", out
        refused = metric(node, "merbridge_datapath_errors_total", '{kind="sockhash_insert"}') - insert_errors
        print(f"sockets not spliced because the sockhash was full: {refused}")
        assert refused > 0, "the small map was never full: the test did not test the fallback"
    finally:
        rc, out = node.stop_agent()
        assert rc == 0, out


def test_status_equals_what_the_kernel_maps_hold_through_changes(node):
    """Duplicate IP, a pod whose namespace does not exist, a pod deleted: after
    each change /status and the pinned maps (read with bpftool) agree."""
    import json

    from helpers.kernel_check import status_matches_kernel
    a, b = node.pods["a"], node.pods["b"]

    def write(*pods):
        tmp = node.pods_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"kind": "PodList", "items": list(pods)}))
        tmp.replace(node.pods_file)

    def settled(expect_accelerated: set[str]):
        def check():
            status = json.loads(node.agent_get("/status"))
            ok, _ = status_matches_kernel(status, node.bpffs)
            return ok and {p["pod"] for p in status["pods"] if p["accelerated"]} == expect_accelerated
        assert wait_for(check), status_matches_kernel(json.loads(node.agent_get("/status")), node.bpffs)[1]

    node.start_agent()
    try:
        settled({"default/a", "default/b"})
        twin = a.manifest("node1")
        twin["metadata"]["name"] = "twin"          # claims a's IP
        ghost = a.manifest("node1")
        ghost["metadata"]["name"] = "ghost"
        ghost["status"] = {"phase": "Running", "podIP": "10.255.255.77"}   # no namespace has it
        write(a.manifest("node1"), b.manifest("node1"), twin, ghost)
        settled({"default/b"})
        reasons = {p["pod"]: p["reason"] for p in json.loads(node.agent_get("/status"))["pods"]}
        assert reasons["default/a"] == (f"not accelerated: pod IP {a.ip} is also the IP of pod default/twin; "
                                        "left to iptables until only one pod has it")
        assert reasons["default/ghost"].startswith("not accelerated yet: no network namespace has IP 10.255.255.77")
        write(a.manifest("node1"), ghost)          # twin and b deleted
        settled({"default/a"})
        node.write_pods_file()
        settled({"default/a", "default/b"})
    finally:
        node.write_pods_file()
        rc, out = node.stop_agent()
        assert rc == 0, out

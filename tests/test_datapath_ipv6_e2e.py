"""Issue 14 end to end: AF_INET6 sockets through Envoy sidecars (mTLS
STRICT) on a dual-stack test bed in ebpf mode, with Istio's iptables and
ip6tables rules installed in every meshed pod.

In ebpf mode the client pod's ISTIO_REDIRECT counters (both families) stay
flat: the connect hook took the connection; the receiving pod's
ISTIO_IN_REDIRECT moves as in the IPv4 case (the datapath leaves the
proxy's connection to that rule by default, see ebpf/connect.bpf.c).

Topology (bed6's): node0: a, b (meshed), c (plain); node1: d (meshed).
"""

from __future__ import annotations

import os
import uuid

import pytest

from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

DUAL = ("ipv4", "ipv6")
SPECS = [PodSpec("a", node=0), PodSpec("b", node=0), PodSpec("c", node=0, meshed=False), PodSpec("d", node=1)]
MESHED = ("a", "b", "d")


@pytest.fixture(scope="module")
def bed():
    name = f"dp6e{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="ebpf", mtls="strict", ip_families=DUAL) as tb:
        yield tb


def nat(tb: Testbed) -> dict:
    return {(pod, family, chain): value for pod in MESHED for family in DUAL
            for chain, value in tb.nat_counters(pod, family).items()}


def moved(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def out_segs(tb: Testbed, pod: str) -> int:
    done = tb.exec_in(pod, ["cat", "/proc/net/snmp"])
    tcp = [line.split() for line in done.stdout.splitlines() if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("OutSegs")])


def request_ok(tb, src, dst, family=None, count=1):
    results = tb.requests(src, dst, family=family, count=count)
    for result in results:
        assert result["error"] is None and result["status"] == 200, result
    return results[0]


def test_both_families_accelerated(bed):
    import json

    from merbridge_py.agent.status import agent_request
    for node in bed.nodes:
        pods = {p["pod"]: p for p in agent_request(bed.admin_socket(node), "/status")["pods"]}
        meshed = [p for p in pods.values() if p["accelerated"]]
        assert meshed and all("IPv4 and IPv6" in p["reason"] for p in meshed), json.dumps(pods, indent=1)


@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_v4_mapped_socket_through_both_sidecars(bed, dst):
    """The JVM's way: an AF_INET6 socket to ::ffff:<pod IPv4>."""
    before = nat(bed)
    result = request_ok(bed, "a", bed.pod(dst).ip, family="inet6")
    assert result["local"].startswith(f"[::ffff:{bed.pod('a').ip}]:")
    assert result["body"]["pod"] == dst and result["body"]["peer"].startswith("127.0.0.6:")
    assert moved(before, nat(bed)) == {(dst, "ipv4", "ISTIO_IN_REDIRECT"): 1}


@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_native_ipv6_through_both_sidecars(bed, dst):
    before = nat(bed)
    result = request_ok(bed, "a", bed.pod(dst).ip6)
    assert result["local"].startswith(f"[{bed.pod('a').ip6}]:")
    assert result["body"]["pod"] == dst and result["body"]["peer"].startswith("[::6]:")
    assert moved(before, nat(bed)) == {(dst, "ipv6", "ISTIO_IN_REDIRECT"): 1}


@pytest.mark.parametrize("family", ["v4-mapped", "ipv6"])
def test_same_node_keepalive_is_spliced(bed, family):
    """200 requests on one connection a -> b: spliced, pod a's namespace
    sends a handful of TCP segments (handshakes, TLS set-up) where every
    request would otherwise cross two legs as TCP (measured over IPv4 in
    tests/test_datapath.py: hundreds)."""
    target, kind = (bed.pod("b").ip, "inet6") if family == "v4-mapped" else (bed.pod("b").ip6, None)
    request_ok(bed, "a", target, family=kind)   # the sidecars' pooled upstream connection exists now
    spliced_before = bed.agent_metrics(bed.pod("a").node).get("merbridge_spliced_messages_total", 0)
    segs_before = out_segs(bed, "a")
    request_ok(bed, "a", target, family=kind, count=200)
    segs = out_segs(bed, "a") - segs_before
    spliced = bed.agent_metrics(bed.pod("a").node).get("merbridge_spliced_messages_total", 0) - spliced_before
    assert spliced >= 400, spliced      # each request and each response at least once
    assert segs < 60, segs


TOGGLES = 4
WINDOW = 4.0


def toggle_every_node(tb: Testbed, mode: str) -> None:
    import subprocess
    import sys
    for node in tb.agents:
        done = subprocess.run([sys.executable, "-m", "merbridge_py.cli", "toggle", mode, "--node",
                               "--admin-socket", str(tb.admin_socket(node))], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"toggle {mode} on {node}: {done.stderr}"


@pytest.mark.slow
def test_toggles_under_mixed_family_load_lose_no_request():
    """Issue 14's acceptance, short form: native IPv6 and v4-mapped clients
    (keep-alive held across every switch, and a new connection per request),
    same node and cross node, while both nodes switch ebpf <-> iptables four
    times without flushing conntrack; no request may fail, and in each
    window the client pod's ISTIO_REDIRECT counters of both families move
    only in iptables mode."""
    import time

    from merbridge_py.testbed.load import LoadProcess
    name = f"dp6t{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="ebpf", mtls="strict", ip_families=DUAL) as tb:
        b, d = tb.pod("b"), tb.pod("d")
        budget = 5 + TOGGLES * (WINDOW + 30)
        loads = [LoadProcess(tb, "a", {"b": f"[{b.ip6}]:8080", "d": f"[{d.ip6}]:8080"}, duration=budget,
                             keepalive=2, newconn=1),
                 LoadProcess(tb, "a", {"b": f"{b.ip}:8080", "d": f"{d.ip}:8080"}, duration=budget,
                             keepalive=2, newconn=1, family="inet6")]
        windows = []
        try:
            for load in loads:
                load.wait_ready()
            for k in range(TOGGLES + 1):
                mode = "ebpf" if k % 2 == 0 else "iptables"
                if k:
                    toggle_every_node(tb, mode)
                    time.sleep(0.3)
                before = {f: tb.nat_counters("a", f)["ISTIO_REDIRECT"] for f in DUAL}
                time.sleep(WINDOW)
                windows.append((mode, {f: tb.nat_counters("a", f)["ISTIO_REDIRECT"] - before[f] for f in DUAL}))
        finally:
            for load in loads:
                load.stop()
        results = [load.result() for load in loads]
    failures = [(family, f) for family, r in zip(("ipv6", "v4-mapped"), results) for f in r["failures"]]
    print(f"\n{sum(r['requests'] for r in results)} requests, {len(failures)} failed; windows {windows}")
    assert not failures, "\n".join(f"{family} {f['worker']} {f['kind']} {f['error']} from {f['local']}"
                                    for family, f in failures[:20])
    assert all(r["requests"] > 0 for r in results)
    assert [c for r in results for c in r["keepalive_connections"] if c["broken"]] == []
    for mode, moved in windows:
        if mode == "ebpf":
            assert moved == {"ipv4": 0, "ipv6": 0}, (mode, moved)
        else:
            assert moved["ipv4"] > 0 and moved["ipv6"] > 0, (mode, moved)

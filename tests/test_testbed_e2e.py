"""End to end on the test bed, in every mode: each request's response and the
path it took. "Through the sidecars" is read from three independent places:
the app's view of its peer (127.0.0.6 = came out of the inbound sidecar), the
sidecars' per-listener connection counts, and Istio's REDIRECT counters.

Topology (one bed per mode, shared by the tests of that mode):
  node0: a (meshed), b (meshed; excludeInboundPorts 9090, excludeOutboundPorts 9091), c (plain)
  node1: d (meshed)
every app serves 8080, 9090 and 9091.
"""

from __future__ import annotations

import os
import uuid

import pytest

from merbridge_py.testbed import Testbed, istio_iptables
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

MODES = ("nomesh", "iptables", "ebpf")
MESHED = ("iptables", "ebpf")       # tests that need sidecars run in these only
PORTS = (8080, 9090, 9091)
SPECS = [
    PodSpec("a", node=0, ports=PORTS),
    PodSpec("b", node=0, ports=PORTS, annotations={istio_iptables.ANN_EXCLUDE_INBOUND_PORTS: "9090",
                                                   istio_iptables.ANN_EXCLUDE_OUTBOUND_PORTS: "9091"}),
    PodSpec("c", node=0, ports=PORTS, meshed=False),
    PodSpec("d", node=1, ports=PORTS),
]


@pytest.fixture(scope="module", params=MODES)
def bed(request):
    name = f"e{request.param[:2]}{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode=request.param, sidecar_log=True) as tb:
        yield tb


class Path:
    """Counters of every meshed pod before a request; `check` asserts which
    sidecar listeners the request went through and what Istio's nat rules saw."""

    def __init__(self, tb: Testbed):
        self.tb = tb
        self.before = self._read()

    def _read(self) -> dict:
        tb = self.tb
        meshed = [p for p in tb.pods if p.meshed]
        return {"nat": {p.name: tb.nat_counters(p) for p in meshed},
                "sidecar": {p.name: tb.sidecar_connections(p) for p in meshed} if tb.mode != "nomesh" else {}}

    def check(self, hops: set[tuple[str, str]], cross_node_inbound: set[str] = frozenset()) -> None:
        """`hops`: (pod, listener) pairs the request must have passed, each
        exactly once; no other listener of any sidecar may have moved."""
        after = self._read()
        tb = self.tb
        if tb.mode == "nomesh":
            hops = set()
        moved = {(pod, listener): after["sidecar"][pod][listener] - self.before["sidecar"][pod][listener]
                 for pod in after["sidecar"] for listener in ("outbound", "inbound", "health")}
        assert {k: v for k, v in moved.items() if v} == {hop: 1 for hop in hops}
        for pod, nat in after["nat"].items():
            out = nat["ISTIO_REDIRECT"] - self.before["nat"][pod]["ISTIO_REDIRECT"]
            inb = nat["ISTIO_IN_REDIRECT"] - self.before["nat"][pod]["ISTIO_IN_REDIRECT"]
            if tb.mode == "iptables":
                # Istio as-is: one REDIRECT per hop into a sidecar (nat sees a connection's first packet)
                assert out == int((pod, "outbound") in hops), (pod, "ISTIO_REDIRECT")
                assert inb == int((pod, "inbound") in hops), (pod, "ISTIO_IN_REDIRECT")
            elif tb.mode == "ebpf":
                # the app's connect is redirected in the kernel: Istio's outbound rule never fires
                assert out == 0, (pod, "ISTIO_REDIRECT moved in ebpf mode")
                if pod in cross_node_inbound:  # cross-node inbound still goes through the pod's iptables rules
                    assert inb == 1, (pod, "ISTIO_IN_REDIRECT")
            else:
                assert out == inb == 0


def request_ok(tb: Testbed, src: str, dst: str, port: int = 8080, path: str = "/whoami"):
    status, body = tb.request(src, dst, port, path)
    assert status == 200, body
    return body


def peer_ip(body: dict) -> str:
    return body["peer"].rsplit(":", 1)[0]


def test_same_node_meshed_to_meshed(bed):
    a, b = bed.pod("a"), bed.pod("b")
    path = Path(bed)
    body = request_ok(bed, "a", b.ip)
    assert body["pod"] == "b"
    assert peer_ip(body) == (a.ip if bed.mode == "nomesh" else "127.0.0.6")
    path.check({("a", "outbound"), ("b", "inbound")})
    if bed.mode != "nomesh":
        out, inb = bed.sidecar_log("a")[-1], bed.sidecar_log("b")[-1]
        assert (out.listener, out.original_dst, out.upstream) == ("outbound", f"{b.ip}:8080", f"{b.ip}:8080")
        assert (inb.listener, inb.original_dst) == ("inbound", f"{b.ip}:8080")


def test_cross_node_meshed_to_meshed(bed):
    a, d = bed.pod("a"), bed.pod("d")
    path = Path(bed)
    body = request_ok(bed, "a", d.ip)
    assert body["pod"] == "d"
    assert peer_ip(body) == (a.ip if bed.mode == "nomesh" else "127.0.0.6")
    path.check({("a", "outbound"), ("d", "inbound")}, cross_node_inbound={"d"})
    if bed.mode != "nomesh":
        assert bed.sidecar_log("a")[-1].original_dst == f"{d.ip}:8080"
        assert bed.sidecar_log("d")[-1].original_dst == f"{d.ip}:8080"
        assert bed.sidecar_log("d")[-1].client.startswith(f"{a.ip}:")   # the packets crossed from node0


def test_meshed_pod_calls_itself_by_pod_ip(bed):
    """Istio leaves an app's call to its own pod IP alone (it goes over lo and
    the `-o lo ! --uid-owner 1337 -j RETURN` rule returns it): direct."""
    a = bed.pod("a")
    path = Path(bed)
    body = request_ok(bed, "a", a.ip)
    assert body["pod"] == "a" and peer_ip(body) == a.ip
    path.check(set())


@pytest.mark.parametrize("bed", MESHED, indirect=True)
def test_proxy_calls_its_own_pod(bed):
    """A call to the pod's own Service IP: the outbound sidecar resolves it to
    the pod's own IP and connects there as uid 1337, which Istio sends to the
    inbound listener (the proxy's own-pod path, where Merbridge users saw 503s)."""
    a = bed.pod("a")
    path = Path(bed)
    body = request_ok(bed, "a", a.service_ip)
    assert body["pod"] == "a" and peer_ip(body) == "127.0.0.6"
    path.check({("a", "outbound"), ("a", "inbound")})
    out, inb = bed.sidecar_log("a")[-2:]
    assert (out.listener, out.original_dst, out.upstream) == ("outbound", f"{a.service_ip}:8080", f"{a.ip}:8080")
    assert (inb.listener, inb.original_dst) == ("inbound", f"{a.ip}:8080")


def test_plain_pod_to_meshed_and_back(bed):
    b, c = bed.pod("b"), bed.pod("c")
    path = Path(bed)
    body = request_ok(bed, "c", b.ip)          # no rules in c; b's inbound captures
    assert body["pod"] == "b" and peer_ip(body) == (c.ip if bed.mode == "nomesh" else "127.0.0.6")
    path.check({("b", "inbound")})
    path = Path(bed)
    body = request_ok(bed, "b", c.ip)          # b's outbound captures; c has no sidecar
    assert body["pod"] == "c" and peer_ip(body) == b.ip
    path.check({("b", "outbound")})


def test_excluded_inbound_port(bed):
    """b excludes inbound 9090: a's outbound sidecar still carries the call,
    b's inbound sidecar does not (the app sees a's address)."""
    a, b = bed.pod("a"), bed.pod("b")
    path = Path(bed)
    body = request_ok(bed, "a", b.ip, 9090)
    assert body["pod"] == "b" and body["port"] == 9090 and peer_ip(body) == a.ip
    path.check({("a", "outbound")})


def test_excluded_outbound_port(bed):
    """b excludes outbound 9091: b's call leaves directly, a's inbound
    sidecar still captures it."""
    a, b = bed.pod("a"), bed.pod("b")
    path = Path(bed)
    body = request_ok(bed, "b", a.ip, 9091)
    assert body["pod"] == "a" and peer_ip(body) == (b.ip if bed.mode == "nomesh" else "127.0.0.6")
    path.check({("a", "inbound")})


@pytest.mark.parametrize("bed", MESHED, indirect=True)
def test_readiness_port_is_exempt(bed):
    """15021 is in every injected pod's -d list: the sidecar's health listener
    answers it directly, from a plain pod and from a meshed one."""
    b = bed.pod("b")
    path = Path(bed)
    status, _ = bed.request("c", b.ip, 15021, "/healthz/ready")
    assert status == 200
    path.check({("b", "health")})
    path = Path(bed)
    status, _ = bed.request("a", b.ip, 15021, "/healthz/ready")
    assert status == 200
    path.check({("a", "outbound"), ("b", "health")})


def test_keepalive_and_new_connections_all_succeed(bed):
    for new in (False, True):
        for dst in ("b", "d"):
            results = bed.requests("a", dst, count=20, new_connection=new)
            assert [r["error"] for r in results if r["error"]] == []
            assert {r["body"]["pod"] for r in results} == {dst}
            assert len({r["local"] for r in results}) == (20 if new else 1)


@pytest.mark.parametrize("bed", ["ebpf"], indirect=True)
def test_first_requests_after_the_agent_starts(bed):
    """Back to iptables mode with traffic, then ebpf again: a fresh agent.
    Its first requests, the proxy's first call to its own pod first, all
    succeed and take the sidecar path."""
    bed.set_mode("iptables")
    assert not bed.agents
    assert [r for r in bed.requests("a", "b", count=20, new_connection=True) if r["error"]] == []
    bed.set_mode("ebpf")
    a = bed.pod("a")
    path = Path(bed)
    first = bed.requests("a", a.service_ip, count=5, new_connection=True)
    assert [(r["status"], r["body"]["pod"], peer_ip(r["body"])) for r in first] == [(200, "a", "127.0.0.6")] * 5
    moved = bed.sidecar_connections("a")
    assert moved["outbound"] - path.before["sidecar"]["a"]["outbound"] == 5
    assert moved["inbound"] - path.before["sidecar"]["a"]["inbound"] == 5
    for src, dst in (("a", "b"), ("a", "d"), ("c", "b"), ("b", "c")):
        results = bed.requests(src, dst, count=10, new_connection=True)
        assert [r["error"] for r in results if r["error"]] == [], (src, dst)
        assert {r["status"] for r in results} == {200}
    assert bed.nat_counters("a")["ISTIO_REDIRECT"] == path.before["nat"]["a"]["ISTIO_REDIRECT"]

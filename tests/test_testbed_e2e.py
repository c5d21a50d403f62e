"""End to end on the test bed, in every mode, with Envoy sidecars and mTLS
STRICT: each request's response and the path it took. "Through the sidecars"
is read from four independent places: the app's view of its peer (127.0.0.6 =
came out of the inbound sidecar), the sidecars' per-listener connection counts
and TLS handshakes (Envoy's stats), and Istio's REDIRECT counters. A last
bed runs HAProxy sidecars: the datapath does not depend on one proxy.

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
    with Testbed.up(name, nodes=2, pods=SPECS, mode=request.param, mtls="strict") as tb:
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
        stats = {p.name: tb.sidecar_stats(p) for p in meshed} if tb.mode != "nomesh" else {}
        return {"nat": {p.name: tb.nat_counters(p) for p in meshed}, "stats": stats,
                "sidecar": {p: tb.sidecar(p).connection_counts(s) for p, s in stats.items()},
                "tls": {p: tb.sidecar(p).tls_handshakes(s) for p, s in stats.items()}}

    def moved(self, pod: str, counter: str) -> int:
        """How far one of `pod`'s Envoy counters moved since the start."""
        return self.tb.sidecar_stats(pod).get(counter, 0) - self.before["stats"][pod].get(counter, 0)

    def check(self, hops: set[tuple[str, str]], cross_node_inbound: set[str] = frozenset(),
              tls: set[tuple[str, str]] = frozenset(), captured_outbound: set[str] = frozenset()) -> None:
        """`hops`: (pod, listener) pairs the request must have passed, each
        exactly once; no other listener of any sidecar may have moved.
        `tls`: (pod, "outbound"|"inbound") sides of sidecar-to-sidecar legs,
        each one TLS handshake; no other handshake anywhere.
        `captured_outbound`: pods whose outbound capture fired although no
        outbound listener of theirs counted the connection."""
        after = self._read()
        tb = self.tb
        if tb.mode == "nomesh":
            hops, tls = set(), set()
        moved = {(pod, listener): after["sidecar"][pod][listener] - self.before["sidecar"][pod][listener]
                 for pod in after["sidecar"] for listener in ("outbound", "inbound", "health")}
        assert {k: v for k, v in moved.items() if v} == {hop: 1 for hop in hops}
        handshakes = {(pod, side): after["tls"][pod][side] - self.before["tls"][pod][side]
                      for pod in after["tls"] for side in ("outbound", "inbound")}
        assert {k: v for k, v in handshakes.items() if v} == {side: 1 for side in tls}
        for pod, nat in after["nat"].items():
            out = nat["ISTIO_REDIRECT"] - self.before["nat"][pod]["ISTIO_REDIRECT"]
            inb = nat["ISTIO_IN_REDIRECT"] - self.before["nat"][pod]["ISTIO_IN_REDIRECT"]
            if tb.mode == "iptables":
                # Istio as-is: one REDIRECT per hop into a sidecar (nat sees a connection's first packet)
                assert out == int((pod, "outbound") in hops or pod in captured_outbound), (pod, "ISTIO_REDIRECT")
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
    path.check({("a", "outbound"), ("b", "inbound")}, tls={("a", "outbound"), ("b", "inbound")})
    if bed.mode != "nomesh":   # on the listener of b's original destination, to b's cluster, out of b's inbound
        assert path.moved("a", f"listener.{b.ip}_8080.downstream_cx_total") == 1
        assert path.moved("a", "cluster.outbound|8080||b.default.svc.cluster.local.upstream_cx_total") == 1
        assert path.moved("b", "cluster.inbound|8080||.upstream_cx_total") == 1


def test_cross_node_meshed_to_meshed(bed):
    a, d = bed.pod("a"), bed.pod("d")
    path = Path(bed)
    body = request_ok(bed, "a", d.ip)
    assert body["pod"] == "d"
    assert peer_ip(body) == (a.ip if bed.mode == "nomesh" else "127.0.0.6")
    path.check({("a", "outbound"), ("d", "inbound")}, cross_node_inbound={"d"},
               tls={("a", "outbound"), ("d", "inbound")})
    if bed.mode != "nomesh":
        assert path.moved("a", "cluster.outbound|8080||d.default.svc.cluster.local.upstream_cx_total") == 1
        assert path.moved("d", "cluster.inbound|8080||.upstream_cx_total") == 1


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
    path.check({("a", "outbound"), ("a", "inbound")}, tls={("a", "outbound"), ("a", "inbound")})
    # the service IP's listener, a's own cluster (endpoint a.ip:8080), then a's inbound
    assert path.moved("a", f"listener.{a.service_ip}_8080.downstream_cx_total") == 1
    assert path.moved("a", "cluster.outbound|8080||a.default.svc.cluster.local.upstream_cx_total") == 1
    assert path.moved("a", "cluster.inbound|8080||.upstream_cx_total") == 1


def refused_by_strict_mtls(tb: Testbed, src: str, dst: str, port: int = 8080) -> None:
    """A plain-text connection to a STRICT sidecar: captured by the pod's
    rules, matched by no filter chain of its inbound listener, closed; the
    app never sees it."""
    path = Path(tb)
    result = tb.requests(src, dst, port)[0]
    assert result["status"] is None and result["error"], result
    assert path.moved(dst, "listener.0.0.0.0_15006.no_filter_chain_match") == 1
    assert path.moved(dst, "cluster.InboundPassthroughCluster.upstream_cx_total") == 0
    assert path.moved(dst, f"cluster.inbound|{port}||.upstream_cx_total") == 0
    captured = tb.nat_counters(dst)["ISTIO_IN_REDIRECT"] - path.before["nat"][dst]["ISTIO_IN_REDIRECT"]
    assert captured == 1


def test_plain_pod_to_meshed_and_back(bed):
    b, c = bed.pod("b"), bed.pod("c")
    if bed.mode == "nomesh":
        body = request_ok(bed, "c", b.ip)
        assert body["pod"] == "b" and peer_ip(body) == c.ip
    else:
        refused_by_strict_mtls(bed, "c", "b")   # no sidecar in c: plain text, which STRICT refuses
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
    path.check({("a", "outbound")})   # and no TLS: auto-mTLS knows b's sidecar does not get 9090


def test_excluded_outbound_port(bed):
    """b excludes outbound 9091: b's call leaves directly, in plain text, and
    a's inbound sidecar still captures it (and, STRICT, refuses it)."""
    a, b = bed.pod("a"), bed.pod("b")
    if bed.mode == "nomesh":
        body = request_ok(bed, "b", a.ip, 9091)
        assert body["pod"] == "a" and peer_ip(body) == b.ip
    else:
        refused_by_strict_mtls(bed, "b", "a", 9091)


@pytest.mark.parametrize("bed", MESHED, indirect=True)
def test_readiness_port_is_exempt(bed):
    """15021 is in every injected pod's -d list: the sidecar's health listener
    answers it directly."""
    b = bed.pod("b")
    path = Path(bed)
    status, _ = bed.request("c", b.ip, 15021, "/healthz/ready")
    assert status == 200
    path.check({("b", "health")})
    path = Path(bed)
    status, _ = bed.request("a", b.ip, 15021, "/healthz/ready")
    assert status == 200
    # From a meshed pod the call is captured by a's outbound, and Envoy hands
    # a redirected connection to the listener for its original destination's
    # port: a's own bound 0.0.0.0:15021 answers (as in an istiod-made sidecar,
    # whose bootstrap has the same listener).
    path.check({("a", "health")}, captured_outbound={"a"})


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
    assert bed.sidecar_tls_handshakes("a") == {side: n + 5 for side, n in path.before["tls"]["a"].items()}
    for src, dst in (("a", "b"), ("a", "d"), ("b", "a"), ("b", "c")):
        results = bed.requests(src, dst, count=10, new_connection=True)
        assert [r["error"] for r in results if r["error"]] == [], (src, dst)
        assert {r["status"] for r in results} == {200}
    assert bed.nat_counters("a")["ISTIO_REDIRECT"] == path.before["nat"]["a"]["ISTIO_REDIRECT"]


@pytest.fixture(scope="module")
def haproxy_bed():
    name = f"eha{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="ebpf", proxy="haproxy", sidecar_log=True) as tb:
        yield tb


def test_haproxy_sidecars_same_node_cross_node_and_own_pod(haproxy_bed):
    """The same datapath under a second, independent proxy (HAProxy, plain
    TCP), with each forwarded connection's original destination from its log."""
    bed = haproxy_bed
    a, b, d = bed.pod("a"), bed.pod("b"), bed.pod("d")
    for dst in (b, d):
        path = Path.__new__(Path)
        path.tb, path.before = bed, {"nat": {p: bed.nat_counters(p) for p in ("a", dst.name)},
                                      "sidecar": {p: bed.sidecar_connections(p) for p in ("a", dst.name)}}
        body = request_ok(bed, "a", dst.ip)
        assert body["pod"] == dst.name and peer_ip(body) == "127.0.0.6"
        assert bed.sidecar_connections("a")["outbound"] - path.before["sidecar"]["a"]["outbound"] == 1
        assert bed.sidecar_connections(dst)["inbound"] - path.before["sidecar"][dst.name]["inbound"] == 1
        assert bed.nat_counters("a")["ISTIO_REDIRECT"] == path.before["nat"]["a"]["ISTIO_REDIRECT"]
        out, inb = bed.sidecar_log("a")[-1], bed.sidecar_log(dst)[-1]
        assert (out.listener, out.original_dst, out.upstream) == ("outbound", f"{dst.ip}:8080", f"{dst.ip}:8080")
        assert (inb.listener, inb.original_dst) == ("inbound", f"{dst.ip}:8080")
    assert bed.sidecar_log("d")[-1].client.startswith(f"{a.ip}:")   # the packets crossed from node0
    body = request_ok(bed, "a", a.service_ip)
    assert body["pod"] == "a" and peer_ip(body) == "127.0.0.6"
    out, inb = bed.sidecar_log("a")[-2:]
    assert (out.listener, out.original_dst, out.upstream) == ("outbound", f"{a.service_ip}:8080", f"{a.ip}:8080")
    assert (inb.listener, inb.original_dst) == ("inbound", f"{a.ip}:8080")
    results = bed.requests("a", "b", count=20, new_connection=True)
    assert [r["error"] for r in results if r["error"]] == []

"""Envoy sidecars (mTLS STRICT) proxying an HTTP port: per request, over pooled
upstream connections. A client's new connection ends at its own sidecar; the
sidecar-to-sidecar and sidecar-to-app connections are reused. In ebpf mode the
reused legs are long-lived, so they are spliced, while the client's short leg
is not (adaptive splicing). Other ports stay one upstream connection per client
connection.

Envoy keeps one pool per worker thread: each worker makes its own first
upstream connection to a destination.

Topology (one bed per mode): node0: a, b; node1: d; all meshed, nginx apps on
8080 (HTTP, pooled) and 9090 (plain TCP).
"""

from __future__ import annotations

import os
import uuid

import pytest

from merbridge_py import sandbox
from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

HTTP_PORT, TCP_PORT = 8080, 9090
SPECS = [PodSpec("a", node=0, ports=(HTTP_PORT, TCP_PORT)), PodSpec("b", node=0, ports=(HTTP_PORT, TCP_PORT)),
         PodSpec("d", node=1, ports=(HTTP_PORT, TCP_PORT))]


@pytest.fixture(scope="module", params=("iptables", "ebpf"))
def bed(request):
    name = f"h{request.param[:2]}{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode=request.param, app="nginx", http_ports=(HTTP_PORT,),
                    mtls="strict") as tb:
        yield tb


def moved(tb: Testbed, pod: str, listener: str, before: dict) -> int:
    return tb.sidecar_connections(pod)[listener] - before[pod][listener]


def counts(tb: Testbed) -> dict:
    return {p: tb.sidecar_connections(p) for p in ("a", "b", "d")}


def established_to(tb: Testbed, pod: str, port: int) -> int:
    out = sandbox.sh("ss", "-Htn", "state", "established", f"( dport = :{port} )", netns=tb.pod(pod).netns)
    return len(out.splitlines())


def out_segments(tb: Testbed, pod: str) -> int:
    lines = [line.split() for line in sandbox.sh("cat", "/proc/net/snmp", netns=tb.pod(pod).netns).splitlines()
             if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])


@pytest.mark.parametrize("dst", ["b", "d"])
def test_new_client_connections_reuse_pooled_upstreams(bed, dst):
    bed.requests("a", dst, count=1)        # one worker's pool holds a connection from here on
    before = counts(bed)
    handshakes = bed.sidecar_tls_handshakes(dst)["inbound"]
    results = bed.requests("a", dst, count=20, new_connection=True)
    assert [r["error"] for r in results if r["error"]] == []
    assert {(r["status"], r["body"]["pod"], r["body"]["peer"].rsplit(":", 1)[0]) for r in results} == \
        {(200, dst, "127.0.0.6")}                      # the answer came out of dst's inbound sidecar
    assert len({r["local"] for r in results}) == 20   # 20 client connections...
    assert moved(bed, "a", "outbound", before) == 20
    # ...over the connection already pooled, or one more per other worker
    new_upstreams = moved(bed, dst, "inbound", before)
    assert new_upstreams <= bed.envoy_workers - 1
    assert bed.sidecar_tls_handshakes(dst)["inbound"] - handshakes == new_upstreams


def test_a_tcp_port_gets_one_upstream_connection_per_client_connection(bed):
    before = counts(bed)
    results = bed.requests("a", "b", port=TCP_PORT, count=10, new_connection=True)
    assert {(r["status"], r["body"]["pod"]) for r in results} == {(200, "b")}
    assert moved(bed, "a", "outbound", before) == moved(bed, "b", "inbound", before) == 10


def test_settle_closes_pooled_connections(bed):
    bed.requests("a", "b", count=1)
    assert established_to(bed, "a", HTTP_PORT) >= 1    # a's sidecar -> b
    assert established_to(bed, "b", HTTP_PORT) >= 1    # b's sidecar -> b's app
    bed.settle()
    assert [established_to(bed, p, HTTP_PORT) for p in ("a", "b", "d")] == [0, 0, 0]
    before = counts(bed)
    assert bed.request("a", "b")[0] == 200             # a new pool, from scratch
    assert moved(bed, "b", "inbound", before) == 1


def test_pooled_legs_are_spliced_in_ebpf_mode_only(bed):
    """Pod b sees only pooled legs (a's sidecar -> b's sidecar -> b's app). In
    ebpf mode those are spliced: their bytes never become TCP segments in b's
    namespace. In iptables mode every request and response is segments."""
    bed.requests("a", "b", count=5, new_connection=True)   # pools up; adaptive splicing has seen the legs
    requests = 200
    before = out_segments(bed, "b")
    results = bed.requests("a", "b", count=requests, new_connection=True)
    assert [r["error"] for r in results if r["error"]] == []
    sent = out_segments(bed, "b") - before
    if bed.mode == "ebpf":
        assert sent < requests / 10, sent
    else:
        assert sent >= 2 * requests, sent   # at least the app's response and the sidecar's, per request



def test_one_request_connections_are_short_on_every_leg_also_over_mtls(bed):
    """A client connection per request to a TCP port: each gets its own upstream
    through both sidecars (mTLS between them) and to the app, so every leg of it
    carries one request. In ebpf mode adaptive splicing calls each leg short by
    what its client end sent (on the mTLS leg: the handshake's flights, the
    request and the TLS close), so once learnt, every leg of every connection is
    skipped: three per request. In iptables mode (and where the kernel probes
    turned splicing off) nothing is spliced, so nothing is skipped either."""
    def skipped() -> float:
        if bed.mode != "ebpf":
            return 0.0   # no agent on the nodes
        return bed.agent_metrics(bed.nodes[0]).get('merbridge_splice_skipped_total{reason="short_lived"}', 0.0)

    splicing = bed.mode == "ebpf" and \
        bed.agent_metrics(bed.nodes[0]).get('merbridge_splice_mode{mode="off"}', 0) != 1
    results = bed.requests("a", "b", port=TCP_PORT, count=10, new_connection=True)   # every leg's verdict learnt
    assert {(r["status"], r["body"]["pod"]) for r in results} == {(200, "b")}
    before = skipped()
    results = bed.requests("a", "b", port=TCP_PORT, count=20, new_connection=True)
    assert {(r["status"], r["body"]["pod"]) for r in results} == {(200, "b")}
    assert skipped() - before == (3 * 20 if splicing else 0)

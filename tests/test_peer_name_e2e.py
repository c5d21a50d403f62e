"""Issue 20's peer address, end to end: on a dual-stack test bed with Envoy
sidecars and mTLS STRICT, Istio's iptables and ip6tables rules in every
meshed pod, the client app's getpeername() is the destination it connected
to and its getsockname() its own pod address, in ebpf mode exactly as in
iptables mode, same-node and cross-node, for AF_INET, v4-mapped AF_INET6 and
native IPv6 sockets. Istio's ISTIO_REDIRECT counter of the client pod says
which path each request took (ebpf: flat; iptables: one per connection), and
the server app's view (127.0.0.6 / ::6) that it came through both sidecars.

Topology: node0: a, b; node1: d; all meshed. One bed, switched from ebpf to
iptables between the two halves (the bed's own set_mode, as in
tests/test_testbed_lifecycle.py).
"""

from __future__ import annotations

import os
import uuid

import pytest

from merbridge_py.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

DUAL = ("ipv4", "ipv6")
SPECS = [PodSpec("a", node=0), PodSpec("b", node=0), PodSpec("d", node=1)]


@pytest.fixture(scope="module")
def dual_bed():
    name = f"pn{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="ebpf", mtls="strict", ip_families=DUAL) as tb:
        yield tb


@pytest.fixture(scope="module", params=["ebpf", "iptables"])
def bed(request, dual_bed):
    dual_bed.set_mode(request.param)
    return dual_bed


# family -> (how the client dials the pod, the --family argument, how its socket writes an address)
FAMILIES = {
    "inet": (lambda pod: pod.ip, None, lambda pod: f"{pod.ip}"),
    "v4-mapped": (lambda pod: pod.ip, "inet6", lambda pod: f"[::ffff:{pod.ip}]"),
    "ipv6": (lambda pod: pod.ip6, None, lambda pod: f"[{pod.ip6}]"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_client_app_sees_the_destination_it_dialled(bed, dst, family):
    dial, socket_family, written = FAMILIES[family]
    a, server = bed.pod("a"), bed.pod(dst)
    nat_family = "ipv6" if family == "ipv6" else "ipv4"
    redirects = bed.nat_counters("a", nat_family)["ISTIO_REDIRECT"]
    shown = bed.agent_metrics(a.node).get("merbridge_peer_names_shown_total", 0) if bed.mode == "ebpf" else 0
    (result,) = bed.requests("a", dial(server), family=socket_family)
    assert result["error"] is None and result["status"] == 200, result
    assert result["peer"] == f"{written(server)}:8080", result
    assert result["local"].startswith(f"{written(a)}:"), result
    # through both sidecars: the server app was called from the inbound sidecar's passthrough address
    assert result["body"]["pod"] == dst, result
    assert result["body"]["peer"].startswith("[::6]:" if family == "ipv6" else "127.0.0.6:"), result
    moved = bed.nat_counters("a", nat_family)["ISTIO_REDIRECT"] - redirects
    if bed.mode == "ebpf":
        assert moved == 0, "the connect hook did not take the connection"
        assert bed.agent_metrics(a.node).get("merbridge_peer_names_shown_total", 0) > shown
    else:
        assert moved == 1, "Istio's rule did not take the connection"

"""The test bed in dual stack, iptables mode (Istio as-is), Envoy sidecars and
mTLS STRICT: Istio's IPv6 rules against its own goldens, the dual-stack plan
and sidecar config, and traffic of every family through both sidecars.

Goldens: istio/istio tools/istio-iptables/pkg/capture/testdata/<name>.golden at
86c9f01f (2026-08-22), copied verbatim to tests/data/istio-ipv6/; each holds
the IPv4 half then the IPv6 half of istio-iptables' restore input. The flags
of each case are those capture/run_test.go gives it, from its base config
(-p 15001 -z 15006 -u 1337 -g 1337, tunnel 15008, every list empty).

Topology of the bed (one per module):
  node0: a, b (meshed), c (plain)      node1: d (meshed)
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest

from merbridge_py import sandbox
from merbridge_py.testbed import Testbed, istio_ip6tables as i6, istio_iptables as ii, topology
from merbridge_py.testbed.cleanup import leftovers
from merbridge_py.testbed.client import target_address
from merbridge_py.testbed.envoy import EnvoySidecar, listener_stat_scope
from merbridge_py.testbed.istio_iptables import CaptureFlags
from merbridge_py.testbed.load import LoadProcess
from merbridge_py.testbed.topology import PodSpec

GOLDEN_DIR = Path(__file__).parent / "data" / "istio-ipv6"
DUAL = ("ipv4", "ipv6")
VIRT = dict(include_inbound_ports="4000,5000", kube_virt_interfaces="eth0,eth1")
DB8 = dict(exclude_outbound_ip_ranges="2001:db8::/32", include_outbound_ip_ranges="2001:db8::/32")
# golden -> (flags, IPv6 DNS servers), as capture/run_test.go configures each
GOLDENS = {
    "ipv6-empty-inbound-ports": (CaptureFlags(), ()),
    "ipv6-inbound-ports": (CaptureFlags(include_inbound_ports="4000,5000"), ()),
    "ipv6-virt-interfaces": (CaptureFlags(**VIRT), ()),
    "ipv6-ipnets": (CaptureFlags(**VIRT, exclude_inbound_ports="6000,7000,", **DB8), ()),
    "ipv6-uid-gid": (CaptureFlags(**VIRT, exclude_inbound_ports="6000,7000", proxy_uid="3,4", proxy_gid="1,2",
                                  **DB8), ()),
    "ipv6-outbound-ports": (CaptureFlags(include_outbound_ports="32000,31000"), ()),
    # DNS capture on but no resolver of either family: istio-iptables turns it off
    "ipv6-dns-uid-gid": (CaptureFlags(redirect_dns=True, proxy_uid="3,4", proxy_gid="1,2"), ()),
    "dns-uid-gid": (CaptureFlags(redirect_dns=True, dns_servers=("127.0.0.53",), proxy_uid="3,4", proxy_gid="1,2"),
                    ("::127.0.0.53",)),
}


def golden_halves(name: str) -> tuple[list[str], list[str]]:
    """(IPv4 lines, IPv6 lines) of a golden: the IPv6 half starts at the
    second `* nat` (each half has a nat table, nat first)."""
    lines = [line for line in (GOLDEN_DIR / f"{name}.golden").read_text().splitlines()
             if line not in ("iptables-save", "ip6tables-save")]
    starts = [i for i, line in enumerate(lines) if line == "* nat"]
    assert len(starts) == 2, f"{name}: expected an IPv4 and an IPv6 half"
    return lines[:starts[1]], lines[starts[1]:]


@pytest.mark.parametrize("golden", sorted(GOLDENS))
def test_ip6tables_rules_match_istio_golden(golden):
    flags, servers6 = GOLDENS[golden]
    _, expected = golden_halves(golden)
    got = i6.rule_lines(flags, servers6)
    assert got == expected, "\n".join(difflib.unified_diff(expected, got, "golden", "generated", lineterm=""))


@pytest.mark.parametrize("golden", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=(
        "istio_iptables keeps DNS capture on with no resolver; istio-iptables turns it off")))
    if name == "ipv6-dns-uid-gid" else name for name in sorted(GOLDENS)])
def test_ipv4_half_of_the_same_goldens(golden):
    """The IPv4 generator on the same flags gives the other half: a pod's two
    rule sets come from one flag set, as from one istio-iptables run."""
    flags, _ = GOLDENS[golden]
    expected, _ = golden_halves(golden)
    assert ii.rule_lines(flags) == expected


def test_default_injected_pod_gets_the_ipv6_twin_of_its_ipv4_rules():
    flags = ii.flags_from_annotations({})
    v4, v6 = ii.rule_lines(flags), i6.rule_lines(flags)
    assert len(v4) == len(v6)
    twins = {"127.0.0.6/32": "::6/128", "127.0.0.1/32": "::1/128"}
    for a, b in zip(v4, v6):
        for old, new in twins.items():
            a = a.replace(old, new)
        assert a == b
    assert "-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN" in v6 and v6[-2] == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"


def test_ipv4_ranges_stay_out_of_ip6tables():
    flags = CaptureFlags(include_outbound_ip_ranges="10.0.0.0/8,fd00::/8", exclude_outbound_ip_ranges="10.96.0.0/12")
    lines = i6.rule_lines(flags)
    assert "-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT" in lines
    assert not [line for line in lines if "10." in line]
    # ::1 named in -i keeps the app's own-pod traffic captured, as 127.0.0.1 does in IPv4
    assert "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN" not in \
        i6.rule_lines(CaptureFlags(include_outbound_ip_ranges="::1/128"))


def test_unsupported_flags_are_refused():
    with pytest.raises(ValueError, match="REDIRECT"):
        i6.rule_lines(CaptureFlags(interception_mode="TPROXY"))
    with pytest.raises(ValueError, match="-x"):
        i6.rule_lines(CaptureFlags(exclude_outbound_ip_ranges="*"))
    with pytest.raises(ValueError, match="not an IPv6"):
        i6.rule_lines(CaptureFlags(redirect_dns=True), dns_servers_v6=("10.0.0.10",))


def test_dual_stack_plan_mirrors_the_ipv4_addresses_per_slot():
    nodes, pods, _ = topology.plan("tb", topology.default_specs(2, 2), 2, slot=3, ip_families=DUAL)
    assert [(n.cidr6, n.gateway6, n.host_ip6) for n in nodes] == [
        ("fd10:203::/64", "fd10:203::1", "fd31:203::10"), ("fd10:203:1::/64", "fd10:203:1::1", "fd31:203::11")]
    assert [(p.ip, p.ip6, p.service_ip6) for p in pods] == [
        ("10.203.0.10", "fd10:203::10", "fd96:203::10"), ("10.203.0.11", "fd10:203::11", "fd96:203::11"),
        ("10.203.1.10", "fd10:203:1::10", "fd96:203:1::10"), ("10.203.1.11", "fd10:203:1::11", "fd96:203:1::11")]
    assert pods[0].ips == ["10.203.0.10", "fd10:203::10"]
    other = topology.plan("tb2", topology.default_specs(2, 2), 2, slot=4, ip_families=DUAL)[1]
    assert not {p.ip6 for p in pods} & {p.ip6 for p in other}     # beds side by side never share an address
    assert all(ipaddress.ip_address(p.ip6).is_private for p in pods)   # ULA
    # IPv4-only (the default) is as before
    v4_nodes, v4_pods, _ = topology.plan("tb", topology.default_specs(2, 2), 2, slot=3)
    assert [(p.ip6, p.service_ip6, p.ips) for p in v4_pods][0] == ("", "", ["10.203.0.10"])
    assert v4_nodes[0].cidr6 == ""
    with pytest.raises(ValueError, match="ip_families"):
        topology.plan("tb", topology.default_specs(1, 1), 1, ip_families=("ipv6",))


def _config(tmp_path, ip_families, mtls="strict", http_ports=()):
    _, pods, _ = topology.plan("tb", [PodSpec("a"), PodSpec("b"), PodSpec("c", meshed=False)], 1,
                               ip_families=ip_families)
    return EnvoySidecar(tmp_path, pods[0], pods, http_ports=http_ports, mtls=mtls).config(), pods


def test_envoy_listens_on_both_families_as_istiods_dual_stack_sidecar(tmp_path):
    config, pods = _config(tmp_path, DUAL)
    a, b = pods[0], pods[1]
    found = {item["name"]: item for item in config["static_resources"]["listeners"]}
    for name, port in (("virtualOutbound", 15001), ("virtualInbound", 15006)):
        assert found[name]["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": port}
        assert found[name]["additional_addresses"] == [
            {"address": {"socket_address": {"address": "::", "port_value": port}}}]
    # a dual-stack Service: one listener on both VIPs; the pod's IPv6 address has its own
    assert found[f"{b.service_ip}_8080"]["additional_addresses"] == [
        {"address": {"socket_address": {"address": b.service_ip6, "port_value": 8080}}}]
    assert found[f"{b.ip6}_8080"]["filter_chains"][0]["filters"][0]["typed_config"]["cluster"] == \
        "outbound|8080|ipv6|b.default.svc.cluster.local"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name in ("InboundPassthroughCluster", "inbound|8080||"):
        assert clusters[name]["upstream_bind_config"] == {
            "source_address": {"address": "127.0.0.6", "port_value": 0},
            "extra_source_addresses": [{"address": {"address": "::6", "port_value": 0}}]}
    # Istio's EDS for a dual-stack endpoint: IPv4 first, IPv6 as additional address
    service = clusters["outbound|8080||b.default.svc.cluster.local"]["load_assignment"]["endpoints"][0]
    assert service["lb_endpoints"][0]["endpoint"] == {
        "address": {"socket_address": {"address": b.ip, "port_value": 8080}},
        "additional_addresses": [{"address": {"socket_address": {"address": b.ip6, "port_value": 8080}}}]}
    ipv6 = clusters["outbound|8080|ipv6|b.default.svc.cluster.local"]
    assert ipv6["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == \
        {"address": b.ip6, "port_value": 8080}
    assert ipv6["transport_socket"] == clusters["outbound|8080||b.default.svc.cluster.local"]["transport_socket"]
    assert "transport_socket" not in clusters["outbound|8080|ipv6|c.default.svc.cluster.local"]   # c: no sidecar
    assert a.ip6 and listener_stat_scope(b.ip6, 8080) == "[fd10_200__11]_8080"


def test_envoy_http_port_routes_ipv6_hosts(tmp_path):
    config, pods = _config(tmp_path, DUAL, http_ports=(8080,))
    b = pods[1]
    http = {item["name"]: item for item in config["static_resources"]["listeners"]}["0.0.0.0_8080"]
    assert http["additional_addresses"] == [{"address": {"socket_address": {"address": "::", "port_value": 8080}}}]
    hosts = http["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    route = {d: h["routes"][0]["route"]["cluster"] for h in hosts for d in h["domains"]}
    assert route[f"[{b.service_ip6}]:8080"] == "outbound|8080||b.default.svc.cluster.local"
    assert route[f"[{b.ip6}]:8080"] == "outbound|8080|ipv6|b.default.svc.cluster.local"


def test_ipv4_only_envoy_config_has_no_ipv6(tmp_path):
    config, _ = _config(tmp_path, topology.IPV4_ONLY)
    text = json.dumps(config)
    assert "additional_addresses" not in text and "extra_source_addresses" not in text and "|ipv6|" not in text


def test_client_families():
    assert target_address("10.1.2.3", "inet6") == "::ffff:10.1.2.3"
    assert target_address("10.1.2.3", None) == target_address("10.1.2.3", "inet") == "10.1.2.3"
    assert target_address("fd10::1", "inet6") == "fd10::1"
    with pytest.raises(ValueError, match="AF_INET"):
        target_address("fd10::1", "inet")


# --- on a real bed -------------------------------------------------------------------

@pytest.mark.bpf
def test_payloads_load_into_real_ip6tables():
    """Every generated IPv6 payload is accepted by this machine's
    ip6tables-restore in a scratch namespace, and the flush payload removes it."""
    if shutil.which("ip6tables-restore") is None:
        pytest.skip("ip6tables-restore is not installed")
    ns = f"mbp-ip6t{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(ns)
    try:
        for flags, servers6 in list(GOLDENS.values()) + [(ii.flags_from_annotations({}), ())]:
            sandbox.sh("ip6tables-restore", "--noflush", netns=ns, input=i6.restore_payload(flags, servers6))
            saved = sandbox.sh("ip6tables-save", netns=ns)
            assert saved.count("-A ISTIO_") == sum(1 for line in i6.rule_lines(flags, servers6)
                                                   if line.startswith("-A ISTIO_"))
            sandbox.sh("ip6tables-restore", netns=ns, input=i6.flush_payload(flags, servers6))
            assert "ISTIO" not in sandbox.sh("ip6tables-save", netns=ns)
    finally:
        sandbox.netns_delete(ns)


SPECS = [PodSpec("a", node=0), PodSpec("b", node=0), PodSpec("c", node=0, meshed=False), PodSpec("d", node=1)]
MESHED = ("a", "b", "d")


@pytest.fixture(scope="module")
def bed():
    name = f"six{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="iptables", mtls="strict", ip_families=DUAL) as tb:
        yield tb


class Counters:
    """Istio's REDIRECT counters of both families and the sidecars' TLS
    handshakes of every meshed pod, before a request; `moved` after it."""

    def __init__(self, tb: Testbed):
        self.tb = tb
        self.before = self._read()

    def _read(self) -> dict:
        out = {}
        for pod in MESHED:
            for family in DUAL:
                for chain, value in self.tb.nat_counters(pod, family).items():
                    out[(pod, family, chain)] = value
            for side, value in self.tb.sidecar_tls_handshakes(pod).items():
                out[(pod, "tls", side)] = value
        return out

    def moved(self) -> dict:
        after = self._read()
        return {key: after[key] - self.before[key] for key in after if after[key] != self.before[key]}


def request_ok(tb: Testbed, src: str, dst: str, family: str | None = None) -> dict:
    result = tb.requests(src, dst, family=family)[0]
    assert result["error"] is None and result["status"] == 200, result
    return result



@pytest.mark.bpf
@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_native_ipv6_through_both_sidecars(bed, dst):
    """a -> dst's IPv6 address: captured by a's ip6tables rules, mTLS between
    the sidecars over IPv6, into dst's sidecar by its ip6tables rules, and
    to the app from ::6."""
    target = bed.pod(dst)
    counters = Counters(bed)
    result = request_ok(bed, "a", target.ip6)
    assert result["body"]["pod"] == dst
    assert result["body"]["peer"].startswith("[::6]:")
    assert result["local"].startswith(f"[{bed.pod('a').ip6}]:")
    assert counters.moved() == {("a", "ipv6", "ISTIO_REDIRECT"): 1, (dst, "ipv6", "ISTIO_IN_REDIRECT"): 1,
                                ("a", "tls", "outbound"): 1, (dst, "tls", "inbound"): 1}
    stats = bed.sidecar_stats("a")
    assert stats[f"listener.{listener_stat_scope(target.ip6, 8080)}.downstream_cx_total"] >= 1
    assert stats[f"cluster.outbound|8080|ipv6|{dst}.default.svc.cluster.local.upstream_cx_total"] >= 1


@pytest.mark.bpf
def test_ipv6_service_vip_goes_to_the_endpoints_ipv4_address_first(bed):
    """a -> b's IPv6 Service VIP: a's ip6tables rules capture it, its sidecar
    resolves the Service like Istio's dual-stack EDS (IPv4 address first), so
    the sidecar-to-sidecar leg and b's inbound capture are IPv4."""
    counters = Counters(bed)
    result = request_ok(bed, "a", bed.pod("b").service_ip6)
    assert result["body"]["pod"] == "b" and result["body"]["peer"].startswith("127.0.0.6:")
    assert counters.moved() == {("a", "ipv6", "ISTIO_REDIRECT"): 1, ("b", "ipv4", "ISTIO_IN_REDIRECT"): 1,
                                ("a", "tls", "outbound"): 1, ("b", "tls", "inbound"): 1}


@pytest.mark.bpf
@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_v4_mapped_ipv6_socket_takes_the_ipv4_rules(bed, dst):
    """An AF_INET6 socket to ::ffff:<pod IPv4> (the JVM's way): the packets are
    IPv4, so Istio's IPv4 rules capture it; the ip6tables rules never see it."""
    counters = Counters(bed)
    result = request_ok(bed, "a", bed.pod(dst).ip, family="inet6")
    assert result["local"].startswith(f"[::ffff:{bed.pod('a').ip}]:")
    assert result["body"]["pod"] == dst and result["body"]["peer"].startswith("127.0.0.6:")
    assert counters.moved() == {("a", "ipv4", "ISTIO_REDIRECT"): 1, (dst, "ipv4", "ISTIO_IN_REDIRECT"): 1,
                                ("a", "tls", "outbound"): 1, (dst, "tls", "inbound"): 1}


@pytest.mark.bpf
@pytest.mark.parametrize("dst", ["b", "d"], ids=["same-node", "cross-node"])
def test_ipv4_traffic_of_a_dual_stack_bed_is_unchanged(bed, dst):
    counters = Counters(bed)
    result = request_ok(bed, "a", bed.pod(dst).ip)
    assert result["local"].startswith(f"{bed.pod('a').ip}:")
    assert result["body"]["pod"] == dst and result["body"]["peer"].startswith("127.0.0.6:")
    assert counters.moved() == {("a", "ipv4", "ISTIO_REDIRECT"): 1, (dst, "ipv4", "ISTIO_IN_REDIRECT"): 1,
                                ("a", "tls", "outbound"): 1, (dst, "tls", "inbound"): 1}


@pytest.mark.bpf
def test_plain_pod_over_ipv6(bed):
    """Meshed -> plain over IPv6: out through a's sidecar in plain text (c has
    no sidecar); plain -> meshed over IPv6 is refused by b's STRICT sidecar."""
    counters = Counters(bed)
    result = request_ok(bed, "a", bed.pod("c").ip6)
    assert result["body"]["peer"].startswith(f"[{bed.pod('a').ip6}]:")   # a's sidecar connects from a's address
    assert counters.moved() == {("a", "ipv6", "ISTIO_REDIRECT"): 1}
    counters = Counters(bed)
    refused = bed.requests("c", bed.pod("b").ip6)[0]
    assert refused["status"] is None and refused["error"]
    assert counters.moved() == {("b", "ipv6", "ISTIO_IN_REDIRECT"): 1}


@pytest.mark.bpf
def test_load_generator_over_ipv6_and_v4_mapped(bed):
    """The load client used by the toggle tests, with native IPv6 targets and
    with AF_INET6 sockets to IPv4 targets: every request answered."""
    b, d = bed.pod("b"), bed.pod("d")
    native = LoadProcess(bed, "a", {"b": f"[{b.ip6}]:8080", "d": f"[{d.ip6}]:8080"}, duration=2, keepalive=1)
    mapped = LoadProcess(bed, "a", {"b": f"{b.ip}:8080", "d": f"{d.ip}:8080"}, duration=2, keepalive=1,
                         family="inet6")
    for load in (native, mapped):
        result = load.result()
        assert result["requests"] > 0 and result["failed"] == 0, result["failures"][:3]
    locals_ = [c["local"] for c in mapped.result()["keepalive_connections"]]
    assert locals_ and all(local.startswith("[::ffff:") for local in locals_)


@pytest.mark.bpf
def test_http_port_over_ipv6_and_v4_mapped():
    """A port declared HTTP (one 0.0.0.0_8080 listener, routes by Host, pooled
    upstreams): native IPv6 to a pod stays IPv6 to the app; a v4-mapped
    client's Host names the IPv4 address, so it is routed to the Service's
    cluster (with mTLS), never to the plain-text PassthroughCluster."""
    name = f"sixh{os.getpid()}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=2, pods=SPECS, mode="iptables", mtls="strict", ip_families=DUAL,
                    http_ports=(8080,)) as tb:
        before = tb.sidecar_stats("a")
        for dst in ("b", "d"):
            native = request_ok(tb, "a", tb.pod(dst).ip6)
            assert native["body"]["pod"] == dst and native["body"]["peer"].startswith("[::6]:")
            mapped = request_ok(tb, "a", tb.pod(dst).ip, family="inet6")
            assert mapped["body"]["pod"] == dst and mapped["body"]["peer"].startswith("127.0.0.6:")
            vip6 = request_ok(tb, "a", tb.pod(dst).service_ip6)
            assert vip6["body"]["pod"] == dst and vip6["body"]["peer"].startswith("127.0.0.6:")
        after = tb.sidecar_stats("a")
        moved = lambda counter: after.get(counter, 0) - before.get(counter, 0)   # noqa: E731
        assert moved("cluster.PassthroughCluster.upstream_rq_total") == 0
        for dst in ("b", "d"):
            assert moved(f"cluster.outbound|8080|ipv6|{dst}.default.svc.cluster.local.upstream_rq_total") == 1
            assert moved(f"cluster.outbound|8080||{dst}.default.svc.cluster.local.upstream_rq_total") == 2


@pytest.mark.bpf
def test_mode_switches_take_the_ipv6_rules_and_passthrough_address_along(bed):
    """nomesh: no ip6tables rules, no ::6, IPv6 straight to the app; back to
    iptables: both again, and the IPv6 path through the sidecars works."""
    def state(pod):
        ns = bed.pod(pod).netns
        return ("ISTIO_REDIRECT" in sandbox.sh("ip6tables-save", "-t", "nat", netns=ns),
                "::6/128" in sandbox.sh("ip", "-6", "addr", "show", "dev", "lo", netns=ns))
    assert state("a") == (True, True) and state("c") == (False, False)
    bed.set_mode("nomesh")
    try:
        assert state("a") == (False, False)
        result = request_ok(bed, "a", bed.pod("d").ip6)
        assert result["body"]["peer"].startswith(f"[{bed.pod('a').ip6}]:")
    finally:
        bed.set_mode("iptables")
    assert state("a") == (True, True)
    assert request_ok(bed, "a", bed.pod("d").ip6)["body"]["peer"].startswith("[::6]:")


@pytest.mark.bpf
def test_dual_stack_bed_leaves_nothing_behind():
    """Also: nginx (the benchmarks' app) serves both families with the peer
    written as the Python app writes it."""
    name = f"sixd{os.getpid()}{uuid.uuid4().hex[:4]}"
    tb = Testbed.up(name, nodes=2, pods_per_node=1, mode="iptables", ip_families=DUAL, app="nginx")
    try:
        assert request_ok(tb, "n0p0", tb.pod("n1p0").ip6)["body"]["peer"].startswith("[::6]:")
        assert request_ok(tb, "n0p0", tb.pod("n1p0").ip)["body"]["peer"].startswith("127.0.0.6:")
        assert Testbed.attach(name).ip_families == DUAL           # the state file keeps it
        assert Testbed.attach(name).pod("n1p0").ip6 == tb.pod("n1p0").ip6
        pods_file = json.loads(tb.pods_file("node0").read_text())
        assert pods_file["items"][0]["status"]["podIPs"] == [{"ip": ip} for ip in tb.pod("n0p0").ips]
        with socket.socket(socket.AF_INET6) as probe:   # the bed's addresses are not the host's
            with pytest.raises(OSError):
                probe.bind((tb.pod("n0p0").ip6, 0))
    finally:
        tb.down()
    assert leftovers(name) == []
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(topology.prefix(name))]
    assert not topology.cgroup_dir(name).exists()

"""DNS capture end to end on the test bed, with a real resolver (dig, glibc).

Pod `cap` runs with ISTIO_META_DNS_CAPTURE (Istio's DNS rules for its
resolv.conf server, and the DNS proxy on 127.0.0.1:15053 as uid 1337); pod
`nocap` is meshed without it. The node's DNS server (outside the pods) is the
nameserver of both. In iptables mode Istio's rules capture the lookups; in
ebpf mode the agent's programs do, and no DNS packet is NATed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from merbridge_py import sandbox
from merbridge_py.testbed import dns
from merbridge_py.testbed.testbed import Testbed
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf

CAPTURE = {"proxy.istio.io/config": "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"}
SPECS = [PodSpec("cap", node=0, annotations=CAPTURE), PodSpec("nocap", node=0)]
MESH_NAME, MESH_V4 = "mesh.dns.test", dns.PROXY_RECORDS["mesh.dns.test."][0]
OUTSIDE_NAME, OUTSIDE_V4 = "outside.dns.test", dns.SERVER_RECORDS["outside.dns.test."][0]
# the agent's own tests: on the ebpf bed only (a skip would fail under MERBRIDGE_REQUIRE_BPF=1)
EBPF_ONLY = pytest.mark.parametrize("bed", ["ebpf"], indirect=True)
LOOKUPS = int(os.environ.get("MERBRIDGE_DNS_LOOKUPS", "10000"))


@pytest.fixture(scope="module", params=("iptables", "ebpf"))
def bed(request):
    name = f"dns{request.param[:2]}{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
    with Testbed.up(name, nodes=1, pods=SPECS, mode=request.param, proxy="haproxy", mtls="off") as tb:
        yield tb


def server_ip(tb) -> str:
    return dns.nameservers(tb.node("node0"))[0]


def counts(tb) -> tuple[dict, dict]:
    return dns.proxy_stats(tb, "cap"), dns.server_stats(tb, "node0")


def dig(tb, pod, *args, uid=None) -> list[str]:
    argv = ["dig", "+short", "+tries=1", "+time=2", *args]
    if uid is not None:
        p = tb.pod(pod)
        proc = sandbox.spawn(argv, netns=p.netns, cgroup=Path(p.cgroup), uid=uid,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        return out.split()
    done = tb.exec_in(pod, argv)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def query(tb, pod, name, how) -> dict:
    done = tb.exec_in(pod, [sys.executable, "-m", "merbridge_py.testbed.dns", "query", "--server", server_ip(tb),
                            "--name", name, "--how", how])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def dns_nat_packets(tb, pod) -> int:
    """Packets that hit Istio's DNS REDIRECT rules (nat ISTIO_OUTPUT_DNS)."""
    total = 0
    for line in sandbox.sh("iptables-save", "-c", "-t", "nat", netns=tb.pod(pod).netns).splitlines():
        if line.startswith("[") and "-A ISTIO_OUTPUT_DNS" in line and "--to-port" in line:
            total += int(line[1:line.index(":")])
    return total


def conntrack_app_dns_entries(tb, pod) -> list[str]:
    """conntrack entries in the pod's namespace for the app's DNS to port 53
    (NATed to the proxy or not), leaving out the proxy's own upstream queries
    (Istio's raw rules put those in zone 1; they exist in every mode).
    Loopback entries app <-> 127.0.0.1:15053 are not counted: with Istio's
    rules loaded, netfilter tracks all the pod's traffic, but those flows are
    not NATed, so they are not what the DNS conntrack race is about."""
    out = sandbox.sh("sh", "-c", "conntrack -L 2>/dev/null || true", netns=tb.pod(pod).netns)
    return [line for line in out.splitlines() if re.search(r"dport=53\b", line) and "zone=1 " not in line]


def test_udp_lookup_reaches_the_proxy_and_resolves(bed):
    before, _ = counts(bed)
    assert dig(bed, "cap", MESH_NAME) == [MESH_V4]
    after, _ = counts(bed)
    assert after["udp"] == before["udp"] + 1


def test_tcp_lookup_reaches_the_proxy_and_is_forwarded(bed):
    before, server_before = counts(bed)
    assert dig(bed, "cap", "+tcp", OUTSIDE_NAME) == [OUTSIDE_V4]
    after, server_after = counts(bed)
    assert after["tcp"] == before["tcp"] + 1
    assert after["forwarded"] == before["forwarded"] + 1
    assert server_after["udp"] == server_before["udp"] + 1   # the proxy's own query upstream


@pytest.mark.parametrize("how", ["unconnected", "connected", "tcp", "unconnected6", "connected6", "tcp6"])
def test_replies_carry_the_servers_address(bed, how):
    """Resolvers drop a reply from an address they did not ask: the client
    sees the server's address as the source (and as the connected peer).
    The `6` cases ask from AF_INET6 sockets through the v4-mapped address."""
    before, _ = counts(bed)
    got = query(bed, "cap", MESH_NAME, how)
    server = f"::ffff:{server_ip(bed)}" if how.endswith("6") else server_ip(bed)
    assert got["answers"] == [MESH_V4]
    assert got["reply_from"] == [server, 53]
    if not how.startswith("unconnected"):
        assert got["peer"] == [server, 53]
    after, _ = counts(bed)
    transport = "tcp" if how.startswith("tcp") else "udp"
    assert after[transport] == before[transport] + 1


def test_pod_without_dns_capture_resolves_directly(bed):
    before, server_before = counts(bed)
    assert dig(bed, "nocap", OUTSIDE_NAME) == [OUTSIDE_V4]
    assert dig(bed, "nocap", "+tcp", OUTSIDE_NAME) == [OUTSIDE_V4]
    assert dig(bed, "nocap", MESH_NAME) == []          # only the capturing proxy knows mesh names
    after, server_after = counts(bed)
    assert after == before
    assert server_after["udp"] == server_before["udp"] + 2
    assert server_after["tcp"] == server_before["tcp"] + 1


def test_proxys_own_lookups_go_to_the_server(bed):
    before, server_before = counts(bed)
    assert dig(bed, "cap", OUTSIDE_NAME, uid=1337) == [OUTSIDE_V4]
    assert dig(bed, "cap", "+tcp", OUTSIDE_NAME, uid=1337) == [OUTSIDE_V4]
    after, server_after = counts(bed)
    assert after == before
    assert server_after["udp"] == server_before["udp"] + 1
    assert server_after["tcp"] == server_before["tcp"] + 1


def test_nat_and_conntrack_see_dns_only_in_iptables_mode(bed):
    bed.settle()
    nat_before = dns_nat_packets(bed, "cap")
    for how in ("unconnected", "connected", "tcp", "unconnected6", "connected6", "tcp6"):
        assert query(bed, "cap", OUTSIDE_NAME, how)["answers"] == [OUTSIDE_V4]
    assert dig(bed, "cap", MESH_NAME) == [MESH_V4]
    nat_packets, entries = dns_nat_packets(bed, "cap") - nat_before, conntrack_app_dns_entries(bed, "cap")
    if bed.mode == "iptables":   # the witness works: Istio's rules NAT every one of them
        assert nat_packets == 7 and len(entries) >= 7, (nat_packets, entries)
    else:
        assert nat_packets == 0
        assert entries == []


def dns_events(tb) -> dict[str, float]:
    """The node agent's DNS counters (merbridge_dns_events_total), by event."""
    return {re.search(r'event="(\w+)"', k).group(1): v for k, v in tb.agent_metrics("node0").items()
            if k.startswith("merbridge_dns_events_total{")}


@EBPF_ONLY
def test_agent_counts_what_its_programs_did(bed):
    before = dns_events(bed)
    for how in ("unconnected", "connected", "tcp"):
        query(bed, "cap", MESH_NAME, how)
    dig(bed, "cap", OUTSIDE_NAME, uid=1337)
    moved = {k: dns_events(bed)[k] - before.get(k, 0) for k in before}
    assert moved["udp_sendmsg"] == 1 and moved["udp_connect"] == 1 and moved["tcp_connect"] == 1, moved
    assert moved["reply_source"] >= 2 and moved["peer_name"] >= 2, moved
    # dig as the proxy: skipped by the uid check (dig's connect and, when it retries, its send)
    assert moved["proxy_skipped"] >= 1 and moved["err_map_update"] == 0, moved


@EBPF_ONLY
def test_status_says_which_servers_the_datapath_captures(bed):
    from merbridge_py.agent.status import agent_request
    pods = json.dumps(agent_request(bed.admin_socket("node0"), "/status"))
    assert f"DNS: DNS to {server_ip(bed)} goes to the DNS proxy (from the installed rules)" in pods


@EBPF_ONLY
def test_toggle_to_iptables_gives_dns_back_to_istios_rules(bed):
    admin = str(bed.admin_socket("node0"))
    for mode, nat_moves in (("iptables", True), ("ebpf", False)):
        done = subprocess.run([sys.executable, "-m", "merbridge_py.cli", "toggle", mode, "--node",
                               "--admin-socket", admin], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        nat_before = dns_nat_packets(bed, "cap")
        for how in ("unconnected", "connected"):
            assert query(bed, "cap", MESH_NAME, how)["answers"] == [MESH_V4]
        assert (dns_nat_packets(bed, "cap") - nat_before == 2) is nat_moves, mode


def test_parallel_a_and_aaaa_lookups(bed, record_property):
    """glibc's default: A and AAAA at once from one socket. In iptables mode
    the count is measured and reported (the conntrack race may or may not
    show on this kernel); in ebpf mode none may time out."""
    bed.settle()
    before, _ = counts(bed)
    done = bed.exec_in("cap", [sys.executable, "-m", "merbridge_py.testbed.dns", "lookups", "--name", MESH_NAME,
                               "--count", str(LOOKUPS)], timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    after, _ = counts(bed)
    record_property("lookups", result)
    print(f"{bed.mode}: {result}; proxy queries {after['udp'] - before['udp']}")
    assert result["errors"] == 0
    assert after["udp"] - before["udp"] >= 2 * LOOKUPS     # every lookup's A and AAAA reached the proxy
    if bed.mode == "ebpf":
        assert result["timeouts"] == 0

"""The machine record: sysctl parsing and the comparison with a fresh namespace."""

import os
import uuid

import pytest

from merbridge_py import sandbox
from merbridge_py.bench import machine

SYSCTL_A = """\
net.ipv4.ip_local_port_range = 32768\t60999
net.ipv4.tcp_fastopen_key = 00000000-00000000-00000000-00000000
net.netfilter.nf_conntrack_count = 17
net.ipv4.conf.eth0.rp_filter = 2
kernel.hostname = vm
net.core.somaxconn = 4096
"""


def test_sysctl_a_parsing_keeps_settings_and_drops_state():
    values = machine.parse_sysctl_a(SYSCTL_A)
    assert values == {"net.ipv4.ip_local_port_range": "32768 60999", "net.ipv4.conf.eth0.rp_filter": "2",
                      "net.core.somaxconn": "4096"}


def test_interface_keys_compare_with_the_familys_default():
    assert machine._default_key("net.ipv4.conf.eth0.rp_filter") == "net.ipv4.conf.default.rp_filter"
    assert machine._default_key("net.ipv6.neigh.br0.base_reachable_time_ms") == \
        "net.ipv6.neigh.default.base_reachable_time_ms"
    assert machine._default_key("net.ipv4.tcp_tw_reuse") == "net.ipv4.tcp_tw_reuse"
    assert machine._per_if_derived("net.ipv6.conf.eth0.mtu")
    assert machine._per_if_derived("net.ipv4.conf.lo.forwarding")
    assert not machine._per_if_derived("net.ipv4.conf.all.forwarding")
    assert not machine._per_if_derived("net.ipv4.conf.eth0.rp_filter")


def test_machine_record_names_the_tools():
    info = machine.collect([])
    assert info["cpu_count"] == os.cpu_count() and info["kernel"] == os.uname().release
    assert info["tools"]["wrk"].startswith("wrk ") and "Copyright" not in info["tools"]["wrk"]
    assert "3." in info["tools"]["iperf3"]
    assert info["sysctls"] == []


@pytest.mark.bpf
def test_a_tuned_namespace_is_reported_with_its_note():
    tuned = f"{sandbox.OWNED_PREFIX}bt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    plain = tuned + "p"
    sandbox.netns_add(tuned)
    sandbox.netns_add(plain)
    try:
        sandbox.sh("sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=0", netns=tuned)
        sandbox.sh("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", netns=tuned)
        sandbox.sh("ip", "link", "set", "v0", "mtu", "9000", netns=tuned)   # a device property, not tuning
        found = machine.sysctl_differences([tuned, plain])
        assert [s["name"] for s in found] == ["net.ipv4.tcp_max_tw_buckets"]
        assert found[0]["values"] == {"0": [tuned]}
        assert "favours iptables" in found[0]["note"]
        assert machine.sysctl_differences([plain]) == []
    finally:
        sandbox.netns_delete(tuned)
        sandbox.netns_delete(plain)
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(f"{sandbox.OWNED_PREFIX}bench-ref-{os.getpid()}")]

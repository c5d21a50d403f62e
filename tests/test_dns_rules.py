"""Istio's DNS capture rules as the test bed writes them (testbed/istio_dns.py),
against Istio's golden output, and what turns them on."""

from pathlib import Path

import pytest

from merbridge_py.testbed import istio_dns
from merbridge_py.testbed.istio_dns import DnsCapture
from merbridge_py.testbed.istio_iptables import CaptureFlags

# istio/istio tools/istio-iptables/pkg/capture/testdata/dns-uid-gid.golden at
# f4d72e7f (January 2025), copied unchanged. run_test.go gives it: RedirectDNS,
# DNSServersV4 127.0.0.53 (and a V6 server), ProxyUID "3,4", ProxyGID "1,2", IPv6 on.
GOLDEN = Path(__file__).parent / "data" / "istio-dns" / "dns-uid-gid.golden"


def ipv4_part(text: str) -> list[str]:
    """The iptables-save half of a golden: from the first table to the start
    of the second nat table (the ip6tables half)."""
    lines = [line for line in text.splitlines() if line not in ("iptables-save", "ip6tables-save")]
    second_nat = [i for i, line in enumerate(lines) if line == "* nat"][1]
    return lines[:second_nat]


def test_per_server_rules_match_istio_golden():
    flags = CaptureFlags(proxy_uid="3,4", proxy_gid="1,2")
    got = istio_dns.rule_lines(flags, DnsCapture(redirect=True, servers=("127.0.0.53",)))
    assert got == ipv4_part(GOLDEN.read_text())


def test_capture_all_drops_the_addresses():
    flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337")
    lines = istio_dns.rule_lines(flags, DnsCapture(redirect=True, capture_all=True))
    dns = [line for line in lines if "ISTIO_OUTPUT_DNS" in line or "ISTIO_INBOUND -p udp" in line]
    assert dns == [
        "-N ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
        "-N ISTIO_OUTPUT_DNS",
        "-A OUTPUT -j ISTIO_OUTPUT_DNS",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
        "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2",
        "-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1",
    ]
    assert "0.0.0.0" not in "\n".join(lines)


def test_redirect_without_servers_is_off_as_in_istio():
    flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337")
    lines = istio_dns.rule_lines(flags, DnsCapture(redirect=True))
    assert not any("DNS" in line or "53" in line for line in lines)


def test_proxy_config_annotation_turns_capture_on():
    resolv = "search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\n"
    on = {"proxy.istio.io/config": "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n"}
    assert istio_dns.dns_capture(on, resolv) == DnsCapture(True, False, ("10.96.0.10",))
    assert istio_dns.dns_capture({}, resolv) == DnsCapture(False, False, ("10.96.0.10",))
    assert not istio_dns.dns_capture({}, resolv).active
    assert istio_dns.dns_capture(on, resolv, cni=True) == DnsCapture(True, True, ())
    json_form = {"proxy.istio.io/config": '{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "false"}}'}
    assert not istio_dns.dns_capture(json_form, resolv).redirect


def test_malformed_proxy_config_is_a_clear_error():
    with pytest.raises(ValueError, match="proxy.istio.io/config"):
        istio_dns.proxy_metadata({"proxy.istio.io/config": "[1, 2]"})

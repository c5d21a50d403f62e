"""The DNS decision (policy/dns.py): when the datapath takes over a pod's DNS
capture, with which servers, and when port 53 stays with iptables and why."""

import shutil
import uuid
from pathlib import Path

import pytest

from merbridge_py import sandbox
from merbridge_py.dns_datapath import policy_value
from merbridge_py.layout import DNS_CAPTURE_ALL, MAX_DNS_SERVERS
from merbridge_py.policy import decide
from merbridge_py.policy import dns as dns_policy
from merbridge_py.policy.capture import Capture
from merbridge_py.policy.live_rules import read_netns
from merbridge_py.testbed import istio_dns
from merbridge_py.testbed.istio_dns import DnsCapture
from merbridge_py.testbed.istio_iptables import CaptureFlags

GOLDEN = Path(__file__).parent / "data" / "istio-dns" / "dns-uid-gid.golden"
DNS_ENV = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]


def pod(annotations=None, env=DNS_ENV, setup="istio-init", args=None):
    init = {"name": setup}
    if args is not None:
        init["args"] = args
    proxy = {"name": "istio-proxy", "image": "istio/proxyv2", "env": list(env)}
    if setup == "istio-validation":
        proxy["securityContext"] = {"runAsUser": 1337, "runAsGroup": 1337}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "annotations": dict(annotations or {})},
            "spec": {"containers": [{"name": "app"}, proxy], "initContainers": [init]},
            "status": {"phase": "Running", "podIP": "10.244.1.7", "podIPs": [{"ip": "10.244.1.7"}]}}


def test_pod_without_dns_capture_has_no_dns_decision():
    v = decide(pod(env=[]))
    assert v.accelerate and v.dns is None and "dns" not in v.to_json()


def test_istio_init_pod_waits_for_its_installed_rules():
    v = decide(pod())
    assert v.accelerate and v.dns.captured and v.dns.accelerated and v.dns.pending
    assert (v.dns.proxy_uid, v.dns.proxy_gid) == (1337, 1337)
    assert v.to_json()["dns"]["captured"] is True


def test_istio_cni_pod_captures_every_address():
    v = decide(pod(setup="istio-validation"))
    assert v.dns.accelerated and v.dns.capture_all and not v.dns.pending, v.reason
    assert policy_value(v.dns).flags == DNS_CAPTURE_ALL


def test_excluded_port_53_is_not_captured_at_all():
    v = decide(pod({"traffic.sidecar.istio.io/excludeOutboundPorts": "53"}))
    assert v.accelerate and v.dns is None   # Istio's -o RETURN comes before its DNS chain


def test_several_proxy_uids_keep_port_53_on_iptables():
    # decide() already keeps such pods on iptables as a whole; intent() refuses on its own too
    capture = Capture("istio-init arguments", decide(pod()).policy, proxy_uids=(1337, 1338), proxy_gids=(1337,))
    got = dns_policy.intent(capture, cni=False)
    assert got.captured and not got.accelerated
    assert "port 53 stays with iptables" in got.reason and "1338" in got.reason


def test_servers_from_istios_golden_rules():
    golden = GOLDEN.read_text().split("* raw")[0]
    pending = decide(pod()).dns
    got = dns_policy.with_installed_rules(pending, golden)
    assert got.accelerated and not got.pending and got.servers == ("127.0.0.53",) and not got.capture_all
    assert "127.0.0.53" in got.reason


def test_capture_all_rules():
    flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337")
    text = istio_dns.restore_payload(flags, DnsCapture(True, True))
    got = dns_policy.with_installed_rules(decide(pod()).dns, text)
    assert got.accelerated and got.capture_all and got.servers == ()


def test_rules_that_cannot_be_taken_over_exactly_stay_with_iptables():
    pending = decide(pod()).dns
    flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337")
    many = tuple(f"10.96.0.{i}" for i in range(1, MAX_DNS_SERVERS + 2))
    cases = {
        "could not be read": (None, "permission denied"),
        f"{len(many)} DNS servers": (istio_dns.restore_payload(flags, DnsCapture(True, False, many)), None),
        "different servers": ("-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.0.0.1/32 -j REDIRECT --to-ports 15053\n"
                              "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.0.0.2/32 -j REDIRECT --to-port 15053\n",
                              None),
        "shows no Istio nat rules": ("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n", None),
        "unexpected rule": ("-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15054\n", None),
    }
    for why, (text, error) in cases.items():
        got = dns_policy.with_installed_rules(pending, text, error)
        assert got.captured and not got.accelerated and "port 53 stays with iptables" in got.reason, why
        assert why in got.reason


def test_no_dns_rules_installed_means_nothing_to_take_over():
    flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337")
    got = dns_policy.with_installed_rules(decide(pod()).dns, istio_dns.restore_payload(flags, DnsCapture(True)))
    assert not got.captured and not got.accelerated


def test_policy_value_holds_servers_in_network_order():
    d = dns_policy.DnsDecision(True, True, "x", servers=("10.96.0.10", "1.2.3.4"), proxy_uid=7, proxy_gid=8)
    v = policy_value(d)
    assert (v.proxy_uid, v.proxy_gid, v.flags, v.n_servers) == (7, 8, 0, 2)
    assert bytes(v)[16:24] == bytes([10, 96, 0, 10, 1, 2, 3, 4])


@pytest.mark.bpf
def test_servers_read_back_from_real_iptables_save():
    """iptables-save spells the rules differently (-d first, -m udp): read
    back from a scratch namespace, the servers are the ones installed."""
    if shutil.which("iptables-restore") is None:
        pytest.skip("iptables-restore is not installed")
    ns = f"mbp-dnsp{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(ns)
    try:
        flags = CaptureFlags(proxy_uid="1337", proxy_gid="1337", include_outbound_ip_ranges="*")
        sandbox.sh("iptables-restore", "--noflush", netns=ns,
                   input=istio_dns.restore_payload(flags, DnsCapture(True, False, ("10.96.0.10", "10.96.0.11"))))
        text, error = dns_policy.read_nat_rules(f"/run/netns/{ns}")
        assert error is None
        got = dns_policy.with_installed_rules(decide(pod()).dns, text)
        assert got.accelerated and got.servers == ("10.96.0.10", "10.96.0.11"), got.reason
        # the agent's rules reader (live_rules) carries the same servers: decided complete
        installed = read_netns(f"/run/netns/{ns}")
        assert installed.dns_redirects is not None, installed
        got = dns_policy.intent(installed, cni=False)
        assert got.accelerated and not got.pending and got.servers == ("10.96.0.10", "10.96.0.11"), got.reason
    finally:
        sandbox.netns_delete(ns)

"""The agent's DNS decision on top of the installed-rules cache: the servers
come from the rules the cache already read (no second read), a changed DNS
decision with unchanged mesh rules is written again, nftables pods leave
port 53 to Istio's rules with the reason, and without a rules reader the
DNS rules are read once per namespace and spec. Fake kernel and namespaces
(tests/test_dns_testbed.py runs the real thing)."""

from __future__ import annotations

import json

import pytest

from helpers.fake_kernel import FakeDatapath, FakeNetns
from merbridge_py.agent.core import Agent
from merbridge_py.mesh import ISTIO
from merbridge_py.policy import dns as dns_policy
from merbridge_py.policy import installed as inst
from merbridge_py.testbed import istio_dns
from merbridge_py.testbed import istio_iptables as ii
from merbridge_py.testbed import kube
from merbridge_py.testbed.topology import Node, Pod

NODE = Node("node0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/x", "/y")
DNS_ON = {istio_dns.ANN_PROXY_CONFIG: json.dumps({"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}})}


class DnsDatapath(FakeDatapath):
    def __init__(self):
        super().__init__()
        self.dns: dict[int, dns_policy.DnsDecision] = {}
        self.dns_writes = 0

    def set_pod_dns(self, cookie, decision):
        self.dns_writes += 1
        self.dns[cookie] = decision


def pod_object(extra: dict | None = None, resource_version: str = "1") -> dict:
    pod = Pod("web", "node0", "10.0.0.1", "mbp-web", True, "/x", dict(DNS_ON, **(extra or {})), [8080], "veth0",
              "10.96.0.5")
    obj = kube.pod_object("tb", pod, NODE, created="2026-01-01T00:00:00Z")
    obj["metadata"]["resourceVersion"] = resource_version
    return obj


def rules_text(servers: tuple[str, ...]) -> str:
    return istio_dns.restore_payload(ii.flags_from_annotations(DNS_ON),
                                     istio_dns.DnsCapture(True, False, servers))


class Reader:
    def __init__(self, result):
        self.result = result
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return self.result


@pytest.fixture
def no_iptables_save(monkeypatch):
    calls = []
    monkeypatch.setattr(dns_policy, "read_nat_rules", lambda path: calls.append(path) or (rules_text(("10.9.9.9",)),
                                                                                          None))
    return calls


def reason(agent) -> str:
    (status,) = agent.status()
    return status["reason"]


def test_servers_come_from_the_rules_the_cache_read(no_iptables_save):
    dp, netns = DnsDatapath(), FakeNetns()
    netns.add("10.0.0.1", 1)
    reader = Reader(inst.from_iptables_save(rules_text(("10.96.0.10",))))
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=reader)
    agent.update_pods({"default/web": pod_object()})
    for _ in range(5):
        agent.reconcile_once()
    assert reader.calls == 1 and no_iptables_save == []      # read once, by the cache only
    got = dp.dns[1]
    assert got.accelerated and not got.pending and got.servers == ("10.96.0.10",), got.reason
    assert "DNS: DNS to 10.96.0.10 goes to the DNS proxy" in reason(agent)
    assert dp.dns_writes == 1


def test_a_changed_dns_decision_is_written_even_when_the_mesh_rules_are_the_same(no_iptables_save):
    dp, netns = DnsDatapath(), FakeNetns()
    netns.add("10.0.0.1", 1)
    reader = Reader(inst.from_iptables_save(rules_text(("10.96.0.10",))))
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=reader)
    agent.update_pods({"default/web": pod_object()})
    agent.reconcile_once()
    rules_before = dp.pod_policy[1]
    # the spec changes (read again), and the rules now name another server
    reader.result = inst.from_iptables_save(rules_text(("10.96.0.11",)))
    agent.update_pods({"default/web": pod_object({"example.com/unrelated": "x"}, resource_version="2")})
    agent.reconcile_once()
    assert reader.calls == 2 and dp.pod_policy[1] == rules_before
    assert dp.dns[1].servers == ("10.96.0.11",)
    assert "10.96.0.11" in reason(agent)


def test_the_dns_entry_goes_when_the_rules_stop_capturing_dns(no_iptables_save):
    """A pod that stays accelerated but whose rules no longer capture DNS (or
    an entry left by the agent before a restart): its dns_policy entry is
    removed, so port 53 is never taken where the rules do not take it."""
    dp, netns = DnsDatapath(), FakeNetns()
    netns.add("10.0.0.1", 1)
    reader = Reader(inst.from_iptables_save(rules_text(("10.96.0.10",))))
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=reader)
    agent.update_pods({"default/web": pod_object()})
    agent.reconcile_once()
    assert dp.dns[1].accelerated
    # DNS proxying switched off in the proxy's config, and the rules (reinstalled) without the DNS chain
    dns_off = {istio_dns.ANN_PROXY_CONFIG: json.dumps({"proxyMetadata": {}})}
    reader.result = inst.from_iptables_save(ii.restore_payload(ii.flags_from_annotations(dns_off)))
    agent.update_pods({"default/web": pod_object(dns_off, resource_version="2")})
    agent.reconcile_once()
    (st,) = agent.status()
    assert st["accelerated"] and 1 in dp.pod_policy
    assert not dp.dns[1].accelerated, dp.dns[1].reason


def test_nftables_pods_leave_port_53_to_istios_rules(no_iptables_save):
    dp, netns = DnsDatapath(), FakeNetns()
    netns.add("10.0.0.1", 1)
    nft = inst.from_rules(inst.iptables_nat_rules(rules_text(("10.96.0.10",))), inst.SOURCE_NFTABLES)
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=Reader(nft))
    agent.update_pods({"default/web": pod_object()})
    agent.reconcile_once()
    got = dp.dns[1]
    assert got.captured and not got.accelerated, got.reason
    assert "nftables" in got.reason and "port 53 stays with iptables" in got.reason
    assert "nftables" in reason(agent) and no_iptables_save == []


def test_without_a_rules_reader_dns_rules_are_read_once_per_namespace_and_spec(no_iptables_save):
    dp, netns = DnsDatapath(), FakeNetns()
    netns.add("10.0.0.1", 1)
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=None)
    agent.update_pods({"default/web": pod_object()})
    for _ in range(3):
        agent.reconcile_once()
    assert no_iptables_save == ["/run/netns/1"]
    assert dp.dns[1].servers == ("10.9.9.9",)
    # a status-only change: decided again, its DNS rules not read again
    bumped = pod_object(resource_version="2")
    agent.update_pods({"default/web": bumped})
    agent.reconcile_once()
    assert no_iptables_save == ["/run/netns/1"] and dp.dns[1].servers == ("10.9.9.9",)
    # a spec change: read again
    agent.update_pods({"default/web": pod_object({"example.com/unrelated": "x"}, resource_version="3")})
    agent.reconcile_once()
    assert no_iptables_save == ["/run/netns/1", "/run/netns/1"]

"""The agent decides from the rules Istio installed in each pod's namespace
(issue 11): read once per namespace and spec, not on every pass; the source
shown in /status; rules that capture more than the spec, or that cannot be
read, keep the pod on iptables with the reason; a namespace without rules yet
is read again later. Fake kernel and namespaces; the reader is a stand-in for
live_rules.read_netns that counts its calls (tests/test_testbed_installs.py
and test_testbed_rules_e2e.py read real rules)."""

from __future__ import annotations

import copy

import pytest

from helpers.fake_kernel import FakeDatapath, FakeNetns
from merbridge_py.agent import core
from merbridge_py.agent.core import Agent
from merbridge_py.mesh import ISTIO
from merbridge_py.policy import installed as inst
from merbridge_py.policy import live_rules
from merbridge_py.testbed import istio_iptables as ii
from merbridge_py.testbed import kube
from merbridge_py.testbed.topology import Node, Pod

NODE = Node("node0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/x", "/y")


def pod_object(name: str, ip: str, annotations: dict | None = None, resource_version: str = "1") -> dict:
    pod = Pod(name, "node0", ip, f"mbp-{name}", True, "/x", dict(annotations or {}), [8080], "veth0", "10.96.0.5")
    obj = kube.pod_object("tb", pod, NODE, created="2026-01-01T00:00:00Z")
    obj["metadata"]["resourceVersion"] = resource_version
    return obj


def rules_of(annotations: dict | None = None, nftables: bool = False, **mesh) -> inst.Capture:
    """What read_netns returns for the rules istio-init installs for these annotations."""
    flags = ii.flags_from_annotations(annotations or {}, mesh=ii.MeshDefaults(**mesh))
    if nftables:     # parse the JSON nft prints for that script: the same Rule values, another source
        rules = inst.iptables_nat_rules(ii.restore_payload(flags))
        return inst.from_rules(rules, inst.SOURCE_NFTABLES)
    return inst.from_iptables_save(ii.restore_payload(flags))


class Reader:
    def __init__(self, by_path: dict):
        self.by_path = by_path
        self.calls: list[str] = []

    def __call__(self, path: str):
        self.calls.append(path)
        return self.by_path[path]


@pytest.fixture
def node():
    dp, netns = FakeDatapath(), FakeNetns()
    reader = Reader({})
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=reader)
    return agent, dp, netns, reader


def status(agent) -> dict:
    return {s["pod"]: s for s in agent.status()}


def test_rules_are_read_once_per_namespace_not_per_pass(node):
    agent, dp, netns, reader = node
    pods = {}
    for i in (1, 2, 3):
        netns.add(f"10.0.0.{i}", i)
        reader.by_path[f"/run/netns/{i}"] = rules_of()
        pods[f"default/p{i}"] = pod_object(f"p{i}", f"10.0.0.{i}")
    agent.update_pods(pods)
    agent.reconcile_once()
    assert sorted(reader.calls) == ["/run/netns/1", "/run/netns/2", "/run/netns/3"]
    assert all(s["accelerated"] for s in status(agent).values())
    for _ in range(20):                  # passes with the same objects, re-delivered
        agent.update_pods({k: dict(v) for k, v in pods.items()})
        agent.reconcile_once()
    assert len(reader.calls) == 3
    # a status-only change (new resourceVersion, same spec): decided again, rules not read again
    bumped = pod_object("p1", "10.0.0.1", resource_version="2")
    bumped["status"]["phase"] = "Running"
    agent.update_pods(dict(pods, **{"default/p1": bumped}))
    agent.reconcile_once()
    assert len(reader.calls) == 3
    # a spec change: read again (the rules are compared with the new spec)
    changed = pod_object("p1", "10.0.0.1", {ii.ANN_EXCLUDE_OUTBOUND_PORTS: "5432"}, resource_version="3")
    agent.update_pods(dict(pods, **{"default/p1": changed}))
    agent.reconcile_once()
    assert reader.calls[3:] == ["/run/netns/1"]
    assert agent.installed.reads == 4


def test_status_shows_the_live_rules_as_the_source(node):
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    reader.by_path["/run/netns/1"] = rules_of(nftables=True)
    reader.by_path["/run/netns/2"] = rules_of()
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1"), "default/b": pod_object("b", "10.0.0.2")})
    agent.reconcile_once()
    st = status(agent)
    assert st["default/a"]["accelerated"] and st["default/a"]["source"] == "nftables rules"
    assert "policy from nftables rules" in st["default/a"]["reason"]
    assert st["default/b"]["source"] == "iptables rules"
    assert set(dp.local_pod_ip) == {"10.0.0.1", "10.0.0.2"}


def test_rules_that_capture_more_than_the_spec_keep_the_pod_on_iptables(node):
    """The spec says 5432 goes direct (patched after the rules were made,
    say); the rules capture it: eBPF would follow the rules, but the spec and
    the rules disagree, so the pod is refused, both values named."""
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = rules_of()
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1", {ii.ANN_EXCLUDE_OUTBOUND_PORTS: "5432"})})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert not st["accelerated"] and not st["pending"]
    assert "iptables rules capture outbound to 0.0.0.0:5432" in st["reason"]
    assert "-o ''" in st["reason"] and "-o '5432'" in st["reason"]
    assert dp.local_pod_ip == {}


def test_rules_that_capture_less_win(node):
    """Rules installed with the mesh default -o 5432 (no annotation): eBPF
    leaves 5432 alone, as the rules do."""
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = rules_of(exclude_outbound_ports="5432")
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert st["accelerated"] and st["source"] == "iptables rules"
    outbound = dp.pod_policy[1][1]
    assert (5432, False) in [(r.port, r.capture) for r in outbound]


def test_unreadable_rules_keep_the_pod_on_iptables_with_the_reason(node):
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = inst.InstalledError("ISTIO_OUTPUT: unrecognised rule (iptables rules): -A X")
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert not st["accelerated"] and not st["pending"]
    assert "installed rules cannot be read exactly: ISTIO_OUTPUT: unrecognised rule" in st["reason"]
    assert dp.local_pod_ip == {}


def test_a_namespace_without_rules_yet_is_read_again_later(node, monkeypatch):
    agent, dp, netns, reader = node
    clock = [100.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = inst.NoIstioRules("no Istio rules in the pod's network namespace")
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert not st["accelerated"] and st["pending"] and "no Istio rules" in st["reason"]
    agent.reconcile_once()                     # before the retry is due: not read again
    assert len(reader.calls) == 1
    reader.by_path["/run/netns/1"] = rules_of()      # istio-init has run
    clock[0] += core.FIRST_RETRY
    agent.reconcile_once()
    assert status(agent)["default/a"]["accelerated"] and len(reader.calls) == 2
    assert dp.local_pod_ip == {"10.0.0.1": 1}


def test_a_reader_that_failed_is_tried_again_later(node, monkeypatch):
    """A failed read (a reader timed out on a busy node, say) says nothing of
    the rules: the pod stays on iptables and is read again, not refused for good."""
    agent, dp, netns, reader = node
    clock = [100.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = live_rules.RulesReadFailed("reading the rules failed: TimeoutExpired: ...")
    agent.update_pods({"default/a": pod_object("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert not st["accelerated"] and st["pending"] and "TimeoutExpired" in st["reason"]
    assert dp.local_pod_ip == {}
    reader.by_path["/run/netns/1"] = rules_of()
    clock[0] += core.FIRST_RETRY
    agent.reconcile_once()
    assert status(agent)["default/a"]["accelerated"] and len(reader.calls) == 2
    assert dp.local_pod_ip == {"10.0.0.1": 1}


def test_an_annotation_patched_later_never_widens_capture(node):
    """Accelerated from its rules; then excludeOutboundPorts is patched in
    (the rules, made once, still capture 5432): the pod leaves the datapath
    with the reason. Patched back: accelerated again."""
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    reader.by_path["/run/netns/1"] = rules_of()
    original = pod_object("a", "10.0.0.1")
    agent.update_pods({"default/a": original})
    agent.reconcile_once()
    assert dp.local_pod_ip == {"10.0.0.1": 1}
    patched = copy.deepcopy(original)          # istio-init's arguments stay as they were
    patched["metadata"]["annotations"][ii.ANN_EXCLUDE_OUTBOUND_PORTS] = "5432"
    patched["metadata"]["resourceVersion"] = "2"
    agent.update_pods({"default/a": patched})
    agent.reconcile_once()
    st = status(agent)["default/a"]
    assert not st["accelerated"] and "0.0.0.0:5432" in st["reason"]
    assert dp.local_pod_ip == {} and dp.pod_policy == {}
    back = copy.deepcopy(original)
    back["metadata"]["resourceVersion"] = "3"
    agent.update_pods({"default/a": back})
    agent.reconcile_once()
    assert status(agent)["default/a"]["accelerated"] and dp.local_pod_ip == {"10.0.0.1": 1}


def test_pods_the_spec_refuses_are_not_read(node):
    agent, dp, netns, reader = node
    netns.add("10.0.0.1", 1)
    opted_out = pod_object("a", "10.0.0.1", {"merbridge.io/accelerate": "false"})
    agent.update_pods({"default/a": opted_out})
    agent.reconcile_once()
    assert reader.calls == [] and "opted out" in status(agent)["default/a"]["reason"]

"""Issue 18, "status stays true", without a kernel: the real Datapath's
set_pod/remove_pod and audit methods over dict maps (helpers/fake_kernel.py
DictMaps, whose writes can be made to fail like a full map's) and a fake
namespace index. tests/test_agent_status_true_e2e.py does the same on the
kernel's maps with real namespaces and traffic.

- A datapath write is all or nothing: a failed second write undoes the first,
  the pod stays on iptables with the reason, nothing leaks.
- A pod whose sandbox is recreated with the same IP (a new namespace, a new
  cookie) is found again: old entries removed, new ones written.
- The periodic audit repairs and counts every difference between the maps and
  the agent's view.
"""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import generate_latest

from helpers.fake_kernel import FakeNetns, dict_datapath, kernel_view
from merbridge_py import layout
from merbridge_py.agent import core
from merbridge_py.agent.core import Agent
from merbridge_py.agent.metrics import AgentMetrics
from merbridge_py.mesh import ISTIO
from merbridge_py.policy.rules import PodKernelFields


def pod(name, ip, **annotations):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}],
                     "initContainers": [{"name": "istio-init"}]},
            "status": {"phase": "Running", "podIP": ip}}


@pytest.fixture
def bed(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    dp, netns, metrics = dict_datapath(), FakeNetns(), AgentMetrics()
    agent = Agent(dp, ISTIO, netns_index=netns, metrics=metrics, rules_reader=None)
    agent.clock = clock
    return agent, dp, netns, metrics


def by_pod(agent):
    return {s["pod"]: s for s in agent.status()}


def status_equals_kernel(agent, dp):
    """What status calls accelerated is exactly what the maps hold, both ways."""
    ips, policies, _ = kernel_view(dp)
    accelerated = {s["ip"] for s in agent.status() if s["accelerated"]}
    assert set(ips) == accelerated
    assert set(policies.values()) == accelerated
    assert set(ips.values()) == set(policies), "every policy is reached from its IP, and only those"


def raw_maps(dp):
    """Every byte the dict maps hold (read past the code under test)."""
    return {name: dict(m.data) for name, m in dp.bpf.items()}


def metric(metrics, kind):
    text = generate_latest(metrics.registry).decode()
    line = f'merbridge_audit_differences_total{{kind="{kind}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


# --- all or nothing ---------------------------------------------------------------------

def test_datapath_a_failed_second_write_undoes_the_first():
    dp = dict_datapath()
    dp.bpf["local_pod_ip"].fail_writes = 1       # the IP index is full
    with pytest.raises(OSError):
        dp.set_pod(7, "10.0.0.1", [], [])
    assert kernel_view(dp) == ({}, {}, set()), "the policy written first must be gone again"


def test_datapath_a_failed_update_restores_the_previous_entries():
    dp = dict_datapath()
    dp.set_pod(7, "10.0.0.1", [], [], PodKernelFields(1337, 1337, ipv6="fd00::1"))
    before = raw_maps(dp)
    ip_index, writes = dp.bpf["local_pod_ip"], []
    write = ip_index.update

    def second_index_write_fails(key, value, flags=0):
        writes.append(key)
        if len(writes) == 2:     # the new IPv6 address's entry
            raise OSError(7, "Argument list too long")
        write(key, value, flags)
    ip_index.update = second_index_write_fails
    with pytest.raises(OSError):
        dp.set_pod(7, "10.0.0.1", [], [], PodKernelFields(1000, 1000, ipv6="fd00::2"))
    assert raw_maps(dp) == before, "the policy (new uid) and the IPv4 entry are put back as they were"


def test_a_failed_second_write_leaves_the_pod_on_iptables_and_nothing_in_the_kernel(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    dp.bpf["local_pod_ip"].fail_writes = 1
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2")})
    agent.reconcile_once()
    st = by_pod(agent)
    failed = [k for k, s in st.items() if not s["accelerated"]]
    assert len(failed) == 1, st
    assert st[failed[0]]["pending"]
    assert st[failed[0]]["reason"] == ("not accelerated yet: writing its datapath entries failed (OSError: "
                                       "[Errno 7] Argument list too long); will retry")
    status_equals_kernel(agent, dp)
    assert agent.audit_once() == dict.fromkeys(("netns_changed", "netns_gone", "missing", "changed", "unknown"), 0)
    agent.clock[0] += core.FIRST_RETRY
    agent.reconcile_once()
    assert all(s["accelerated"] for s in agent.status())
    status_equals_kernel(agent, dp)


def test_a_failed_policy_update_keeps_the_previous_policy_whole(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    before = raw_maps(dp)
    dp.bpf["local_pod_ip"].fail_writes = 1
    agent.update_pods({"ns/a": pod("a", "10.0.0.1", **{"traffic.sidecar.istio.io/excludeOutboundPorts": "9"})})
    agent.reconcile_once()
    st = by_pod(agent)["ns/a"]
    assert st["accelerated"] and st["pending"] and st["reason"].startswith("accelerated with its previous policy")
    assert raw_maps(dp) == before, "the kernel serves exactly the previous policy"
    assert sum(agent.audit_once().values()) == 0


def test_a_new_pods_failed_dns_write_takes_its_policy_out_too(bed, monkeypatch):
    agent, dp, netns, _ = bed
    netns.add("10.0.0.1", 1)

    def broken_dns(cookie, decision):
        raise OSError(7, "Argument list too long")
    monkeypatch.setattr(dp, "set_pod_dns", broken_dns)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    st = by_pod(agent)["ns/a"]
    assert not st["accelerated"] and st["pending"]
    status_equals_kernel(agent, dp)
    assert kernel_view(dp) == ({}, {}, set())


# --- a sandbox recreated with the same IP ----------------------------------------------

def test_a_recreated_sandbox_with_the_same_ip_is_found_again(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    pods = {"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2")}
    agent.update_pods(pods)
    agent.reconcile_once()
    assert kernel_view(dp)[0] == {"10.0.0.1": 1, "10.0.0.2": 2}
    # a's sandbox is recreated: its old namespace is gone, a new one has the same IP
    netns.by_ip.pop("10.0.0.1")
    netns.add("10.0.0.1", 11)
    agent.update_pods(pods)          # the source re-delivers the same objects: nothing changed for it
    agent.reconcile_once()
    found = agent.audit_once()
    assert found["netns_changed"] == 1 and sum(found.values()) == 1
    agent.reconcile_once()
    ips, policies, _ = kernel_view(dp)
    assert ips == {"10.0.0.1": 11, "10.0.0.2": 2}
    assert set(policies) == {11, 2}, "the old namespace's entries are removed"
    assert by_pod(agent)["ns/a"]["accelerated"]
    status_equals_kernel(agent, dp)
    assert metric(metrics, "netns_changed") == 1
    assert sum(agent.audit_once().values()) == 0


def test_a_recreated_sandbox_whose_pod_object_changed_is_found_in_that_pass(bed):
    """The kubelet updates a pod whose sandbox it recreated (new containers):
    that update alone moves the entries, before any audit."""
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    netns.by_ip.clear()
    netns.add("10.0.0.1", 11)
    restarted = pod("a", "10.0.0.1")
    restarted["status"]["containerStatuses"] = [{"name": "app", "restartCount": 1}]
    agent.update_pods({"ns/a": restarted})
    agent.reconcile_once()
    assert kernel_view(dp)[:2] == ({"10.0.0.1": 11}, {11: "10.0.0.1"})
    assert by_pod(agent)["ns/a"]["accelerated"]
    status_equals_kernel(agent, dp)
    assert metric(metrics, "netns_changed") == 1


def test_a_sandbox_gone_and_not_back_yet_leaves_the_pod_pending_on_iptables(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    netns.by_ip.clear()
    assert agent.audit_once()["netns_gone"] == 1
    agent.reconcile_once()
    st = by_pod(agent)["ns/a"]
    assert not st["accelerated"] and st["pending"]
    assert st["reason"].startswith("not accelerated yet: no network namespace has IP 10.0.0.1")
    status_equals_kernel(agent, dp)
    netns.add("10.0.0.1", 12)        # the new sandbox comes up
    agent.clock[0] += core.MAX_RETRY
    agent.reconcile_once()
    assert by_pod(agent)["ns/a"]["accelerated"]
    assert kernel_view(dp)[0] == {"10.0.0.1": 12}
    status_equals_kernel(agent, dp)


def test_a_recreated_sandbox_has_its_installed_rules_read_again():
    """With the installed rules read (the default), the new namespace's own
    rules decide: istio-init ran again there."""
    from test_agent_installed_rules import Reader, pod_object, rules_of
    dp, netns = dict_datapath(), FakeNetns()
    netns.add("10.244.0.5", 1)
    reader = Reader({"/run/netns/1": rules_of(), "/run/netns/21": rules_of()})
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=reader)
    agent.update_pods({"tb/a": pod_object("a", "10.244.0.5")})
    agent.reconcile_once()
    assert by_pod(agent)["tb/a"]["accelerated"] and reader.calls == ["/run/netns/1"]
    netns.by_ip.clear()
    netns.add("10.244.0.5", 21)
    assert agent.audit_once()["netns_changed"] == 1
    agent.reconcile_once()
    assert reader.calls == ["/run/netns/1", "/run/netns/21"]
    assert by_pod(agent)["tb/a"]["accelerated"]
    assert kernel_view(dp)[0] == {"10.244.0.5": 21}
    status_equals_kernel(agent, dp)


# --- the audit ------------------------------------------------------------------------------

def test_the_audit_repairs_and_counts_entries_changed_behind_the_agents_back(bed, caplog):
    agent, dp, netns, metrics = bed
    for i in (1, 2, 3):
        netns.add(f"10.0.0.{i}", i)
    agent.update_pods({f"ns/p{i}": pod(f"p{i}", f"10.0.0.{i}") for i in (1, 2, 3)})
    agent.reconcile_once()
    good = raw_maps(dp)
    dp.bpf["local_pod_ip"].delete(layout.Addr.of("10.0.0.1"))              # missing
    tampered = dp.bpf["pod_policy"].lookup(2)
    tampered.proxy_uid = 0                                                 # changed
    dp.bpf["pod_policy"].update(2, tampered)
    dp.bpf["local_pod_ip"].update(layout.Addr.of("10.0.0.3"), 2)           # changed: points at p2's namespace
    dp.set_pod(99, "10.0.0.99", [], [])                                    # unknown: two entries
    dp.bpf["dns_policy"].update(98, layout.DnsPolicyValue())               # unknown
    with caplog.at_level("WARNING", logger="merbridge_py.agent"):
        found = agent.audit_once()
    assert found == {"netns_changed": 0, "netns_gone": 0, "missing": 1, "changed": 2, "unknown": 3}
    assert raw_maps(dp) == good
    repairs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit: ")]
    assert "audit: pod ns/p1: local_pod_ip 10.0.0.1 missing; writing its entries again" in repairs
    assert "audit: pod ns/p2: pod_policy changed; writing its entries again" in repairs
    assert "audit: pod ns/p3: local_pod_ip 10.0.0.3 changed; writing its entries again" in repairs
    assert "audit: pod_policy 99 belongs to no pod of this agent; deleted" in repairs
    assert "audit: local_pod_ip 10.0.0.99 belongs to no pod of this agent; deleted" in repairs
    assert "audit: dns_policy 98 belongs to no pod of this agent; deleted" in repairs
    assert (metric(metrics, "missing"), metric(metrics, "changed"), metric(metrics, "unknown")) == (1, 2, 3)
    assert "merbridge_audit_last_timestamp_seconds" in generate_latest(metrics.registry).decode()
    assert sum(agent.audit_once().values()) == 0, "a second audit finds nothing left"
    agent.reconcile_once()
    status_equals_kernel(agent, dp)


def test_a_pod_the_audit_cannot_write_again_goes_back_to_iptables(bed):
    agent, dp, netns, _ = bed
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    dp.bpf["local_pod_ip"].delete(layout.Addr.of("10.0.0.1"))
    dp.bpf["local_pod_ip"].fail_writes = 1
    assert agent.audit_once()["missing"] == 1
    assert kernel_view(dp) == ({}, {}, set()), "what could not be written again is taken out"
    agent.reconcile_once()    # the pod is applied afresh: that write succeeds
    assert by_pod(agent)["ns/a"]["accelerated"]
    status_equals_kernel(agent, dp)


def test_the_audit_runs_periodically_in_the_agents_loop(monkeypatch):
    dp, netns, metrics = dict_datapath(), FakeNetns(), AgentMetrics()
    netns.add("10.0.0.1", 1)
    agent = Agent(dp, ISTIO, netns_index=netns, metrics=metrics, rules_reader=None, audit_interval=0.2)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,))
    loop.start()
    try:
        agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
        deadline = time.monotonic() + 30
        while not (agent.status() and agent.status()[0]["accelerated"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dp.bpf["local_pod_ip"].delete(layout.Addr.of("10.0.0.1"))
        while "10.0.0.1" not in kernel_view(dp)[0]:
            assert time.monotonic() < deadline, "the audit never repaired the deleted entry"
            time.sleep(0.05)
        assert metric(metrics, "missing") == 1
    finally:
        stop.set()
        loop.join(10)

"""Issue 13: the reconcile loop is event-driven and isolates failures.
A fake datapath (two dicts, like the kernel's pod_policy and local_pod_ip maps)
and a fake namespace index stand in for the kernel."""

import time

import pytest
from prometheus_client import generate_latest

from helpers.fake_kernel import FakeDatapath, FakeNetns
from merbridge_py.agent import core
from merbridge_py.agent.core import Agent
from merbridge_py.agent.metrics import AgentMetrics
from merbridge_py.mesh import ISTIO


def pod(name, ip, **annotations):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "annotations": annotations},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}],
                     "initContainers": [{"name": "istio-init"}]},
            "status": {"phase": "Running", "podIP": ip}}


@pytest.fixture
def bed():
    dp, netns, metrics = FakeDatapath(), FakeNetns(), AgentMetrics()
    changes = []
    agent = Agent(dp, ISTIO, netns_index=netns, metrics=metrics,
                  on_decision_change=lambda obj, status: changes.append(status), rules_reader=None)
    agent.changes = changes
    return agent, dp, netns, metrics


def by_pod(agent):
    return {s["pod"]: s for s in agent.status()}


def kernel_matches_status(agent, dp):
    """What /status calls accelerated is exactly what the maps hold."""
    accelerated = {s["ip"] for s in agent.status() if s["accelerated"]}
    assert set(dp.local_pod_ip) == accelerated
    assert {v[0] for v in dp.pod_policy.values()} == accelerated


def test_unchanged_pods_are_not_decided_again(bed):
    agent, dp, netns, _ = bed
    netns.add("10.0.0.1", 1)
    pods = {"ns/a": pod("a", "10.0.0.1"), "ns/big": pod("big", "10.0.0.2", **{
        "traffic.sidecar.istio.io/excludeOutboundPorts": ",".join(["8080"] * 50_000)})}
    agent.update_pods(pods)
    agent.reconcile_once()
    assert agent.decisions == 2
    st = by_pod(agent)
    assert st["ns/a"]["accelerated"]
    assert not st["ns/big"]["accelerated"]
    assert st["ns/big"]["reason"].startswith("not accelerated: annotation over the agent's limit "
                                             "traffic.sidecar.istio.io/excludeOutboundPorts: ")
    assert st["ns/big"]["reason"].endswith("(249999 characters, more than the 16384 this agent reads)")
    for _ in range(5):   # the source re-delivers the same objects; passes run
        agent.update_pods({k: dict(v) for k, v in pods.items()})
        agent.reconcile_once()
    assert agent.decisions == 2, "unchanged pods must not be decided again"
    changed = dict(pods, **{"ns/a": pod("a", "10.0.0.1", **{"traffic.sidecar.istio.io/excludeOutboundPorts": "9"})})
    agent.update_pods(changed)
    agent.reconcile_once()
    assert agent.decisions == 3
    assert (9, False) in [(r.port, r.capture) for r in dp.pod_policy[1][1]]
    kernel_matches_status(agent, dp)


def test_resource_version_means_unchanged(bed):
    agent, _, netns, _ = bed
    a = pod("a", "10.0.0.1")
    a["metadata"]["resourceVersion"] = "7"
    agent.update_pods({"ns/a": a})
    agent.reconcile_once()
    again = pod("a", "10.0.0.1")
    again["metadata"]["resourceVersion"] = "7"
    again["metadata"]["labels"] = {"x": "y"}   # same version: the API server's word that nothing changed
    agent.update_pods({"ns/a": again})
    agent.reconcile_once()
    assert agent.decisions == 1


def test_pending_pod_is_retried_with_backoff_not_every_pass(bed, monkeypatch):
    agent, dp, netns, _ = bed
    clock = [1000.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    st = by_pod(agent)["ns/a"]
    assert st["pending"] and not st["accelerated"]
    assert st["reason"] == ("not accelerated yet: no network namespace has IP 10.0.0.1 (will retry; the pod "
                            "stays on iptables meanwhile)")
    assert netns.refreshes == 1
    for _ in range(10):   # passes within the backoff scan nothing
        agent.reconcile_once()
    assert netns.refreshes == 1
    delays = []
    for _ in range(8):
        before = netns.refreshes
        step = 0.0
        while netns.refreshes == before:
            clock[0] += 0.05
            step += 0.05
            agent.reconcile_once()
        delays.append(round(step, 2))
    assert delays[0] == pytest.approx(core.FIRST_RETRY, abs=0.06)
    assert delays[1] == pytest.approx(2 * core.FIRST_RETRY, abs=0.06)
    assert max(delays) == pytest.approx(core.MAX_RETRY, abs=0.06)
    netns.add("10.0.0.1", 5)
    clock[0] += core.MAX_RETRY
    agent.reconcile_once()
    assert by_pod(agent)["ns/a"]["accelerated"]
    assert dp.local_pod_ip == {"10.0.0.1": 5}


def test_one_pods_failure_is_isolated_and_retried(bed, monkeypatch):
    agent, dp, netns, _ = bed
    clock = [1000.0]
    monkeypatch.setattr(core.time, "monotonic", lambda: clock[0])
    for i in range(1, 4):
        netns.add(f"10.0.0.{i}", i)
    dp.fail_ips.add("10.0.0.2")
    agent.update_pods({f"ns/p{i}": pod(f"p{i}", f"10.0.0.{i}") for i in range(1, 4)})
    agent.reconcile_once()
    st = by_pod(agent)
    assert st["ns/p1"]["accelerated"] and st["ns/p3"]["accelerated"]
    assert st["ns/p2"] == {"pod": "ns/p2", "accelerated": False, "ip": "10.0.0.2", "pending": True,
                           "source": "annotations",
                           "reason": "not accelerated yet: writing its datapath entries failed (OSError: "
                                     "[Errno 28] No space left on device); will retry"}
    assert agent.ready.is_set()
    kernel_matches_status(agent, dp)
    dp.fail_ips.clear()
    clock[0] += core.FIRST_RETRY
    agent.reconcile_once()
    assert by_pod(agent)["ns/p2"]["accelerated"]
    kernel_matches_status(agent, dp)


def test_a_failing_namespace_scan_does_not_abort_the_pass(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    netns.fail_with = RuntimeError("pyroute2 said no")
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2"),
                       "ns/plain": {"kind": "Pod", "metadata": {"name": "plain", "namespace": "ns"}, "spec": {}}})
    agent.reconcile_once()
    st = by_pod(agent)
    assert st["ns/a"]["accelerated"], "a pod already in the kernel needs no scan"
    assert st["ns/b"]["reason"] == ("not accelerated yet: scanning network namespaces failed (RuntimeError: "
                                    "pyroute2 said no) (will retry; the pod stays on iptables meanwhile)")
    assert st["ns/plain"]["reason"] == "not accelerated: no istio-proxy sidecar"
    assert b'merbridge_pods_skipped{reason="netns_scan_failed"} 1.0' in generate_latest(metrics.registry)


def test_ready_after_the_first_pass_whatever_the_outcome(bed):
    agent, dp, netns, _ = bed
    netns.fail_with = RuntimeError("boom")
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/x": {"not": "a pod"}})
    agent.reconcile_once()
    assert agent.ready.is_set()
    assert {s["pod"] for s in agent.status()} == {"ns/a", "ns/x"}
    assert by_pod(agent)["ns/x"]["reason"] == "not accelerated: malformed pod object: metadata is missing"


def test_duplicate_ips_refuse_both_and_repair_when_one_goes(bed):
    agent, dp, netns, metrics = bed
    netns.add("10.0.0.1", 1)
    a, b = pod("a", "10.0.0.1"), pod("b", "10.0.0.1")
    agent.update_pods({"ns/a": a})
    agent.reconcile_once()
    assert dp.local_pod_ip == {"10.0.0.1": 1}
    agent.update_pods({"ns/a": a, "ns/b": b})
    agent.reconcile_once()
    st = by_pod(agent)
    assert st["ns/a"]["reason"] == ("not accelerated: pod IP 10.0.0.1 is also the IP of pod ns/b; left to "
                                    "iptables until only one pod has it")
    assert st["ns/b"]["reason"] == ("not accelerated: pod IP 10.0.0.1 is also the IP of pod ns/a; left to "
                                    "iptables until only one pod has it")
    assert dp.local_pod_ip == {} and dp.pod_policy == {}, "neither pod's policy may govern the namespace"
    assert b'merbridge_pods_skipped{reason="duplicate_ip"} 2.0' in generate_latest(metrics.registry)
    assert [s.code for s in agent.changes[-2:]] == ["duplicate_ip", "duplicate_ip"]   # Events
    agent.update_pods({"ns/b": b})   # a goes away: b is the IP's only pod now
    agent.reconcile_once()
    assert by_pod(agent)["ns/b"]["accelerated"]
    assert dp.local_pod_ip == {"10.0.0.1": 1}
    kernel_matches_status(agent, dp)


def test_removing_a_pod_never_deletes_a_live_pods_entry(bed):
    agent, dp, netns, _ = bed
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2")})
    agent.reconcile_once()
    # a's IP moves to b's old one while b takes a new one, in one update
    agent.update_pods({"ns/a": pod("a", "10.0.0.3"), "ns/b": pod("b", "10.0.0.1")})
    netns.by_ip = {}
    netns.add("10.0.0.3", 3)
    netns.add("10.0.0.1", 4)
    agent.reconcile_once()
    kernel_matches_status(agent, dp)
    assert dp.local_pod_ip == {"10.0.0.3": 3, "10.0.0.1": 4}


def test_loop_survives_a_bug_in_a_pass(bed, monkeypatch):
    import threading
    agent, dp, netns, metrics = bed
    calls = []

    def broken():
        calls.append(1)
        raise KeyError("bug")
    monkeypatch.setattr(agent, "reconcile_once", broken)
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,))
    t.start()
    agent.update_pods({})
    time.sleep(0.6)
    agent.update_pods({})
    time.sleep(0.3)
    stop.set()
    t.join(5)
    assert len(calls) >= 2, "the loop must go on after a failed pass"
    assert f"merbridge_reconcile_errors_total {float(len(calls))}".encode() in generate_latest(metrics.registry)


def test_a_failed_policy_update_keeps_status_true_to_the_kernel(bed, monkeypatch):
    agent, dp, netns, _ = bed
    monkeypatch.setattr(core.time, "monotonic", lambda: 1000.0)
    netns.add("10.0.0.1", 1)
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    dp.fail_ips.add("10.0.0.1")
    agent.update_pods({"ns/a": pod("a", "10.0.0.1", **{"traffic.sidecar.istio.io/excludeOutboundPorts": "9"})})
    agent.reconcile_once()
    st = by_pod(agent)["ns/a"]
    assert st["accelerated"] and st["pending"]
    assert st["reason"] == ("accelerated with its previous policy: writing its datapath entries failed (OSError: "
                            "[Errno 28] No space left on device); will retry")
    kernel_matches_status(agent, dp)

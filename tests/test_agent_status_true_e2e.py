"""Issue 18, "status stays true", on the kernel: the agent (a real process)
on one simulated node (tests/helpers/node.py), its pinned maps read from
here, real namespaces and traffic through test sidecars. No iptables rules on
this node: a request reaches a pod's sidecar (port 15001) only if the eBPF
datapath redirected it.

- A pod sandbox restart (the pod's namespace deleted and made again with the
  same IP: a new netns cookie) while the agent runs: afterwards status equals
  the kernel maps, the old cookie's entries are gone, and traffic from the new
  sandbox is redirected.
- A second write that fails (the IP index full: a real E2BIG from the kernel):
  the pod is on iptables in status and in the kernel, and nothing leaks (with
  a leaked policy the connect hook would redirect the pod's traffic while
  status says it is not accelerated: shown by its sidecar seeing nothing).
- Entries changed and removed behind the agent's back: the audit repairs them
  and counts them.
"""

from __future__ import annotations

import errno
import json
import re
import time

import pytest

from merbridge_py import bpf_syscall, layout
from merbridge_py.datapath import layout_version
from merbridge_py.netns import inspect

pytestmark = pytest.mark.bpf

JUNK_PREFIX = "198.18."     # benchmark-range addresses: map keys only, never a destination


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("statustrue"))
    try:
        for name in ("a", "b", "c"):
            pod = n.add_pod(name, meshed=True)
            n.start_app(pod)
            n.start_sidecar(pod)
        yield n
    finally:
        n.close()


def write_pods(node, names):
    items = [node.pods[name].manifest("node1") for name in names]
    tmp = node.pods_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "PodList", "items": items}))
    tmp.replace(node.pods_file)


@pytest.fixture
def agent(node):
    yield node
    if node.agent is not None:
        rc, out = node.stop_agent()
        node.agent_log = out
        assert rc == 0, out


def open_map(node, name):
    key_type, value_type = layout.MAPS[name]
    return bpf_syscall.Map.open(node.bpffs / f"maps-{layout_version()}" / name, key_type, value_type)


def kernel(node):
    """(local_pod_ip: IP -> cookie, pod_policy: cookie -> pod IP), junk addresses left out."""
    ip_index, policies = open_map(node, "local_pod_ip"), open_map(node, "pod_policy")
    try:
        ips = {k.text(): int(v.value) for k, v in ip_index.items() if not k.text().startswith(JUNK_PREFIX)}
        pods = {int(k.value): layout.Addr.of(".".join(str(b) for b in int(v.pod_ip).to_bytes(4, "little"))).text()
                for k, v in policies.items()}
        return ips, pods
    finally:
        ip_index.close()
        policies.close()


def status(node):
    return {p["pod"].split("/")[-1]: p for p in json.loads(node.agent_get("/status"))["pods"]}


def status_equals_kernel(node):
    ips, policies = kernel(node)
    accelerated = {p["ip"] for p in status(node).values() if p["accelerated"]}
    assert set(ips) == accelerated, (ips, status(node))
    assert set(policies.values()) == accelerated, (policies, status(node))
    assert set(ips.values()) == set(policies), "every policy is reached from its IP, and only those"


def cookie_of(pod):
    return inspect(f"/run/netns/{pod.netns}").cookie


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (AssertionError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def metric(node, name, labels=""):
    m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", node.agent_get("/metrics"), re.M)
    return float(m.group(1)) if m else 0.0


def redirected_through_sidecar(node, src, dst) -> bool:
    """One request src -> dst's app; True if src's sidecar carried it (the
    connect hook redirected it), False if it went straight to the app."""
    before = len(node.sidecar_records(node.pods[src]))
    r = node.client(node.pods[src], "ask", node.pods[dst].ip, 8080)
    assert r.returncode == 0, r.stderr
    name, peer = r.stdout.split()[:2]
    assert name == dst
    records = node.sidecar_records(node.pods[src])[before:]
    through = any(rec.startswith(f"15001 {node.pods[dst].ip}:8080 {node.pods[src].ip}:") for rec in records)
    assert through == peer.startswith("127.0.0.6:"), (records, peer)
    return through


def test_a_sandbox_recreated_with_the_same_ip_is_accelerated_again(agent):
    node = agent
    write_pods(node, ["a", "b"])
    node.start_agent("--audit-interval", "1")
    wait_for(lambda: all(status(node)[p]["accelerated"] for p in "ab"), what="a and b accelerated")
    a = node.pods["a"]
    old = cookie_of(a)
    assert kernel(node)[0][a.ip] == old
    assert redirected_through_sidecar(node, "a", "b")

    node.recreate_sandbox(a)          # the pods file does not change: nothing tells the agent
    node.start_app(a)
    node.start_sidecar(a)
    new = cookie_of(a)
    assert new != old

    def moved():
        ips, policies = kernel(node)
        return ips.get(a.ip) == new and old not in policies and status(node)["a"]["accelerated"]
    wait_for(moved, what="a's entries in its new namespace")
    status_equals_kernel(node)
    assert redirected_through_sidecar(node, "a", "b"), "traffic from the new sandbox must be redirected"
    found = (metric(node, "merbridge_audit_differences_total", '{kind="netns_changed"}')
             + metric(node, "merbridge_audit_differences_total", '{kind="netns_gone"}'))
    assert found >= 1
    assert metric(node, "merbridge_audit_last_timestamp_seconds") > time.time() - 60


def test_a_failed_second_write_leaves_status_and_kernel_equal_and_nothing_leaks(agent):
    node = agent
    write_pods(node, ["a", "b"])
    node.start_agent("--audit-interval", "0")     # no audit: the write itself must leave nothing behind
    wait_for(lambda: all(status(node)[p]["accelerated"] for p in "ab"), what="a and b accelerated")
    # Fill the IP index: c's policy (the first write) fits, its IP (the second) gets E2BIG.
    ip_index = open_map(node, "local_pod_ip")
    junk = []
    try:
        for i in range(2 * 1024 + 1):
            key = layout.Addr.of(f"{JUNK_PREFIX}{i // 250}.{i % 250 + 1}")
            try:
                ip_index.update(key, 1)
            except OSError as e:
                assert e.errno == errno.E2BIG, e
                break
            junk.append(key)
        else:
            pytest.fail("the IP index never filled up")
        write_pods(node, ["a", "b", "c"])
        wait_for(lambda: "writing its datapath entries failed" in status(node)["c"]["reason"], what="c's failure")
        st = status(node)["c"]
        assert not st["accelerated"] and st["pending"], st
        assert "Argument list too long" in st["reason"], st
        status_equals_kernel(node)
        assert cookie_of(node.pods["c"]) not in kernel(node)[1], "c's policy leaked"
        assert not redirected_through_sidecar(node, "c", "b"), "the kernel redirects a pod status calls not accelerated"
    finally:
        for key in junk:
            ip_index.delete(key)
        ip_index.close()
    # room again: the retry accelerates c
    wait_for(lambda: status(node)["c"]["accelerated"], what="c accelerated on its retry")
    status_equals_kernel(node)
    assert redirected_through_sidecar(node, "c", "b")


def test_the_audit_repairs_and_counts_entries_changed_behind_the_agents_back(agent):
    node = agent
    write_pods(node, ["a", "b", "c"])
    node.start_agent("--audit-interval", "1")
    wait_for(lambda: all(status(node)[p]["accelerated"] for p in "abc"), what="a, b, c accelerated")
    good_ips, good_policies = kernel(node)
    a, b = node.pods["a"], node.pods["b"]
    policies, ip_index = open_map(node, "pod_policy"), open_map(node, "local_pod_ip")
    try:
        good_a = bytes(policies.lookup(cookie_of(a)))
        ip_index.delete(layout.Addr.of(b.ip))                        # missing
        tampered = policies.lookup(cookie_of(a))
        tampered.n_outbound = 0                                     # changed
        policies.update(cookie_of(a), tampered)
        policies.update(4242, layout.PodPolicyValue())              # unknown
        ip_index.update(layout.Addr.of(f"{JUNK_PREFIX}0.1"), 4242)  # unknown
        wait_for(lambda: metric(node, "merbridge_audit_differences_total", '{kind="unknown"}') >= 2,
                 what="the audit")
        assert kernel(node) == (good_ips, good_policies)
        assert bytes(policies.lookup(cookie_of(a))) == good_a
        assert ip_index.lookup(layout.Addr.of(f"{JUNK_PREFIX}0.1")) is None
    finally:
        policies.close()
        ip_index.close()
    assert metric(node, "merbridge_audit_differences_total", '{kind="missing"}') >= 1
    assert metric(node, "merbridge_audit_differences_total", '{kind="changed"}') >= 1
    status_equals_kernel(node)
    assert redirected_through_sidecar(node, "b", "a")
    rc, out = node.stop_agent()
    assert rc == 0, out
    assert re.search(r"audit: pod \S*b: local_pod_ip \S+ missing; writing its entries again", out), out
    assert re.search(r"audit: pod \S*a: pod_policy changed; writing its entries again", out), out
    assert "audit: pod_policy 4242 belongs to no pod of this agent; deleted" in out
    assert f"audit: local_pod_ip {JUNK_PREFIX}0.1 belongs to no pod of this agent; deleted" in out

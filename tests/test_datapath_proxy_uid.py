"""Issue 11: the proxy's uid/gid is the pod's, not the mesh's compile-time
1337. One simulated node, no iptables rules, two meshed pods whose proxies run
as different uids: a's as 1000720000 (as OpenShift assigns them), b's as 1337.

The connect hook must leave each proxy's own connections alone (they go to
the original destination) and redirect every other process of the pod,
including one that runs as the uid another pod's proxy uses.
"""

import pytest

pytestmark = pytest.mark.bpf

OTHER_UID = 1000720000


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    from helpers.node import SimNode
    n = SimNode(tmp_path_factory.mktemp("uid"))
    try:
        a = n.add_pod("a", meshed=True)
        a.proxy_uid = OTHER_UID
        b = n.add_pod("b", meshed=True)
        for pod in (a, b):
            n.start_app(pod)
            n.start_sidecar(pod)
        n.write_pods_file()
        n.start_agent()
        yield n
    finally:
        n.close()


def ask(node, src, dst, uid=None):
    r = node.client(node.pods[src], "ask", node.pods[dst].ip, 8080, uid=uid, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()   # [pod name, peer the app saw]


def records(node, pod, port):
    return [r for r in node.sidecar_records(node.pods[pod]) if r.startswith(f"{port} ")]


def test_both_pods_are_accelerated(node):
    import json
    status = {p["pod"]: p for p in json.loads(node.agent_get("/status"))["pods"]}
    assert status["default/a"]["accelerated"] and status["default/b"]["accelerated"], status


def test_a_proxy_running_as_another_uid_is_not_sent_back_to_itself(node):
    """The app (root) in a is redirected to a's proxy (uid 1000720000); the
    proxy's upstream connection to b goes out as it is (with the mesh's
    1337 in the kernel it would be redirected to a's own listener, again and
    again), reaches b's inbound listener, and b's app sees 127.0.0.6."""
    before = len(records(node, "a", 15001)), len(records(node, "b", 15006))
    name, peer = ask(node, "a", "b")
    assert name == "b" and peer.startswith("127.0.0.6:"), (name, peer)
    out_a, in_b = records(node, "a", 15001)[before[0]:], records(node, "b", 15006)[before[1]:]
    b_ip = node.pods["b"].ip
    assert len(out_a) == 1 and out_a[0].startswith(f"15001 {b_ip}:8080 "), out_a
    assert len(in_b) == 1 and in_b[0].startswith(f"15006 {b_ip}:8080 "), in_b


def test_processes_running_as_another_pods_proxy_uid_are_redirected(node):
    """uid 1337 is nothing special in pod a, nor is 1000720000 in pod b: each
    pod exempts only its own proxy's ids."""
    for src, dst, uid in (("a", "b", 1337), ("b", "a", OTHER_UID)):
        before = len(records(node, src, 15001))
        name, peer = ask(node, src, dst, uid=uid)
        assert name == dst and peer.startswith("127.0.0.6:"), (src, uid, name, peer)
        assert len(records(node, src, 15001)) == before + 1, (src, uid)


def test_the_proxys_own_uid_goes_direct(node):
    """A process of pod a running as a's proxy uid is the proxy to Istio's
    rules: not redirected (b's inbound listener still takes it, by the
    same-node rewrite, and b's app sees 127.0.0.6)."""
    before = len(records(node, "a", 15001))
    name, _ = ask(node, "a", "b", uid=OTHER_UID)
    assert name == "b"
    assert len(records(node, "a", 15001)) == before, "a's proxy uid was redirected to its own listener"

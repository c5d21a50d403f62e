"""User-namespaced pods (issue 20, `hostUsers: false`): Istio's owner match
reads the proxy uid in the pod's user namespace, the kernel's
bpf_get_current_uid_gid() in the initial one. policy/userns.py translates
(pure: map text + verdict -> verdict); the agent gives the kernel the host's
ids or keeps the pod on iptables with the reason. The reader
(merbridge_py/userns.py) is checked against a real user namespace."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time

import pytest

from helpers.fake_kernel import FakeDatapath, FakeNetns
from merbridge_py.agent.core import Agent
from merbridge_py.mesh import ISTIO
from merbridge_py.policy import decide
from merbridge_py.policy import userns as pu
from merbridge_py.policy.rules import kernel_fields
from merbridge_py.testbed import userns_pod
from merbridge_py.userns import UsernsReadError, read_maps

POD_MAP = "         0     100000      65536\n"     # as the kernel prints it (Kubernetes' hostUsers: false)
MAPS = pu.UsernsMaps(POD_MAP, POD_MAP, "user namespace 4026532999, maps of pid 42")


def pod(name="a", ip="10.0.0.1", uid=None, dns=False):
    proxy = {"name": "istio-proxy"}
    if uid is not None:
        proxy["securityContext"] = {"runAsUser": uid, "runAsGroup": uid}
    if dns:
        proxy["env"] = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "annotations": {}},
            "spec": {"containers": [{"name": "app"}, proxy], "initContainers": [{"name": "istio-cni-x"},
                                                                                 {"name": "istio-validation"}],
                     "hostUsers": False},
            "status": {"phase": "Running", "podIP": ip}}


# --- parsing and translation (pure) -----------------------------------------------

def test_parse_and_translate_one_range():
    ranges = pu.parse_id_map(POD_MAP)
    assert ranges == (pu.IdRange(0, 100000, 65536),)
    assert pu.to_host(1337, ranges) == 101337
    assert pu.to_host(0, ranges) == 100000
    assert pu.to_host(65535, ranges) == 165535
    assert pu.to_host(65536, ranges) is None


def test_several_ranges_each_map_their_own_ids():
    ranges = pu.parse_id_map("0 100000 1000\n1337 200000 1\n2000 300000 10\n")
    assert pu.to_host(999, ranges) == 100999
    assert pu.to_host(1000, ranges) is None          # the gap
    assert pu.to_host(1337, ranges) == 200000
    assert pu.to_host(2009, ranges) == 300009
    assert pu.to_host(2010, ranges) is None


def test_the_initial_namespace_map_is_the_identity():
    ranges = pu.parse_id_map("         0          0 4294967295\n")
    assert pu.to_host(1337, ranges) == 1337


@pytest.mark.parametrize("text, words", [
    ("0 100000\n", "expected 'inside outside count'"),
    ("0 100000 65536 7\n", "expected 'inside outside count'"),
    ("0 x 65536\n", "not three decimal integers"),
    ("0 100000 0\n", "range outside"),
    ("-1 100000 10\n", "range outside"),
    ("0 4294967290 10\n", "range outside"),
    ("0 100000 100\n50 300000 10\n", "inside ranges overlap at 50"),
    ("0 100000 100\n200 100050 10\n", "outside ranges overlap at 100050"),
    ("".join(f"{i} {100000 + i} 1\n" for i in range(341)), "341 ranges"),
])
def test_malformed_maps_are_refused_with_where(text, words):
    with pytest.raises(pu.IdMapError, match=words.replace("(", r"\(")):
        pu.parse_id_map(text)


def test_an_accelerated_verdict_gets_the_host_ids():
    v = pu.in_user_namespace(decide(pod(dns=True)), MAPS)
    assert v.accelerate
    assert (v.policy.proxy_uid, v.policy.proxy_gid) == (101337, 101337)
    assert (v.dns.proxy_uid, v.dns.proxy_gid) == (101337, 101337)
    assert (kernel_fields(v, ISTIO).proxy_uid, kernel_fields(v, ISTIO).proxy_gid) == (101337, 101337)
    assert "proxy uid 1337 and gid 1337 are 101337 and 101337 on the host" in v.reason


def test_a_pod_in_the_hosts_namespace_is_unchanged():
    v = decide(pod())
    assert pu.in_user_namespace(v, None) is v
    identity = pu.UsernsMaps("0 0 4294967295\n", "0 0 4294967295\n", "x")
    assert pu.in_user_namespace(v, identity) is v


def test_an_unmapped_proxy_uid_refuses_the_pod():
    v = pu.in_user_namespace(decide(pod(uid=70000)), MAPS)
    assert not v.accelerate and v.code == "userns_unmapped"
    assert "does not map the proxy's uid 70000 (its uid_map: 0-65535 -> 100000-165535) or gid 70000" in v.reason
    assert v.reason.endswith("the pod stays on iptables")
    assert all(not f.accelerated for f in v.families)


def test_malformed_maps_refuse_the_pod():
    v = pu.in_user_namespace(decide(pod()), pu.UsernsMaps("0 100000\n", POD_MAP, "pid 42"))
    assert not v.accelerate and v.code == "userns_malformed"
    assert "uid_map line 1" in v.reason


def test_maps_not_written_yet_are_a_retry():
    with pytest.raises(pu.UsernsNotReady, match="no uid/gid map written yet"):
        pu.in_user_namespace(decide(pod()), pu.UsernsMaps("", "", "pid 42"))


def test_a_refused_verdict_is_left_alone():
    v = dataclasses.replace(decide(pod()), accelerate=False, reason="not accelerated: x", code="x")
    assert pu.in_user_namespace(v, pu.UsernsMaps("", "", "pid 42")) is v


# --- the agent: the kernel gets what the namespace maps ---------------------------------

@pytest.fixture
def node():
    dp, netns = FakeDatapath(), FakeNetns()
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=lambda path: None)   # rules unread: the spec decides
    return agent, dp, netns


def status(agent):
    return {s["pod"]: s for s in agent.status()}


def test_agent_writes_the_host_ids_of_a_user_namespaced_pod(node):
    agent, dp, netns = node
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    netns.userns[1] = MAPS           # pod a: hostUsers false; pod b: the host's user namespace
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2")})
    agent.reconcile_once()
    st = status(agent)
    assert st["ns/a"]["accelerated"] and st["ns/b"]["accelerated"], st
    assert "101337" in st["ns/a"]["reason"]
    assert (dp.pod_fields[1].proxy_uid, dp.pod_fields[1].proxy_gid) == (101337, 101337)
    assert (dp.pod_fields[2].proxy_uid, dp.pod_fields[2].proxy_gid) == (1337, 1337)


def test_agent_refuses_a_pod_whose_proxy_uid_is_unmapped(node):
    agent, dp, netns = node
    netns.add("10.0.0.1", 1)
    netns.userns[1] = pu.UsernsMaps("0 100000 1000\n", POD_MAP, "pid 42")
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["ns/a"]
    assert not st["accelerated"] and not st["pending"]
    assert "does not map the proxy's uid 1337" in st["reason"]
    assert dp.pod_policy == {}


def test_agent_retries_a_pod_whose_maps_cannot_be_read(node, monkeypatch):
    agent, dp, netns = node
    netns.add("10.0.0.1", 1)
    netns.userns[1] = UsernsReadError("no process of the pod lives in its user namespace 7")
    agent.update_pods({"ns/a": pod("a", "10.0.0.1")})
    agent.reconcile_once()
    st = status(agent)["ns/a"]
    assert not st["accelerated"] and st["pending"]
    assert "no process of the pod lives in its user namespace 7" in st["reason"]
    assert dp.pod_policy == {}
    netns.userns[1] = MAPS                # the pause process is there now
    monkeypatch.setattr(time, "monotonic", lambda real=time.monotonic: real() + 60)
    agent.reconcile_once()
    assert status(agent)["ns/a"]["accelerated"]
    assert (dp.pod_fields[1].proxy_uid, dp.pod_fields[1].proxy_gid) == (101337, 101337)


# --- the reader, on a real user namespace (root) ----------------------------------------

@pytest.fixture
def user_namespaced_process():
    if os.geteuid() != 0:
        # the agent tests above cover the logic; CI (root) must run this one
        skip_or_fail = pytest.fail if os.environ.get("MERBRIDGE_REQUIRE_BPF") == "1" else pytest.skip
        skip_or_fail("needs root to map uids 100000-165535")
    proc = userns_pod.start_holder()
    try:
        deadline = time.monotonic() + 10
        while not os.readlink(f"/proc/{proc.pid}/exe").endswith("sleep"):   # exec'd: setresuid done
            assert time.monotonic() < deadline, "the holder did not reach its pause"
            time.sleep(0.02)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_reader_reads_the_owner_of_the_network_namespace(user_namespaced_process):
    pid = user_namespaced_process
    maps = read_maps(f"/proc/{pid}/ns/net", [os.getpid(), pid])     # our own process is skipped: other userns
    assert pu.parse_id_map(maps.uid_map) == (pu.IdRange(0, 100000, 65536),)
    assert pu.parse_id_map(maps.gid_map) == (pu.IdRange(0, 100000, 65536),)
    assert f"pid {pid}" in maps.origin


def test_reader_needs_a_process_in_the_pods_user_namespace(user_namespaced_process):
    with pytest.raises(UsernsReadError, match="no process of the pod lives in its user namespace"):
        read_maps(f"/proc/{user_namespaced_process}/ns/net", [os.getpid()])


def test_reader_says_none_for_the_hosts_user_namespace():
    assert read_maps("/proc/self/ns/net", []) is None


def test_inspect_pod_shows_the_host_ids_from_the_pods_namespace(user_namespaced_process, tmp_path):
    """inspect-pod --netns decides as the agent does: the rules Istio wrote from
    inside the pod's user namespace, and the proxy ids as the host sees them."""
    import json
    import sys

    from click.testing import CliRunner

    from merbridge_py import sandbox
    from merbridge_py.cli import main
    from merbridge_py.testbed import istio_iptables as ii

    netns = f"/proc/{user_namespaced_process}/ns/net"
    written = subprocess.run([sys.executable, "-c", sandbox._ENTER_USERNS, netns, "iptables-restore", "--noflush"],
                             input=ii.restore_payload(ii.flags_from_annotations({})), text=True, capture_output=True)
    assert written.returncode == 0, written.stderr      # as istio-init: from inside the pod's user namespace
    from merbridge_py.testbed import kube
    from merbridge_py.testbed.topology import Node, Pod
    node = Node("node0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/x", "/y")
    bed_pod = Pod("a", "node0", "10.244.0.10", "mbp-a", True, "/x", {}, [8080], "veth0", "10.96.0.5",
                  host_users=False)
    obj = kube.pod_object("tb", bed_pod, node, created="2026-01-01T00:00:00Z")   # istio-init, hostUsers: false
    assert obj["spec"]["hostUsers"] is False
    (tmp_path / "pod.json").write_text(json.dumps(obj))
    result = CliRunner().invoke(main, ["inspect-pod", str(tmp_path / "pod.json"), "--netns", netns])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["accelerate"], verdict["reason"]
    assert (verdict["policy"]["proxy_uid"], verdict["policy"]["proxy_gid"]) == (101337, 101337)
    assert verdict["policy"]["source"] == "iptables rules"
    assert "are 101337 and 101337 on the host" in verdict["reason"]


def test_without_reading_rules_a_user_namespaced_pod_stays_on_iptables():
    """The hidden --installed-rules ignore (test nodes) does not translate: such a pod is refused."""
    dp, netns = FakeDatapath(), FakeNetns()
    agent = Agent(dp, ISTIO, netns_index=netns, rules_reader=None)
    netns.add("10.0.0.1", 1)
    netns.add("10.0.0.2", 2)
    netns.userns[1] = MAPS
    agent.update_pods({"ns/a": pod("a", "10.0.0.1"), "ns/b": pod("b", "10.0.0.2")})
    agent.reconcile_once()
    st = status(agent)
    assert not st["ns/a"]["accelerated"] and "belongs to a user namespace" in st["ns/a"]["reason"]
    assert st["ns/b"]["accelerated"]
    assert set(dp.local_pod_ip) == {"10.0.0.2"}


@pytest.mark.bpf   # root: makes a network namespace
def test_a_pod_whose_first_process_exited_is_still_read_through_another_one():
    """The namespace's path from a scan can name a process that has exited since; an ordinary pod must not
    be refused (and dropped to iptables) for it while another process still holds the namespace."""
    from merbridge_py.netns import Netns, NetnsIndex
    first = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    second = None
    try:
        for _ in range(100):
            if os.stat(f"/proc/{first.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
                break
            time.sleep(0.05)
        inode = os.stat(f"/proc/{first.pid}/ns/net").st_ino
        second = subprocess.Popen(["nsenter", f"--net=/proc/{first.pid}/ns/net", "sleep", "60"])
        index = NetnsIndex(bind_dirs=())
        for _ in range(100):
            index.refresh()
            if second.pid in index._pids.get(inode, []):
                break
            time.sleep(0.05)
        stale = Netns(inode=inode, path=f"/proc/{first.pid}/ns/net", cookie=0)
        first.kill()
        first.wait()
        assert index.user_namespace_maps(stale) is None     # the host's user namespace owns it: ids as written
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

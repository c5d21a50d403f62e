"""The test bed's life cycle: nothing left behind (also when a test fails
inside it), two beds side by side, mode switches, settle(), and the
`merbridge-py testbed` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from merbridge_py import sandbox
from merbridge_py.testbed import Testbed, state, topology
from merbridge_py.testbed.cleanup import all_names, leftovers, teardown
from merbridge_py.testbed.envoy import EnvoySidecar
from merbridge_py.testbed.testbed import TestbedError
from merbridge_py.testbed.topology import PodSpec

pytestmark = pytest.mark.bpf


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}{uuid.uuid4().hex[:4]}"


def assert_gone(name: str, pids: list[int]) -> None:
    assert leftovers(name) == []
    assert not [ns for ns in sandbox.netns_list() if ns.startswith(topology.prefix(name))]
    assert not topology.cgroup_dir(name).exists()
    assert not list(Path("/sys/fs/bpf").glob(f"{topology.prefix(name)}*"))
    assert not state.state_file(name).exists() and not state.workdir(name).exists()
    alive = [pid for pid in pids if state.start_ticks(pid) is not None]
    assert alive == [], f"processes of the test bed still running: {alive}"


def test_a_failure_inside_the_bed_leaves_nothing_behind():
    name = unique("f")
    with pytest.raises(RuntimeError, match="boom"):
        with Testbed.up(name, nodes=2, pods_per_node=1, mode="ebpf") as tb:
            pids = [r.pid for r in tb.processes]
            assert {r.role for r in tb.processes} == {"app", "sidecar", "agent", "dns-server"}
            assert list(Path("/sys/fs/bpf").glob(f"{topology.prefix(name)}node*"))   # the agents' pins
            raise RuntimeError("boom")
    assert_gone(name, pids)


def test_a_failed_up_says_why_and_removes_what_it_made(monkeypatch):
    name = unique("g")
    monkeypatch.setattr(EnvoySidecar, "config", lambda self: {"no_such_field": 1})
    with pytest.raises(TestbedError, match="(?s)sidecar of n0p.* exited during start-up.*no_such_field"):
        Testbed.up(name, nodes=1, pods_per_node=2, mode="iptables")
    assert_gone(name, [])


def test_down_finds_a_bed_whose_state_file_is_gone():
    """`down` works from names alone: processes are found through the bed's
    cgroups, and `down --all` recognises the bed by its resources' names."""
    name = unique("l")
    tb = Testbed.up(name, nodes=1, pods_per_node=2, mode="iptables")
    pids = [r.pid for r in tb.processes]
    try:
        state.state_file(name).unlink()
        assert name in all_names()
        teardown(name)
        assert_gone(name, pids)
        assert name not in all_names()
    finally:
        tb.down()


def test_two_beds_side_by_side():
    one, two = unique("x"), unique("y")
    with Testbed.up(one, nodes=1, pods=[PodSpec("p"), PodSpec("q")], mode="iptables") as a:
        with pytest.raises(TestbedError, match="already exists"):
            Testbed.up(one, nodes=1, pods_per_node=1)
        with Testbed.up(two, nodes=1, pods=[PodSpec("p"), PodSpec("q")], mode="iptables") as b:
            assert a.pod("p").ip != b.pod("p").ip      # pod IPs never repeat across beds
            assert a.request("p", "q")[1]["pod"] == b.request("p", "q")[1]["pod"] == "q"
            assert a.sidecar_connections("q")["inbound"] == b.sidecar_connections("q")["inbound"] == 1
            b_pids = [r.pid for r in b.processes]
        assert_gone(two, b_pids)
        status, body = a.request("p", "q")        # the first bed is untouched
        assert status == 200 and body["peer"].startswith("127.0.0.6:")


def test_mode_switches_and_settle():
    name = unique("m")
    with Testbed.up(name, nodes=1, pods_per_node=2, mode="nomesh") as tb:
        src, dst = tb.pods
        assert tb.request(src, dst)[1]["peer"].startswith(f"{src.ip}:")
        assert not [r for r in tb.processes if r.role == "sidecar"]

        tb.set_mode("iptables", settle=False)
        assert tb.request(src, dst)[1]["peer"].startswith("127.0.0.6:")
        results = tb.requests(src, dst, count=10, new_connection=True)
        assert all(r["status"] == 200 for r in results)
        # connection churn through the REDIRECT leaves TIME_WAIT sockets and conntrack entries
        assert tb.exec_in(src, ["ss", "-H", "-t", "state", "time-wait"]).stdout.strip()
        assert tb.exec_in(src, ["conntrack", "-L"]).stdout.strip()
        tb.settle()
        for pod in tb.pods:
            assert tb.exec_in(pod, ["ss", "-H", "-t", "state", "time-wait"]).stdout.strip() == ""
            # no connection of the test is tracked any more
            assert "dport=8080" not in tb.exec_in(pod, ["conntrack", "-L"]).stdout

        tb.set_mode("nomesh")
        assert tb.request(src, dst)[1]["peer"].startswith(f"{src.ip}:")
        assert not [r for r in tb.processes if r.role == "sidecar"]
        assert "ISTIO" not in tb.exec_in(src, ["iptables-save", "-t", "nat"]).stdout
        assert tb.nat_counters(src) == {"ISTIO_REDIRECT": 0, "ISTIO_IN_REDIRECT": 0}


def merbridge_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merbridge_py.cli", "testbed", *args],
                          capture_output=True, text=True, timeout=120)


def test_command_line():
    name = unique("c")
    try:
        up = merbridge_py("up", "--name", name, "--nodes", "2", "--pods-per-node", "2", "--plain-per-node", "1",
                          "--mode", "iptables")
        assert up.returncode == 0, up.stderr
        doc = json.loads(up.stdout)
        assert doc["name"] == name and doc["mode"] == "iptables"
        assert [(p["name"], p["node"], p["meshed"]) for p in doc["pods"]] == [
            ("n0p0", "node0", True), ("n0p1", "node0", False), ("n1p0", "node1", True), ("n1p1", "node1", False)]
        # `testbed exec` runs in the pod; the processes outlived the command that started them
        pod = doc["pods"][0]
        shown = merbridge_py("exec", "--name", name, "n0p0", "--", "ip", "addr", "show", "eth0")
        assert shown.returncode == 0 and shown.stdout.count(pod["ip"]) == 1
        other = doc["pods"][2]["ip"]
        out = merbridge_py("exec", "--name", name, "n0p0", "--", sys.executable, "-m", "merbridge_py.testbed.client",
                           "--host", other, "--port", "8080")
        assert json.loads(out.stdout)["results"][0]["body"]["pod"] == "n1p0"
        failed = merbridge_py("exec", "--name", name, "n0p0", "--", "sh", "-c", "exit 3")
        assert failed.returncode == 3                  # the command's own exit status
        unknown = merbridge_py("exec", "--name", name, "nosuchpod", "--", "true")
        assert unknown.returncode != 0 and "no pod 'nosuchpod'" in unknown.stderr

        status = json.loads(merbridge_py("status", "--name", name).stdout)
        assert status["mode"] == "iptables"
        assert all(p["app"] for p in status["pods"])
        assert [p["sidecar"] for p in status["pods"]] == [True, None, True, None]
        listed = json.loads(merbridge_py("status").stdout)
        assert {"name": name, "mode": "iptables", "status": "up"} in listed

        switched = merbridge_py("mode", "--name", name, "nomesh")
        assert switched.returncode == 0, switched.stderr
        assert json.loads(merbridge_py("status", "--name", name).stdout)["mode"] == "nomesh"
        pids = [r.pid for r in Testbed.attach(name).processes]

        again = merbridge_py("up", "--name", name)
        assert again.returncode != 0 and "already exists" in again.stderr
        bad = merbridge_py("up", "--name", "Bad-Name")
        assert bad.returncode != 0 and "test bed name" in bad.stderr

        down = merbridge_py("down", "--name", name)
        assert down.returncode == 0 and json.loads(down.stdout) == {"removed": [name]}
        assert_gone(name, pids)
        assert merbridge_py("status", "--name", name).returncode != 0
    finally:
        merbridge_py("down", "--name", name)


def test_exec_runs_inside_the_pods_cgroup():
    """`testbed exec` is where a pod's container runs: in the pod's network
    namespace AND its cgroup, so in ebpf mode its connection is redirected in
    the kernel and Istio's ISTIO_REDIRECT rule stays flat. `ip netns exec`
    alone runs outside the cgroup: the same request silently takes iptables."""
    name = unique("x")
    with Testbed.up(name, nodes=1, pods=[PodSpec("p"), PodSpec("q")], mode="ebpf", mtls="strict") as tb:
        p, q = tb.pod("p"), tb.pod("q")
        client = [sys.executable, "-m", "merbridge_py.testbed.client", "--host", q.ip, "--port", "8080"]
        own = merbridge_py("exec", "--name", name, "p", "--", "cat", "/proc/self/cgroup")
        assert own.stdout.strip().endswith(f"/mbp-{name}/node0/p")
        before = tb.nat_counters(p)["ISTIO_REDIRECT"]
        out = merbridge_py("exec", "--name", name, "p", "--", *client)
        assert json.loads(out.stdout)["results"][0]["body"]["peer"].startswith("127.0.0.6:")
        assert tb.nat_counters(p)["ISTIO_REDIRECT"] == before
        out = sandbox.sh("ip", "netns", "exec", p.netns, *client)
        assert json.loads(out)["results"][0]["body"]["peer"].startswith("127.0.0.6:")
        assert tb.nat_counters(p)["ISTIO_REDIRECT"] == before + 1

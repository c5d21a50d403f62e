"""Issue 12: an upgrade is not an uninstall. On the test bed, each node
agent reads its own DaemonSet from the fake API server (the test bed's
agents take pods from a file; MERBRIDGE_KUBECONFIG gives them the API for
this one read, as the DaemonSet's service account does in a cluster).

- Rolling upgrade under load: the old agent gets SIGTERM while the
  DaemonSet exists, no agent runs for GAP seconds, then a new one starts.
  Programs stay attached and pins stay through the gap, the new agent
  adopts them; no request fails, no connection breaks, and keep-alive
  connections opened before the upgrade serve after it.
- Uninstall under load: the DaemonSet is deleted, then SIGTERM. No request
  fails (new connections fall back to Istio's iptables rules), no program
  of ours is attached to the node's cgroup, and no pin is left.
- API unreachable at SIGTERM: keep; `merbridge-py cleanup` then removes
  everything, and says so; a second run finds nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fake_apiserver import FakeApiServer
from merbridge_py import datapath, rbac
from merbridge_py.testbed import PodSpec, Testbed, state
from merbridge_py.testbed.cleanup import leftovers
from merbridge_py.testbed.load import LoadProcess
from test_agent_kube import kubeconfig_text
from test_agent_restart import istio_redirects, one_program_per_hook, pinned_objects, wait_gone

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

NAMESPACE = "mbp-system"
DAEMONSETS = "daemonsets.apps"
RUN = 3.0     # seconds of load before and after each event
GAP = 3.0     # seconds with no agent during the upgrade
DS_PATH = f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/{rbac.AGENT_DAEMONSET}"


def daemonset() -> dict:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": rbac.AGENT_DAEMONSET, "namespace": NAMESPACE}}


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The fake API server with the agents' DaemonSet; agents started by the
    bed from here on read it (the environment is theirs too)."""
    with FakeApiServer() as server:
        server.add(DAEMONSETS, daemonset())
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(kubeconfig_text(server.url))
        monkeypatch.setenv("MERBRIDGE_KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
        monkeypatch.delenv("MERBRIDGE_ON_SIGTERM", raising=False)
        yield server


def wait_daemonset_read(api: FakeApiServer, count: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while sum(r.path == DS_PATH for r in api.requests) < count:
        assert time.monotonic() < deadline, "the agent never read its DaemonSet"
        time.sleep(0.05)


def sigterm_agent(tb: Testbed, node) -> None:
    """SIGTERM the node's agent (by pid, the bed's own child), as the kubelet
    does, and wait until it has exited."""
    agent = next(r for r in tb.processes if r.role == "agent" and r.owner == tb.node(node).name)
    assert state.signal_if_ours(agent, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while agent.alive():
        assert time.monotonic() < deadline, "the agent did not exit within the 30 s grace period"
        time.sleep(0.02)


def agent_log(tb: Testbed, node) -> str:
    return (tb.workdir / f"{tb.node(node).name}.agent.log").read_text()


def network_port_refuses_admin_calls(addr: str) -> list[tuple[str, int]]:
    """(call, status) for GET /status and POST /mode on the agent's network port."""
    seen = []
    for method, path, data in (("GET", "/status", None), ("POST", "/mode", b'{"mode": "iptables"}')):
        req = urllib.request.Request(f"http://{addr}{path}", data=data, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=5) as r:
                seen.append((f"{method} {path}", r.status))
        except urllib.error.HTTPError as e:
            seen.append((f"{method} {path}", e.code))
    return seen


def totals(results: dict) -> tuple[int, int, int, list]:
    requests = sum(r["requests"] for r in results.values())
    failed = sum(r["failed"] for r in results.values())
    connections = sum(r["connections"] for r in results.values())
    broken = [c for r in results.values() for c in r["keepalive_connections"] if c["broken"]]
    return requests, failed, connections, broken


def start_load(tb: Testbed, budget: float) -> dict[str, LoadProcess]:
    b = f"{tb.pod('b').ip}:8080"
    loads = {"pinned": LoadProcess(tb, "a", {"b": b}, duration=budget, keepalive=2, newconn=2),
             "rotating": LoadProcess(tb, "c", {"b": b}, duration=budget, keepalive=2, newconn=2, rotate=2.0)}
    for load in loads.values():
        load.wait_ready()
    return loads


def test_rolling_upgrade_under_load_keeps_the_datapath_and_every_connection(api):
    name = f"upg{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b"), PodSpec("c")], mode="ebpf") as tb:
        node = tb.node("node0")
        cgroup, bpffs = Path(node.cgroup), Path(node.bpffs)
        wait_daemonset_read(api)
        # From another process: the network port neither lists pods nor switches the mode.
        assert network_port_refuses_admin_calls(tb.agents[node.name]) == [("GET /status", 404),
                                                                           ("POST /mode", 404)]
        assert tb.agent_metrics(node)['merbridge_mode{mode="ebpf"}'] == 1
        programs, pins = one_program_per_hook(cgroup), pinned_objects(bpffs)

        loads = start_load(tb, budget=2 * RUN + GAP + 60)
        try:
            nat_start = istio_redirects(tb)
            time.sleep(RUN)
            stopped = time.monotonic()
            sigterm_agent(tb, node)
            # No agent: everything still attached and pinned, traffic still bypasses Istio's rules.
            assert one_program_per_hook(cgroup) == programs
            assert pinned_objects(bpffs) == pins
            time.sleep(GAP)
            assert one_program_per_hook(cgroup) == programs
            assert istio_redirects(tb) == nat_start
            tb.restart_agent(node)
            ready = time.monotonic()
            new_programs = one_program_per_hook(cgroup)
            assert set(new_programs.values()).isdisjoint(programs.values())
            assert sorted(i for i in pinned_objects(bpffs).values() if i) == sorted(new_programs.values())
            still_loaded = wait_gone(set(programs.values()))
            time.sleep(RUN)
            nat_end = istio_redirects(tb)
            assert tb.agent_metrics(node)['merbridge_redirects_total{direction="outbound"}'] > 0
        finally:
            for load in loads.values():
                load.stop()
        results = {kind: load.result() for kind, load in loads.items()}
        log = agent_log(tb, node)

    requests, failed, connections, broken = totals(results)
    print(f"\nupgrade: {requests} requests ({connections} connections), {failed} failed, {len(broken)} broken "
          f"keep-alive connections; no agent for {ready - stopped:.1f} s")
    assert "keeping programs attached and maps pinned for a successor" in log
    assert "present: a restart or update" in log
    assert failed == 0, [f for r in results.values() for f in r["failures"]]
    assert broken == []
    pinned = results["pinned"]["keepalive_connections"]
    assert len(pinned) == 2 and all(c["opened"] < stopped and c["closed"] > ready for c in pinned)
    assert nat_end == nat_start, "new connections fell back to Istio's iptables rules"
    assert still_loaded == set(), "the old agent's programs are still loaded"
    assert leftovers(name) == [] and not bpffs.exists()


def test_uninstall_under_load_detaches_everything_and_loses_no_request(api):
    name = f"uni{os.getpid()}"
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b"), PodSpec("c")], mode="ebpf") as tb:
        node = tb.node("node0")
        cgroup, bpffs = Path(node.cgroup), Path(node.bpffs)
        wait_daemonset_read(api)
        programs = one_program_per_hook(cgroup)
        loads = start_load(tb, budget=2 * RUN + 60)
        try:
            time.sleep(RUN)
            nat_before = istio_redirects(tb)
            api.delete(DAEMONSETS, NAMESPACE, rbac.AGENT_DAEMONSET)
            stopped = time.monotonic()
            sigterm_agent(tb, node)
            detached_in = time.monotonic() - stopped
            attached = datapath.attached_program_ids(cgroup)
            pins_left = bpffs.exists()
            time.sleep(RUN)
            nat_after = istio_redirects(tb)
        finally:
            for load in loads.values():
                load.stop()
        results = {kind: load.result() for kind, load in loads.items()}
        log = agent_log(tb, node)

    requests, failed, connections, broken = totals(results)
    print(f"\nuninstall: {requests} requests ({connections} connections), {failed} failed, {len(broken)} broken "
          f"keep-alive connections; agent gone {detached_in:.1f} s after SIGTERM")
    assert f"DaemonSet {NAMESPACE}/{rbac.AGENT_DAEMONSET} is gone" in log
    assert "nothing left attached or pinned" in log
    assert attached == {hook: [] for hook in attached}, "a program is still attached to the node's cgroup"
    assert not pins_left
    assert wait_gone(set(programs.values())) == set()
    assert failed == 0, [f for r in results.values() for f in r["failures"]]
    assert nat_after > nat_before, "new connections did not fall back to Istio's iptables rules"


def test_unreachable_api_keeps_and_cleanup_removes_it(api):
    name = f"unr{os.getpid()}"
    cleanup = [sys.executable, "-m", "merbridge_py.cli", "cleanup"]
    with Testbed.up(name, nodes=1, pods=[PodSpec("a"), PodSpec("b")], mode="ebpf") as tb:
        node = tb.node("node0")
        cgroup, bpffs = Path(node.cgroup), Path(node.bpffs)
        cleanup += ["--bpffs", str(bpffs), "--cgroup", str(cgroup), "--admin-socket", str(tb.admin_socket(node))]
        wait_daemonset_read(api)
        programs = one_program_per_hook(cgroup)
        refused = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "an agent is running" in refused.stderr
        api.stop()
        sigterm_agent(tb, node)
        assert "API unreachable" in agent_log(tb, node)
        assert one_program_per_hook(cgroup) == programs
        pins = pinned_objects(bpffs)
        assert pins

        first = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
        second = subprocess.run(cleanup, capture_output=True, text=True, timeout=60)
        attached = datapath.attached_program_ids(cgroup)
        errors = [r["error"] for r in tb.requests("a", "b", count=5, new_connection=True) if r["error"]]
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert sum(line.startswith("detached ") for line in lines) == len(programs), first.stdout
    assert {line.split()[-1] for line in lines if line.startswith("removed pin ")} == {
        str(bpffs / p) for p in pins}
    assert attached == {hook: [] for hook in attached}
    assert not bpffs.exists() and wait_gone(set(programs.values())) == set()
    assert second.returncode == 0 and second.stdout.strip() == f"nothing of merbridge-py under {bpffs}"
    assert errors == []

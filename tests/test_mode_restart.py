"""Issue 18: a switch back to iptables survives the agent. On a simulated
node whose agent watches the fake API server (as in a cluster), the node is
switched to iptables cluster-wide (the ConfigMap) or for itself alone
(`toggle iptables --node`), its agent is SIGKILLed (a crash, an OOM kill)
and started again with the API server unreachable, forbidden (403),
reachable, or slow to answer about the ConfigMap; or it is handed over to a
new agent as in a rolling upgrade (SIGTERM while the DaemonSet exists: the
old agent keeps its programs for the new one). Throughout, from before the
kill until the new agent has read the ConfigMap, no redirecting program
(connect4/6, DNS sendmsg4/6) may be attached to the node's cgroup: the
kernel is asked every few milliseconds (BPF_PROG_QUERY) and at each step by
`bpftool cgroup show`. The new agent must never switch mode on its way up
(it attaches in iptables mode, instead of attaching in ebpf mode and
switching once the ConfigMap arrives).

Also: the record on a real bpffs, and `merbridge-py cleanup` removing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from fake_apiserver import FakeApiServer
from merbridge_py import datapath, rbac
from merbridge_py.agent.status import agent_request
from merbridge_py.cli import main
from test_agent_kube import NAMESPACE, config_map, kubeconfig_text, wait_until

pytestmark = pytest.mark.bpf

# The origins `status` shows (agent/mode.py); spelled out so that this file
# also runs against an agent without persisted modes (to see it fail).
CONFIG_MAP, NODE_SWITCH = "ConfigMap", "node switch"
REDIRECTING = {h.attach_type for h in datapath.HOOKS if h.function in datapath.REDIRECT_HOOKS}
BPFTOOL_REDIRECTING = {t.lower() for t in REDIRECTING}   # bpftool's attach_type names: cgroup_inet4_connect, ...
START_TIMEOUT = 120.0     # bcc compiles at start: tens of seconds on two shared cores
ATTACH_TIMEOUT = 150.0    # ... plus the agent's 30 s wait for a source that cannot deliver


def redirecting_attached(cgroup: Path) -> dict[str, list[int]]:
    return {t: ids for t, ids in datapath.attached_program_ids(cgroup).items() if t in REDIRECTING and ids}


def bpftool_redirecting(cgroup: Path) -> list[dict]:
    """The same question to bpftool (the kernel's answer, through another tool)."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [p for p in json.loads(out or "[]") if p.get("attach_type") in BPFTOOL_REDIRECTING]


class KernelWatch:
    """Polls the cgroup's attached programs on a thread; every sighting of a
    redirecting program is kept with its time."""

    def __init__(self, cgroup: Path):
        self.cgroup, self.seen, self.polls = cgroup, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            attached = redirecting_attached(self.cgroup)
            self.polls += 1
            if attached:
                self.seen.append((time.monotonic(), attached))

    def __enter__(self) -> "KernelWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A simulated node (pods a and b meshed, apps and test sidecars) whose
    agent takes pods and the mode from the fake API server."""
    from helpers.node import SimNode, _free_port

    class ModeNode(SimNode):
        def __init__(self, tmp, server):
            super().__init__(tmp)
            self.server = server
            self.kubeconfig = tmp / "kubeconfig"
            self.kubeconfig.write_text(kubeconfig_text(server.url))
            self.starts = 0
            self.pods_from_file = False    # True: the agent reads a pods file (no API, no ConfigMap)

        def agent_argv(self, *extra):
            argv = super().agent_argv(*extra)
            if self.pods_from_file:
                self.write_pods_file()
                return argv
            i = argv.index("--pods-file")
            argv[i:i + 2] = ["--kubeconfig", str(self.kubeconfig), "--namespace", NAMESPACE]
            return argv

        def spawn(self) -> Path:
            """Start an agent without waiting for it; returns its log file."""
            self.starts += 1
            self.log = self.tmp / f"agent-{self.starts}.log"
            self.agent_port = _free_port()
            with open(self.log, "w") as out:
                self.agent = subprocess.Popen(self.agent_argv("--metrics-addr", f"127.0.0.1:{self.agent_port}"),
                                              stdout=out, stderr=subprocess.STDOUT, text=True)
            return self.log

        def log_text(self) -> str:
            return self.log.read_text()

        def wait_log(self, text: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while text not in self.log_text():
                assert self.agent.poll() is None, f"agent exited {self.agent.returncode}:\n{self.log_text()}"
                assert time.monotonic() < deadline, f"no {text!r} in the agent's log:\n{self.log_text()[-3000:]}"
                time.sleep(0.1)

        def ready(self) -> bool:
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}/readyz", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        def start_ready(self) -> None:
            self.spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while not self.ready():
                assert self.agent.poll() is None, f"agent exited {self.agent.returncode}:\n{self.log_text()}"
                assert time.monotonic() < deadline, f"agent not ready:\n{self.log_text()[-3000:]}"
                time.sleep(0.1)

        def status(self) -> dict:
            return agent_request(self.admin_socket, "/status", timeout=10)

        def kill(self) -> None:
            self.agent.kill()
            self.agent.wait(10)

        def sigterm(self) -> None:
            self.agent.terminate()
            self.agent.wait(30)

        def toggle_node(self, *args: str) -> None:
            r = CliRunner().invoke(main, ["toggle", *args, "--node", "--admin-socket", str(self.admin_socket)])
            assert r.exit_code == 0, r.output

    server = FakeApiServer().start()
    n = None
    try:
        n = ModeNode(tmp_path_factory.mktemp("mode"), server)
        a, b = n.add_pod("a", meshed=True), n.add_pod("b", meshed=True)
        for pod in (a, b):
            n.start_app(pod)
            n.start_sidecar(pod)
            server.add_pod(pod.manifest("node1"))
        server.add("configmaps", config_map("ebpf"))
        server.add("daemonsets.apps", {"apiVersion": "apps/v1", "kind": "DaemonSet",
                                       "metadata": {"name": rbac.AGENT_DAEMONSET, "namespace": NAMESPACE}})
        n.start_ready()
        yield n
    finally:
        if n is not None:
            n.close()
        server.stop()


def write_config_map(node, mode: str) -> None:
    """Write the ConfigMap and wait until the agent has seen the write (its
    watch logs every change with its resourceVersion): a write the agent
    sees late would override a node switch made meanwhile."""
    rv = node.server.update("configmaps", config_map(mode))["metadata"]["resourceVersion"]
    node.wait_log(f"at resourceVersion {rv}", 30)


def switch_to_iptables(node, how: str) -> None:
    """From a node in ebpf mode (connect programs attached) to iptables,
    cluster-wide or for this node alone."""
    write_config_map(node, "ebpf")     # a ConfigMap write: overrides a node switch left by a test before
    wait_until(lambda: node.status()["mode"] == "ebpf", what="ebpf mode")
    assert redirecting_attached(node.cgroup), "ebpf mode without connect programs: the check below proves nothing"
    if how == "configmap":
        write_config_map(node, "iptables")
        origin = CONFIG_MAP
    else:
        node.toggle_node("iptables")
        origin = NODE_SWITCH
    wait_until(lambda: node.status()["mode"] == "iptables", what="iptables mode")
    assert node.status().get("mode_origin", origin) == origin   # (absent from an agent without persisted modes)
    assert redirecting_attached(node.cgroup) == {} and bpftool_redirecting(node.cgroup) == []


def api_trouble(server: FakeApiServer, api: str) -> None:
    if api == "unreachable":
        server.stop()
    elif api == "forbidden":
        server.forbidden |= {"configmaps"}
    elif api == "slow":
        # The ConfigMap's answer comes well after the pods': an agent that
        # attaches on the pod list alone does so before it knows the mode.
        server.delays.update({"configmaps": 6.0, "pods": 0.5})


def api_restored(server: FakeApiServer) -> None:
    server.forbidden.discard("configmaps")
    server.delays.clear()
    if server._httpd is None:
        server.start()


SCENARIOS = [(how, api) for how in ("configmap", "node") for api in ("unreachable", "forbidden", "reachable", "slow")]


@pytest.mark.slow
@pytest.mark.parametrize("how,api", SCENARIOS)
def test_sigkilled_agent_restarts_in_iptables_mode(node, how, api):
    switch_to_iptables(node, how)
    with KernelWatch(node.cgroup) as watch:
        node.kill()
        api_trouble(node.server, api)
        try:
            node.spawn()
            # Attached: with the API reachable as soon as the ConfigMap is read,
            # otherwise after the agent's wait for its sources.
            node.wait_log("datapath attached", ATTACH_TIMEOUT)
            st = node.status()
            assert st["mode"] == "iptables", st
            assert bpftool_redirecting(node.cgroup) == []
            assert watch.seen == [], f"redirecting programs attached: {watch.seen[:3]}"
            # Never in ebpf mode on the way up (the datapath logs every switch).
            assert "datapath mode is now" not in node.log_text(), node.log_text()[-3000:]
            assert st["configmap"]["read"] == (api in ("reachable", "slow")), st["configmap"]
            assert st["mode_origin"] == (CONFIG_MAP if how == "configmap" else NODE_SWITCH)
        finally:
            api_restored(node.server)
        wait_until(lambda: node.status()["configmap"]["read"], 60, "the ConfigMap read once the API is back")
        wait_until(node.ready, 60, "the agent ready")
        time.sleep(1.0)    # a wrong switch after the read would show within this
    st = node.status()
    assert (st["mode"], st["mode_origin"]) == ("iptables", CONFIG_MAP if how == "configmap" else NODE_SWITCH), st
    assert watch.polls > 100 and watch.seen == [], f"redirecting programs attached: {watch.seen[:3]}"
    assert bpftool_redirecting(node.cgroup) == []
    # Never in ebpf mode on the way up (the datapath logs every switch).
    assert "datapath mode is now" not in node.log_text(), node.log_text()[-3000:]
    assert "Traceback" not in node.log_text()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["configmap", "node"])
def test_rolling_upgrade_handover_keeps_iptables_mode(node, how):
    """The upgrade handover of tests/test_agent_upgrade.py: SIGTERM while the
    DaemonSet exists (the old agent keeps its programs and pins for a
    successor), a gap with no agent, then the new agent."""
    switch_to_iptables(node, how)
    old_programs = datapath.attached_program_ids(node.cgroup)
    with KernelWatch(node.cgroup) as watch:
        node.sigterm()
        assert "keeping programs attached and maps pinned for a successor" in node.log_text()
        assert datapath.attached_program_ids(node.cgroup) == old_programs
        time.sleep(2.0)
        node.start_ready()
        time.sleep(1.0)
    new_programs = datapath.attached_program_ids(node.cgroup)
    assert all(set(new_programs[t]).isdisjoint(old_programs[t]) for t in new_programs if new_programs[t])
    st = node.status()
    assert st["mode"] == "iptables", st
    assert watch.seen == [], f"redirecting programs attached: {watch.seen[:3]}"
    assert bpftool_redirecting(node.cgroup) == []
    assert "datapath mode is now" not in node.log_text(), node.log_text()[-3000:]
    assert st["mode_origin"] == (CONFIG_MAP if how == "configmap" else NODE_SWITCH), st


@pytest.mark.slow
def test_clear_puts_the_node_back_on_the_configmap_and_it_persists(node):
    write_config_map(node, "ebpf")
    wait_until(lambda: node.status()["mode"] == "ebpf", what="ebpf mode")
    node.toggle_node("iptables")
    node.toggle_node("--clear")
    st = node.status()
    assert (st["mode"], st["mode_origin"]) == ("ebpf", CONFIG_MAP)
    assert redirecting_attached(node.cgroup)
    from merbridge_py.agent.mode import ModeStore
    record = ModeStore(node.bpffs).load()
    assert (record.mode, record.origin) == ("ebpf", CONFIG_MAP)


@pytest.mark.slow
def test_pods_file_agent_keeps_a_node_switch_across_sigkill(node):
    """Without a Kubernetes API (a pods file, as on the test bed) the record
    alone carries the node's switch across a crash."""
    node.kill()
    node.pods_from_file = True
    try:
        node.start_ready()
        node.toggle_node("ebpf")
        assert node.status()["mode"] == "ebpf" and redirecting_attached(node.cgroup)
        node.toggle_node("iptables")
        assert redirecting_attached(node.cgroup) == {}
        with KernelWatch(node.cgroup) as watch:
            node.kill()
            node.start_ready()
            time.sleep(1.0)
        st = node.status()
        assert st["mode"] == "iptables", st
        assert watch.seen == [], f"redirecting programs attached: {watch.seen[:3]}"
        assert bpftool_redirecting(node.cgroup) == []
        assert "datapath mode is now" not in node.log_text(), node.log_text()[-3000:]
        assert (st["mode_origin"], st["configmap"]["watched"]) == (NODE_SWITCH, False), st
    finally:
        node.kill()
        node.pods_from_file = False
        node.start_ready()


# --- the record on a real bpffs ------------------------------------------------------

@pytest.fixture
def bpffs_dir():
    d = Path("/sys/fs/bpf") / f"mbp-mode{os.getpid()}"
    datapath.ensure_bpffs(d)
    yield d
    if d.exists():
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


def test_record_round_trips_and_is_overwritten_in_place(bpffs_dir):
    from merbridge_py.agent.mode import ModeRecord, ModeStore
    store = ModeStore(bpffs_dir)
    assert store.load() is None
    first = ModeRecord("iptables", NODE_SWITCH, "2026-12-07T10:00:00Z", "12", "ebpf")
    store.save(first)
    assert ModeStore(bpffs_dir).load() == first
    second = ModeRecord("ebpf", CONFIG_MAP, "2026-12-07T11:00:00Z", "13", "ebpf")
    store.save(second)
    assert ModeStore(bpffs_dir).load() == second
    assert [p.name for p in bpffs_dir.iterdir()] == ["agent_mode"]
    store.remove()
    assert store.load() is None


def test_cleanup_removes_the_record(bpffs_dir, tmp_path):
    from merbridge_py import sandbox
    from merbridge_py.agent.mode import ModeRecord, ModeStore
    ModeStore(bpffs_dir).save(ModeRecord("iptables", NODE_SWITCH, "2026-12-07T10:00:00Z"))
    r = CliRunner().invoke(main, ["cleanup", "--bpffs", str(bpffs_dir), "--cgroup", str(sandbox.cgroup2_root()),
                                  "--admin-socket", str(tmp_path / "none.sock")])
    assert r.exit_code == 0, r.output
    assert f"removed pin {bpffs_dir / 'agent_mode'}" in r.output
    assert not bpffs_dir.exists()

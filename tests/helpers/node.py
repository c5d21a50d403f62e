"""One simulated node for the datapath tests: a node namespace with a bridge,
pod namespaces with veths into it, a child cgroup per pod, test sidecars and
apps inside, and the agent. Everything is named mbp-dp<pid>-* and torn down
by `close()`, also after a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from merbridge_py import sandbox

HERE = Path(__file__).resolve().parent
PY = sys.executable


@dataclass
class Pod:
    name: str
    ip: str
    netns: str
    cgroup: Path
    meshed: bool
    annotations: dict = field(default_factory=dict)
    sidecar_log: Path | None = None
    proxy_uid: int = 1337     # the sidecar runs as this uid and gid; the manifest says so when not 1337
    ip6: str | None = None    # an IPv6 address in its namespace (tests/test_datapath_ipv6.py adds it)
    ip6_in_manifest: bool = True   # False: the API shows an IPv4-only pod, whatever its namespace holds
    sidecar_args: list = field(default_factory=list)   # extra forwarding_sidecar.py flags

    def manifest(self, node: str) -> dict:
        containers = [{"name": "app", "image": "app"}]
        init = []
        if self.meshed:
            containers.append({"name": "istio-proxy", "image": "proxyv2"})
            if self.proxy_uid != 1337:
                containers[-1]["securityContext"] = {"runAsUser": self.proxy_uid, "runAsGroup": self.proxy_uid}
            init.append({"name": "istio-init", "image": "proxyv2"})
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": "default", "annotations": self.annotations},
                "spec": {"nodeName": node, "containers": containers, "initContainers": init},
                "status": {"phase": "Running", "podIP": self.ip,
                           "podIPs": [{"ip": ip} for ip in (self.ip, self.ip6 if self.ip6_in_manifest else None)
                                      if ip]}}


class SimNode:
    def __init__(self, tmp: Path, subnet: str | None = None):
        # a subnet of our own, so concurrent runs on one host never share pod IPs
        subnet = subnet or f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
        self.tag = f"mbp-dp{os.getpid()}"
        self.tmp = tmp
        self.subnet = subnet
        self.node_ns = f"{self.tag}-node"
        self.cgroup = sandbox.cgroup2_root() / self.tag
        self.bpffs = Path("/sys/fs/bpf") / self.tag
        self.pods: dict[str, Pod] = {}
        self.procs: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None
        self.agent_port: int | None = None
        self.pods_file = tmp / "pods.json"
        self.admin_socket = tmp / "agent.sock"
        sandbox.netns_add(self.node_ns)
        sandbox.sh("ip", "link", "add", "br0", "type", "bridge", netns=self.node_ns)
        sandbox.sh("ip", "addr", "add", f"{subnet}.1/24", "dev", "br0", netns=self.node_ns)
        sandbox.sh("ip", "link", "set", "br0", "up", netns=self.node_ns)
        sandbox.cgroup_create(self.cgroup)

    def add_pod(self, name: str, meshed: bool, annotations: dict | None = None, in_namespace: bool = True) -> Pod:
        ip = f"{self.subnet}.{10 + len(self.pods)}"
        pod = Pod(name, ip, f"{self.tag}-{name}", sandbox.cgroup_create(self.cgroup / name), meshed,
                  annotations or {})
        self.pods[name] = pod
        if not in_namespace:
            return pod  # a pod the API knows whose namespace does not hold its IP
        self._make_sandbox(pod, f"v{len(self.pods)}{os.getpid() % 10000}")
        return pod

    def recreate_sandbox(self, pod: Pod) -> None:
        """A pod sandbox restart: the pod's processes end, its network
        namespace goes, and a new one (a new netns cookie) gets the same IP.
        The caller starts the pod's app and sidecar again."""
        pids = set(sandbox.netns_pids(pod.netns))
        for p in self.procs:
            if p.pid in pids:
                sandbox.stop(p)
        sandbox.netns_delete(pod.netns)
        self._recreated = getattr(self, "_recreated", 0) + 1
        # a new host-side name: the old veth may outlive its namespace for a moment
        self._make_sandbox(pod, f"r{self._recreated}{list(self.pods).index(pod.name)}{os.getpid() % 10000}")

    def _make_sandbox(self, pod: Pod, host_if: str) -> None:
        sandbox.netns_add(pod.netns)
        ip = pod.ip
        sandbox.sh("ip", "link", "add", host_if, "netns", self.node_ns, "type", "veth", "peer", "eth0",
                   "netns", pod.netns)
        sandbox.sh("ip", "link", "set", host_if, "master", "br0", "up", netns=self.node_ns)
        sandbox.sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", netns=pod.netns)
        sandbox.sh("ip", "link", "set", "eth0", "up", netns=pod.netns)
        sandbox.sh("ip", "route", "add", "default", "via", f"{self.subnet}.1", netns=pod.netns)

    def _start(self, argv, pod: Pod, uid=None, wait_ready=True, stderr=None) -> subprocess.Popen:
        p = sandbox.spawn(argv, netns=pod.netns, cgroup=pod.cgroup, uid=uid, stdout=subprocess.PIPE, text=True,
                          stderr=stderr)
        self.procs.append(p)
        if wait_ready:
            assert p.stdout.readline().strip() == "ready", f"{argv[1]} in {pod.name} did not start"
        return p

    def start_app(self, pod: Pod, port: int = 8080) -> None:
        self._start([PY, str(HERE / "line_app.py"), "--name", pod.name, "--port", str(port)]
                    + (["--ipv6"] if pod.ip6 else []), pod)

    def start_sidecar(self, pod: Pod) -> None:
        pod.sidecar_log = self.tmp / f"sidecar-{pod.name}.log"
        with open(pod.sidecar_log, "a") as log:  # opened here: the sidecar (uid 1337) cannot reach pytest's tmp
            self._start([PY, str(HERE / "forwarding_sidecar.py")] + (["--ipv6"] if pod.ip6 else []) + pod.sidecar_args,
                        pod,
                        uid=pod.proxy_uid, stderr=log)

    def sidecar_records(self, pod: Pod) -> list[str]:
        return pod.sidecar_log.read_text().splitlines()

    def write_pods_file(self) -> None:
        items = [p.manifest("node1") for p in self.pods.values()]
        tmp = self.pods_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "PodList", "items": items}))
        tmp.replace(self.pods_file)

    def client(self, pod: Pod, *args, in_cgroup: bool = True, timeout: float = 120,
               uid: int | None = None) -> subprocess.CompletedProcess:
        p = sandbox.spawn([PY, str(HERE / "client.py"), *map(str, args)], netns=pod.netns,
                          cgroup=pod.cgroup if in_cgroup else None, uid=uid, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def client_background(self, pod: Pod, *args) -> subprocess.Popen:
        p = sandbox.spawn([PY, str(HERE / "client.py"), *map(str, args)], netns=pod.netns, cgroup=pod.cgroup,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def tcp_out_segs(self, pod: Pod) -> int:
        lines = sandbox.sh("cat", "/proc/net/snmp", netns=pod.netns).splitlines()
        tcp = [line.split() for line in lines if line.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("OutSegs")])

    # --- the agent ---------------------------------------------------------------

    def agent_argv(self, *extra: str) -> list[str]:
        # No iptables rules on this node: the connect hook itself must move a
        # proxy's connection onto the destination pod's inbound port.
        return [PY, "-m", "merbridge_py.cli", "run", "--cgroup", str(self.cgroup), "--pods-file",
                str(self.pods_file), "--bpffs", str(self.bpffs), "--node-name", "node1",
                "--admin-socket", str(self.admin_socket),
                "--inbound-redirect", "ebpf", "--installed-rules", "ignore", *extra]

    def start_agent(self, *extra: str, timeout: float = 90) -> None:
        # 90 s as the test bed waits: bcc compiles at start, which took over
        # 30 s on 2 cores shared with other agents compiling.
        from merbridge_py.testbed.testbed import timeout_scale
        timeout *= timeout_scale()
        self.agent_port = _free_port()
        self.agent = subprocess.Popen(self.agent_argv("--metrics-addr", f"127.0.0.1:{self.agent_port}", *extra),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise AssertionError(f"agent exited {self.agent.returncode}: {self.agent.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("agent not ready in time")

    def agent_get(self, path: str) -> str:
        """GET on the read-only network port; /status goes to the admin socket."""
        if path == "/status":
            from merbridge_py.agent.status import agent_request
            return json.dumps(agent_request(self.admin_socket, path))
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agent_port}{path}", timeout=5) as r:
            return r.read().decode()

    def stop_agent(self, timeout: float = 10) -> tuple[int, str]:
        self.agent.terminate()
        out, _ = self.agent.communicate(timeout=timeout)
        rc, self.agent = self.agent.returncode, None
        return rc, out

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait()
        for p in self.procs:
            sandbox.stop(p)
        for pod in self.pods.values():
            sandbox.netns_delete(pod.netns)
        sandbox.netns_delete(self.node_ns)
        sandbox.cgroup_remove(self.cgroup)
        _remove_pins(self.bpffs)


def _remove_pins(d: Path) -> None:
    if d.exists():
        for p in sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""The test bed: bring it up, switch modes, send requests, take it down.

    with Testbed.up("tb", nodes=2, pods_per_node=2, mode="iptables") as tb:
        status, body = tb.request("n0p0", tb.pod("n1p0").ip, 8080, "/whoami")
        tb.set_mode("ebpf")          # + one merbridge-py agent per node
        tb.nat_counters("n0p0"), tb.sidecar_connections("n0p0")

Modes: `nomesh` (apps only), `iptables` (Istio as-is: istio-init's nat rules
and a sidecar in every meshed pod), `ebpf` (Istio as-is plus one
`merbridge-py run` per node, attached to that node's cgroup).

Every process is started detached (own session, output to files under the
work directory) and recorded in the state file, so `merbridge-py testbed`
commands in other processes can switch modes and take the bed down.
"""

from __future__ import annotations

import dataclasses
import os
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import sandbox, system_programs
from ..datapath import detach_pinned
from ..mesh import ISTIO
from . import dns, envoy, istio_dns, istio_ip6tables, istio_iptables, istio_nftables, kube, nginx_app, pki, state, topology
from .cleanup import AGENT_STOP_TIMEOUT, leftovers, teardown
from .envoy import EnvoySidecar
from .options import DEFAULT_ENVOY_WORKERS, DEFAULT_MTLS, MODES, PROXIES
from .sidecar import HAProxySidecar, ProxiedConnection
from .state import ProcessRecord
from .topology import Node, Pod, PodSpec

APPS = ("python", "nginx")
APP_START_TIMEOUT = 20.0
SIDECAR_START_TIMEOUT = 30.0   # Envoys of every pod start at once on 2 busy cores
AGENT_START_TIMEOUT = 90.0     # bcc compiles the programs at start: seconds on 2 busy cores
# Every start-up wait above is multiplied by this environment variable's value
# (default 1): the kernel matrix sets it in its emulated VMs (merbridge_py/
# kernels), where compiling alone took 50-60 s and Envoy starts as slowly.
TIMEOUT_SCALE_ENV = "MERBRIDGE_TIMEOUT_SCALE"


def timeout_scale() -> float:
    value = os.environ.get(TIMEOUT_SCALE_ENV, "1")
    try:
        scale = float(value)
    except ValueError:
        raise TestbedError(f"{TIMEOUT_SCALE_ENV}={value!r} is not a number") from None
    if scale < 1:
        raise TestbedError(f"{TIMEOUT_SCALE_ENV}={value!r} must be 1 or more")
    return scale


class TestbedError(RuntimeError):
    __test__ = False


# Straight to the agent on loopback, whatever http_proxy says.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, name: str, nodes: list[Node], pods: list[Pod], fabric: str, slot: int, mode: str = "nomesh",
                 sidecar_log: bool = False, processes: list[ProcessRecord] | None = None,
                 agents: dict[str, str] | None = None, app: str = "python", http_ports: tuple[int, ...] = (),
                 proxy: str = "envoy", mtls: str = DEFAULT_MTLS, envoy_workers: int = DEFAULT_ENVOY_WORKERS,
                 ip_families: tuple[str, ...] = topology.IPV4_ONLY):
        self.name = name
        self.slot = slot
        self.nodes = nodes
        self.pods = pods
        self.fabric = fabric
        self.mode = mode
        self.log_connections = sidecar_log
        self.app = app                # "python" (tests: /whoami, /bytes) or "nginx" (benchmarks)
        self.http_ports = tuple(http_ports)  # ports the sidecars proxy as HTTP, with pooled upstreams
        self.proxy = proxy            # the sidecar: "envoy" (Istio's) or "haproxy" (a second, independent proxy)
        self.mtls = mtls              # between Envoy sidecars: "strict", "permissive" (Istio's default) or "off"
        self.envoy_workers = envoy_workers
        self.ip_families = topology.check_ip_families(ip_families)   # ("ipv4",) or dual stack ("ipv4", "ipv6")
        self.processes: list[ProcessRecord] = processes or []
        self.agents: dict[str, str] = agents or {}     # node name -> metrics address of its agent
        self.workdir = state.workdir(name)
        self.status_word = "up"      # "creating" until up() has finished
        # Test only: the agents this object starts run with this deliberately
        # wrong policy (testbed/mutant_agent.py), to show a test can fail.
        self.agent_mutant: str | None = None
        self._children: dict[int, subprocess.Popen] = {}

    # --- life cycle -------------------------------------------------------------

    @classmethod
    def up(cls, name: str = "tb", nodes: int = 2, pods_per_node: int = 2, mode: str = "iptables",
           pods: list[PodSpec] | None = None, plain_per_node: int = 0, sidecar_log: bool = False,
           app: str = "python", http_ports: tuple[int, ...] = (), proxy: str = "envoy",
           mtls: str = DEFAULT_MTLS, envoy_workers: int = DEFAULT_ENVOY_WORKERS,
           ip_families: tuple[str, ...] = topology.IPV4_ONLY, rules: str = "iptables",
           mesh_defaults: dict[str, str] | None = None, cni: bool = False) -> "Testbed":
        """Create the bed and start it in `mode`. `pods` replaces the default
        n<node>p<i> pods (all meshed, except the last `plain_per_node` per node).
        `app` is the pods' HTTP server: "python" (every endpoint, for tests) or
        "nginx" (`/` and `/whoami`; fast enough that a benchmark measures the
        mesh, not the app). `http_ports`: ports the sidecars proxy as HTTP with
        pooled upstream connections, as Envoy does for a Service port declared
        HTTP; every other port is plain TCP. `proxy`: the sidecar, "envoy"
        (configured as istiod configures it) or "haproxy" (TCP and HTTP
        forwarding only, no mTLS: shows the datapath does not depend on one
        proxy). `mtls`: Envoy's peer authentication, "strict", "permissive"
        (Istio's default; sidecars still speak mTLS to each other) or "off".
        `envoy_workers`: Envoy's --concurrency. `ip_families`: ("ipv4",) or
        ("ipv4", "ipv6") for a dual-stack bed (every pod and Service also gets
        an IPv6 address, Istio's ip6tables rules and dual-stack Envoy
        listeners; see topology and envoy).
        How Istio was installed, for every pod whose PodSpec leaves it unset:
        `rules` "iptables" (istio-iptables) or "nftables" (Istio's native
        nftables backend, tables inet istio-proxy-*); `mesh_defaults` the
        mesh-wide injection values (helm global.proxy.* names, e.g.
        {"excludeIPRanges": "10.0.0.0/8", "proxyUID": "1000720000"}; a
        PodSpec's own mesh_defaults are merged over these) that end up in
        istio-init's arguments, or with `cni` (istio-cni) in the annotations.
        On any failure everything created so far is removed again."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        if app not in APPS:
            raise ValueError(f"app {app!r}: one of {', '.join(APPS)}")
        if proxy not in PROXIES:
            raise ValueError(f"proxy {proxy!r}: one of {', '.join(PROXIES)}")
        envoy.check_mtls(mtls)
        if proxy == "haproxy":
            if mtls == "strict":
                raise ValueError("mtls 'strict' needs proxy='envoy': HAProxy sidecars forward plain bytes")
            mtls = "off"
        ip_families = topology.check_ip_families(ip_families)
        if ip_families != topology.IPV4_ONLY and proxy != "envoy":
            raise ValueError("a dual-stack bed needs proxy='envoy': the HAProxy sidecar forwards IPv4 only")
        if sidecar_log and proxy != "haproxy":
            raise ValueError("sidecar_log needs proxy='haproxy'; Envoy's witness is its stats (sidecar_stats)")
        if not (isinstance(envoy_workers, int) and 1 <= envoy_workers <= 64):
            raise ValueError(f"envoy_workers {envoy_workers!r}: an integer 1-64")
        bad_ports = [port for port in http_ports if not (isinstance(port, int) and 1 <= port <= 65535)]
        if bad_ports:
            raise ValueError(f"http_ports {bad_ports!r}: ports are integers 1-65535")
        specs = pods if pods is not None else topology.default_specs(nodes, pods_per_node, plain_per_node)
        specs = [_install_options(s, rules, mesh_defaults or {}, cni) for s in specs]
        if any(not s.host_users for s in specs) and (app != "python" or proxy != "envoy"):
            raise ValueError("pods with host_users=False need app='python' and proxy='envoy' (the files the "
                             "nginx app and HAProxy write are not laid out for a pod's own user namespace)")
        try:   # a missing program fails here, named with its package, not halfway through the bed
            system_programs.require(_programs_needed(specs, proxy, app, ip_families))
        except system_programs.MissingPrograms as e:
            raise TestbedError(str(e)) from None
        if "ipv6" in ip_families and any(s.meshed and s.rules == "nftables" for s in specs):
            # istio_nftables.py generates Istio's IPv4 rules only so far
            raise ValueError("a dual-stack bed needs rules 'iptables': the bed's nftables rules are IPv4 only")
        topology.plan(name, specs, nodes, ip_families=ip_families)  # bad input fails before anything else
        with state.locked():
            found = leftovers(name)
            if found:
                raise TestbedError(f"test bed {name!r} already exists ({', '.join(found)}); "
                                   f"take it down first: merbridge-py testbed down --name {name}")
            free = sorted(set(range(topology.MAX_SLOTS)) - state.used_slots())
            if not free:
                raise TestbedError(f"{topology.MAX_SLOTS} test beds are up already; take one down")
            node_list, pod_list, fabric = topology.plan(name, specs, nodes, slot=free[0], ip_families=ip_families)
            tb = cls(name, node_list, pod_list, fabric, slot=free[0], sidecar_log=sidecar_log, app=app,
                     http_ports=http_ports, proxy=proxy, mtls=mtls, envoy_workers=envoy_workers,
                     ip_families=ip_families)
            tb.status_word = "creating"
            tb._save()  # before anything exists: `down` always finds what to remove
        try:
            tb._create()
            tb._start_apps()
            dns.start(tb)
            tb.set_mode(mode, settle=False)
            tb.status_word = "up"
            tb._save()
        except BaseException:
            tb.down()
            raise
        return tb

    @classmethod
    def attach(cls, name: str) -> "Testbed":
        """The running test bed `name`, from its state file."""
        data = state.load(topology.check_name(name))
        if data is None:
            raise TestbedError(f"no test bed named {name!r} (no {state.state_file(name)})")
        return cls(name, [Node(**n) for n in data["nodes"]], [Pod(**p) for p in data["pods"]], data["fabric"],
                   slot=data["slot"], mode=data["mode"], sidecar_log=data["sidecar_log"],
                   processes=[ProcessRecord(**p) for p in data["processes"]], agents=data["agents"],
                   app=data.get("app", "python"), http_ports=tuple(data.get("http_ports", ())),
                   proxy=data.get("proxy", "haproxy"), mtls=data.get("mtls", "off"),
                   envoy_workers=data.get("envoy_workers", DEFAULT_ENVOY_WORKERS),
                   ip_families=tuple(data.get("ip_families", topology.IPV4_ONLY)))

    def down(self) -> None:
        """Stop everything and remove every resource; safe to call twice."""
        teardown(self.name, reap=self._reap)
        self.processes = []
        for pid in list(self._children):   # whatever teardown found by cgroup rather than by record
            self._reap(pid, block=True)

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _save(self) -> None:
        state.save(self.name, {
            "name": self.name, "slot": self.slot, "status": self.status_word, "mode": self.mode,
            "sidecar_log": self.log_connections, "fabric": self.fabric, "cgroup": str(topology.cgroup_dir(self.name)),
            "nodes": [vars(n) for n in self.nodes], "pods": [p.to_json() for p in self.pods],
            "processes": [p.to_json() for p in self.processes], "agents": self.agents, "app": self.app,
            "http_ports": list(self.http_ports), "proxy": self.proxy, "mtls": self.mtls,
            "envoy_workers": self.envoy_workers, "ip_families": list(self.ip_families),
        })

    def _create(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        sandbox.cgroup_create(topology.cgroup_dir(self.name) / "ctl")
        topology.create_fabric(self.fabric, dual_stack=self.dual_stack)
        for node in self.nodes:
            topology.create_node(node, self.fabric, self.nodes)
        for pod in self.pods:
            topology.create_pod(pod, self.node(pod.node))
        dns.write_resolv_confs(self)
        for node in self.nodes:
            objects = [kube.pod_object(self.name, p, node) for p in self.pods if p.node == node.name]
            self.pods_file(node).write_text(json.dumps(kube.pod_list(objects), indent=1) + "\n")
        if self.proxy == "envoy":
            self._issue_identities()

    def _issue_identities(self) -> None:
        """The bed's CA (as istiod's) and each meshed pod's directory, with
        its workload certificate unless mTLS is off."""
        ca = pki.CertificateAuthority.create(self.workdir / pki.CA_DIR) if self.mtls != "off" else None
        for pod in self.pods:
            if pod.meshed:
                self.sidecar(pod).prepare(ca)

    # --- lookups ------------------------------------------------------------------

    @property
    def dual_stack(self) -> bool:
        return "ipv6" in self.ip_families

    def pod(self, pod: str | Pod) -> Pod:
        if isinstance(pod, Pod):
            return pod
        for p in self.pods:
            if p.name == pod:
                return p
        raise KeyError(f"no pod {pod!r} in test bed {self.name}; pods: {', '.join(p.name for p in self.pods)}")

    def node(self, node: str | Node) -> Node:
        if isinstance(node, Node):
            return node
        for n in self.nodes:
            if n.name == node:
                return n
        raise KeyError(f"no node {node!r} in test bed {self.name}")

    def pods_file(self, node: str | Node) -> Path:
        return self.workdir / f"{self.node(node).name}.pods.json"

    def sidecar(self, pod: str | Pod) -> EnvoySidecar | HAProxySidecar:
        p = self.pod(pod)
        if not p.meshed:
            raise ValueError(f"pod {p.name} is not meshed: it has no sidecar")
        # the sidecar runs as the uid/gid the pod's rules exempt (-u/-g, runAsUser)
        profile = dataclasses.replace(ISTIO, proxy_uid=p.proxy_uid, proxy_gid=p.proxy_gid)
        if self.proxy == "envoy":
            return EnvoySidecar(self.workdir, p, self.pods, http_ports=self.http_ports, mtls=self.mtls,
                                workers=self.envoy_workers, profile=profile)
        return HAProxySidecar(self.workdir, p.name, log_connections=self.log_connections,
                              services={q.service_ip: q.ip for q in self.pods}, http_ports=self.http_ports,
                              profile=profile)

    def namespaces(self) -> list[str]:
        return [self.fabric] + [n.netns for n in self.nodes] + [p.netns for p in self.pods]

    # --- processes ------------------------------------------------------------------

    def _reap(self, pid: int, block: bool = False) -> None:
        child = self._children.get(pid)
        if child is None:
            return
        try:
            child.wait(timeout=5 if block else 0)
        except subprocess.TimeoutExpired:
            return
        del self._children[pid]

    def _track(self, proc: subprocess.Popen, role: str, owner: str) -> ProcessRecord:
        self._children[proc.pid] = proc
        rec = ProcessRecord.of(proc.pid, role, owner)
        self.processes.append(rec)
        self._save()
        return rec

    def _stop(self, role: str, timeout: float) -> None:
        chosen = [r for r in self.processes if r.role == role]
        state.terminate(chosen, timeout=timeout, reap=self._reap)
        self.processes = [r for r in self.processes if r.role != role]
        self._save()

    def _wait(self, what: str, records: list[ProcessRecord], is_ready, timeout: float, log_of) -> None:
        timeout *= timeout_scale()
        deadline = time.monotonic() + timeout
        pending = list(records)
        while pending:
            for rec in list(pending):
                if not rec.alive():
                    self._reap(rec.pid, block=True)
                    raise TestbedError(f"{what} of {rec.owner} exited during start-up; its output:\n"
                                       f"{_tail(log_of(rec.owner))}")
                if is_ready(rec.owner):
                    pending.remove(rec)
            if pending and time.monotonic() > deadline:
                names = ", ".join(r.owner for r in pending)
                raise TestbedError(f"{what} not ready after {timeout:.0f}s: {names}; output of {pending[0].owner}:\n"
                                   f"{_tail(log_of(pending[0].owner))}")
            if pending:
                time.sleep(0.01)

    def _start_apps(self) -> None:
        def ready_file(pod_name: str) -> Path:
            p = self.pod(pod_name)
            if p.host_users:
                return self.workdir / f"{pod_name}.app-ready"
            # the app of a pod in its own user namespace is root inside, not on the host
            own = self.workdir / f"{pod_name}.app"
            own.mkdir(exist_ok=True)
            os.chown(own, p.host_id(0), p.host_id(0))
            return own / "ready"

        def log_of(pod_name: str) -> Path:
            return self.workdir / f"{pod_name}.app.log"

        records = []
        for pod in self.pods:
            ready_file(pod.name).unlink(missing_ok=True)
            if self.app == "nginx":
                argv = nginx_app.argv(self.workdir, pod.name, pod.bed_app_ports, ready_file(pod.name), log_of(pod.name),
                                      ipv6=bool(pod.ip6))
            else:
                argv = [sys.executable, "-m", "merbridge_py.testbed.app", "--name", pod.name,
                        "--ready-file", str(ready_file(pod.name))]
                for port in pod.bed_app_ports:
                    argv += ["--port", str(port)]
                if pod.ip6:
                    argv.append("--ipv6")
            with open(log_of(pod.name), "ab") as log:
                proc = sandbox.spawn(argv, netns=pod.netns, cgroup=Path(pod.cgroup), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            records.append(self._track(proc, "app", pod.name))
        self._wait("app", records, lambda name: ready_file(name).exists(), APP_START_TIMEOUT, log_of)

    def _start_sidecars(self) -> None:
        records = []
        for pod in self.pods:
            if pod.meshed:
                proc = self.sidecar(pod).start(pod.netns, Path(pod.cgroup), start_new_session=True)
                records.append(self._track(proc, "sidecar", pod.name))
        self._wait("sidecar", records, lambda name: self.sidecar(name).ready(), SIDECAR_START_TIMEOUT,
                   lambda name: self.sidecar(name).log_path)

    def _start_agents(self) -> None:
        records = [self._spawn_agent(node) for node in self.nodes]
        self._wait("agent", records, self.agent_ready, AGENT_START_TIMEOUT, self._agent_log)

    def _spawn_agent(self, node: Node) -> ProcessRecord:
        addr = f"127.0.0.1:{_free_loopback_port()}"
        command = ["merbridge_py.cli"] if self.agent_mutant is None else \
            ["merbridge_py.testbed.mutant_agent", self.agent_mutant]
        argv = [sys.executable, "-m", *command, "run", "--cgroup", node.cgroup,
                "--pods-file", str(self.pods_file(node)), "--bpffs", node.bpffs,
                "--metrics-addr", addr, "--admin-socket", str(self.admin_socket(node)), "--node-name", node.name]
        # In the root network namespace (the agent needs only the cgroup and
        # /proc) and in a cgroup of its own, outside the node it accelerates.
        with open(self._agent_log(node.name), "ab") as log:
            proc = sandbox.spawn(argv, cgroup=topology.cgroup_dir(self.name) / "ctl", stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.agents[node.name] = addr
        return self._track(proc, "agent", node.name)

    def restart_agent(self, node: str | Node) -> None:
        """Start `node`'s agent again the way the bed starts it, and wait until
        it is ready. A running agent is stopped first (SIGTERM: with no API to
        ask, it detaches); one that died or was killed is only reaped, and the
        new one finds its predecessor's programs through the pins it left and
        replaces them."""
        n = self.node(node)
        if self.mode != "ebpf":
            raise TestbedError(f"no agents run in mode {self.mode}")
        old = [r for r in self.processes if r.role == "agent" and r.owner == n.name]
        state.terminate(old, timeout=AGENT_STOP_TIMEOUT, reap=self._reap)
        self.processes = [r for r in self.processes if r not in old]
        self._wait("agent", [self._spawn_agent(n)], self.agent_ready, AGENT_START_TIMEOUT, self._agent_log)

    def agent_metrics(self, node: str | Node) -> dict[str, float]:
        """The node's agent's /metrics, one entry per sample, keyed as
        Prometheus writes them: `merbridge_redirects_total{direction="outbound"}`."""
        from prometheus_client.parser import text_string_to_metric_families
        with _NO_PROXY.open(f"http://{self.agents[self.node(node).name]}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def admin_socket(self, node: str | Node) -> Path:
        """The node's agent's admin socket (/status, POST /mode)."""
        return self.workdir / f"{self.node(node).name}.admin.sock"

    def _agent_log(self, node_name: str) -> Path:
        return self.workdir / f"{node_name}.agent.log"

    def agent_ready(self, node: str | Node) -> bool:
        addr = self.agents.get(self.node(node).name)
        if addr is None:
            return False
        try:
            with _NO_PROXY.open(f"http://{addr}/readyz", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    # --- modes ------------------------------------------------------------------

    def set_mode(self, mode: str, settle: bool = True) -> None:
        """Switch to `mode`, starting and stopping only what differs. With
        `settle` (default) conntrack and TIME_WAIT left by the previous mode
        are cleared (see settle())."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        old = self.mode
        if mode == old:
            return
        if old == "ebpf":
            self._stop("agent", AGENT_STOP_TIMEOUT)
            self.agents = {}
            # A stopped agent detaches when it has no API to ask, but one told to
            # keep (MERBRIDGE_ON_SIGTERM, a kubeconfig in the environment) would
            # leave eBPF serving a bed that says "iptables".
            for node in self.nodes:
                detach_pinned(Path(node.bpffs), Path(node.cgroup))
        if mode == "nomesh":
            self._stop("sidecar", 5.0)
            self._apply_rules(install=False)
        elif old == "nomesh":
            self._apply_rules(install=True)
            self._start_sidecars()
        if mode == "ebpf":
            self._start_agents()
        self.mode = mode
        self._save()
        if settle:
            self.settle()

    def _apply_rules(self, install: bool) -> None:
        """Istio's rules in every meshed pod, as istio-init (or istio-cni)
        installs them from the pod's flags, or (install=False) removed."""
        for pod in self.pods:
            if not pod.meshed:
                continue
            flags = istio_iptables.pod_flags(pod)
            # Istio's DNS capture (proxyMetadata ISTIO_META_DNS_CAPTURE): the servers
            # of the pod's resolv.conf, or every address under istio-cni.
            dns_capture = istio_dns.dns_capture(pod.annotations, dns.resolv_conf(self.node(pod.node)),
                                                cni=getattr(pod, "cni", False))
            if pod.rules == "nftables":
                if dns_capture.active and dns_capture.capture_all:
                    raise ValueError(f"pod {pod.name}: capture-all DNS with Istio's nftables rules is not "
                                     "modelled by the bed (istio_nftables writes per-server DNS rules only)")
                nft_flags = istio_dns.with_dns(flags, dns_capture)
                sandbox.sh("nft", "-f", "-", netns=pod.netns,
                           input=istio_nftables.script(nft_flags) if install else istio_nftables.delete_script(nft_flags))
            elif install:
                sandbox.sh("iptables-restore", "--noflush", netns=pod.netns,
                           input=istio_dns.restore_payload(flags, dns_capture))
            else:
                sandbox.sh("iptables-restore", netns=pod.netns,
                           input=istio_iptables.flush_payload(istio_dns.with_dns(flags, dns_capture)))
            if pod.ip6:
                self._apply_ipv6_rules(pod, flags, install)

    @staticmethod
    def _apply_ipv6_rules(pod: Pod, flags: istio_iptables.CaptureFlags, install: bool) -> None:
        """What istio-iptables adds for a pod with an IPv6 address: the
        ip6tables half of its rules and ::6 on lo (the inbound passthrough
        source Envoy binds for IPv6); removed again on the way to nomesh."""
        if install:
            sandbox.sh(*istio_ip6tables.passthrough_address_command(add=True), netns=pod.netns)
            sandbox.sh("ip6tables-restore", "--noflush", netns=pod.netns,
                       input=istio_ip6tables.restore_payload(flags))
        else:
            sandbox.sh("ip6tables-restore", netns=pod.netns, input=istio_ip6tables.flush_payload(flags))
            sandbox.sh(*istio_ip6tables.passthrough_address_command(add=False), netns=pod.netns)

    def settle(self) -> None:
        """A clean start for the next block of traffic: flush conntrack and
        kill TIME_WAIT sockets in every node and pod namespace. Leftovers of
        the previous mode otherwise skew the next one: a conntrack entry from
        iptables-mode traffic can make netfilter remap a new connection's
        source port, and TIME_WAIT sockets collide with new connections to
        the same listener. With HTTP ports, the sidecars' pooled connections
        on them are closed too."""
        script = ("conntrack -F >/dev/null 2>&1; ss -K -t state time-wait >/dev/null 2>&1; "
                  "ss -H -t state time-wait | wc -l")
        if self.http_ports and self.mode != "nomesh":
            # Sidecars keep idle pooled connections on HTTP ports; one made
            # (and spliced, or not) under the previous mode would carry its
            # requests on into the next. Closing the upstream end resets
            # the peer too. Only pooled ports: other tests' held connections stay.
            ports = " or ".join(f"dport = :{port}" for port in self.http_ports)
            script = f"ss -K -t state established '( {ports} )' >/dev/null 2>&1; " + script
        for _ in range(5):
            left = {ns: int(sandbox.sh("sh", "-c", script, netns=ns).strip() or 0) for ns in self.namespaces()}
            if not any(left.values()):
                return
            time.sleep(0.05)
        raise TestbedError(f"TIME_WAIT sockets survive ss -K: {left}")

    # --- traffic and observation --------------------------------------------------

    def exec(self, pod: str | Pod, argv: list[str], **popen) -> subprocess.Popen:
        """Start a process inside `pod`'s network namespace and cgroup, as a
        container of the pod would run: the eBPF programs attached to the
        node's cgroup see it as that pod's app. (`ip netns exec` alone leaves
        it outside the cgroup: in ebpf mode its connections silently take
        Istio's iptables path.)"""
        p = self.pod(pod)
        return sandbox.spawn(argv, netns=p.netns, cgroup=Path(p.cgroup), **popen)

    spawn_in = exec     # the name the benchmark and the load generator use

    def exec_in(self, pod: str | Pod, argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        proc = self.exec(pod, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise TestbedError(f"{argv} in pod {self.pod(pod).name} did not finish in {timeout}s: {err}")
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def requests(self, src: str | Pod, dst: str | Pod, port: int = topology.APP_PORT, path: str = "/whoami",
                 count: int = 1, new_connection: bool = False, timeout: float = 5.0,
                 family: str | None = None) -> list[dict]:
        """`count` GETs from inside pod `src` to `dst` (a pod or an IP); one
        dict per request: status, body (JSON decoded), local ("ip:port", or
        "[ip]:port" for IPv6, of the client socket), error (None when the
        request worked). A pod `dst` means its IPv4 address. `family`: the
        client's socket family, "inet" or "inet6"; "inet6" to an IPv4
        address connects to its v4-mapped form ::ffff:a.b.c.d, as the JVM
        does (default: the address's own family)."""
        dst_ip = self._address(dst)
        argv = [sys.executable, "-m", "merbridge_py.testbed.client", "--host", dst_ip, "--port", str(port),
                "--path", path, "--count", str(count), "--timeout", str(timeout)]
        if new_connection:
            argv.append("--new-connection")
        if family is not None:
            argv += ["--family", family]
        done = self.exec_in(src, argv, timeout=30 + count * timeout)
        if done.returncode != 0:
            raise TestbedError(f"client in pod {self.pod(src).name} failed: {done.stderr.strip()}")
        return json.loads(done.stdout)["results"]

    def _address(self, dst: str | Pod) -> str:
        """A pod (object or name: its IPv4 address) or a literal IPv4 or IPv6 address."""
        if isinstance(dst, Pod):
            return dst.ip
        try:
            socket.inet_aton(dst)
            return dst
        except OSError:
            pass
        if ":" in dst:
            socket.inet_pton(socket.AF_INET6, dst)   # a clear error for a malformed one
            return dst
        return self.pod(dst).ip

    def request(self, src: str | Pod, dst: str | Pod, port: int = topology.APP_PORT,
                path: str = "/whoami", timeout: float = 5.0, family: str | None = None) -> tuple[int, object]:
        """One GET from inside `src`: (status, body). Raises TestbedError when
        the request gets no HTTP response at all. `family`: see requests()."""
        result = self.requests(src, dst, port, path, timeout=timeout, family=family)[0]
        if result["error"]:
            raise TestbedError(f"{self.pod(src).name} -> {dst}:{port}{path} failed: {result['error']}")
        return result["status"], result["body"]

    def nat_counters(self, pod: str | Pod, family: str = "ipv4") -> dict[str, int]:
        """Packets that hit Istio's REDIRECT rules in `pod` so far (nat rules
        see the first packet of each connection): {"ISTIO_REDIRECT": n,
        "ISTIO_IN_REDIRECT": m}; 0 where the pod has no rules. `family`
        "ipv6" reads the ip6tables rules of a dual-stack pod. With nftables
        rules, the counters of the redirect rules of chains istio-redirect
        and istio-in-redirect, under the same keys."""
        if family not in topology.IP_FAMILIES:
            raise ValueError(f"family {family!r}: one of {', '.join(topology.IP_FAMILIES)}")
        p = self.pod(pod)
        if p.rules == "nftables":
            return _nft_redirect_counts(sandbox.sh("nft", "-j", "list", "ruleset", netns=p.netns))
        save = "iptables-save" if family == "ipv4" else "ip6tables-save"
        counts = {"ISTIO_REDIRECT": 0, "ISTIO_IN_REDIRECT": 0}
        for line in sandbox.sh(save, "-c", "-t", "nat", netns=p.netns).splitlines():
            # "[pkts:bytes] -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001"
            if line.startswith("[") and " -j REDIRECT" in line:
                packets = int(line[1:line.index(":")])
                chain = line.split()[2]
                if chain in counts:
                    counts[chain] += packets
        return counts

    def _running_sidecar(self, pod: str | Pod) -> EnvoySidecar | HAProxySidecar:
        if self.mode == "nomesh":
            raise TestbedError(f"no sidecars run in mode nomesh (pod {self.pod(pod).name})")
        return self.sidecar(pod)

    def sidecar_connections(self, pod: str | Pod) -> dict[str, int]:
        """Connections the pod's sidecar has accepted per listener (outbound,
        inbound, health) since it started."""
        return self._running_sidecar(pod).connection_counts()

    def sidecar_log(self, pod: str | Pod) -> list[ProxiedConnection]:
        """Every connection the pod's HAProxy sidecar forwarded with its
        original destination (needs proxy="haproxy", `sidecar_log=True` at `up`)."""
        sidecar = self._running_sidecar(pod)
        if not isinstance(sidecar, HAProxySidecar):
            raise TestbedError("sidecar_log is HAProxy's; with Envoy read sidecar_stats()")
        return sidecar.connections()

    def _running_envoy(self, pod: str | Pod) -> EnvoySidecar:
        sidecar = self._running_sidecar(pod)
        if not isinstance(sidecar, EnvoySidecar):
            raise TestbedError(f"the sidecars of test bed {self.name} are {self.proxy}, not Envoy")
        return sidecar

    def sidecar_stats(self, pod: str | Pod) -> dict[str, int]:
        """Every counter of the pod's Envoy (its admin /stats), by name: e.g.
        `cluster.outbound|8080||b.default.svc.cluster.local.upstream_cx_total`."""
        return self._running_envoy(pod).stats()

    def sidecar_tls_handshakes(self, pod: str | Pod) -> dict[str, int]:
        """TLS handshakes the pod's Envoy completed so far: {"outbound": as a
        client to other sidecars, "inbound": as the server on 15006}."""
        return self._running_envoy(pod).tls_handshakes()

    def status(self) -> dict:
        alive = {(r.role, r.owner): r.alive() for r in self.processes}
        return {
            "name": self.name, "mode": self.mode, "proxy": self.proxy, "mtls": self.mtls,
            "nodes": [{"name": n.name, "netns": n.netns, "cidr": n.cidr, "cgroup": n.cgroup,
                       "pods_file": str(self.pods_file(n)),
                       "agent": ({"metrics": self.agents[n.name], "ready": self.agent_ready(n)}
                                 if n.name in self.agents else None)} for n in self.nodes],
            "pods": [{"name": p.name, "node": p.node, "ip": p.ip, **self._ipv6_of(p), "netns": p.netns,
                      "meshed": p.meshed, **_install_summary(p), "app": alive.get(("app", p.name), False),
                      "sidecar": alive.get(("sidecar", p.name), False) if p.meshed else None}
                     for p in self.pods],
        }

    def summary(self) -> dict:
        """What `testbed up` prints."""
        return {"name": self.name, "mode": self.mode, "proxy": self.proxy, "mtls": self.mtls,
                "pods": [{"name": p.name, "node": p.node, "ip": p.ip, **self._ipv6_of(p), "netns": p.netns,
                          "meshed": p.meshed, **_install_summary(p)} for p in self.pods]}

    @staticmethod
    def _ipv6_of(pod: Pod) -> dict:
        """A dual-stack pod's IPv6 address and Service VIP, for status and summary."""
        return {"ip6": pod.ip6, "service_ip6": pod.service_ip6} if pod.ip6 else {}


def _install_options(spec: PodSpec, rules: str, mesh_defaults: dict[str, str], cni: bool) -> PodSpec:
    """`spec` with every install option it leaves unset taken from the bed's,
    checked; the proxy uid/gid resolved as the injector would (the pod's,
    else the mesh's proxyUID/proxyGID, else 1337; the gid defaults to the uid)."""
    chosen = spec.rules or rules
    if chosen not in istio_iptables.RULES_BACKENDS:
        raise ValueError(f"rules {chosen!r} (pod {spec.name}): one of {', '.join(istio_iptables.RULES_BACKENDS)}")
    merged = {**mesh_defaults, **(spec.mesh_defaults or {})}
    mesh = istio_iptables.MeshDefaults.from_dict(merged)      # raises ValueError on a bad name or value
    for what, value in (("proxy_uid", spec.proxy_uid), ("proxy_gid", spec.proxy_gid)):
        if value is not None and not (isinstance(value, int) and 0 < value < 2 ** 32 - 1):
            raise ValueError(f"{what} {value!r} (pod {spec.name}): a numeric id 1..4294967294")
    uid = spec.proxy_uid if spec.proxy_uid is not None else mesh.proxy_uid
    gid = spec.proxy_gid if spec.proxy_gid is not None else \
        (mesh.proxy_gid if mesh.proxy_gid is not None and spec.proxy_uid is None else uid)
    return dataclasses.replace(spec, rules=chosen, cni=cni if spec.cni is None else spec.cni, mesh_defaults=merged,
                               proxy_uid=uid, proxy_gid=gid)


def _install_summary(p: Pod) -> dict:
    if not p.meshed:
        return {}
    return {"rules": p.rules, "cni": p.cni, "mesh_defaults": p.mesh_defaults, "proxy_uid": p.proxy_uid,
            "proxy_gid": p.proxy_gid}


_NFT_REDIRECT_CHAINS = {"istio-redirect": "ISTIO_REDIRECT", "istio-in-redirect": "ISTIO_IN_REDIRECT"}


def _nft_redirect_counts(ruleset_json: str) -> dict[str, int]:
    """Packets counted by the redirect rules of table inet istio-proxy-nat in
    `nft -j list ruleset` output, keyed like the iptables chains."""
    counts = {"ISTIO_REDIRECT": 0, "ISTIO_IN_REDIRECT": 0}
    for item in json.loads(ruleset_json).get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule or rule.get("table") != istio_nftables.NAT or rule.get("chain") not in _NFT_REDIRECT_CHAINS:
            continue
        exprs = rule.get("expr", [])
        if any("redirect" in e for e in exprs):
            counts[_NFT_REDIRECT_CHAINS[rule["chain"]]] += sum(e["counter"]["packets"] for e in exprs if "counter" in e)
    return counts


def _programs_needed(specs: list[PodSpec], proxy: str, app: str, ip_families: tuple[str, ...]) -> list[str]:
    """The system programs a bed of these pods runs (scripts/system-programs.txt names their packages)."""
    needed = ["ip", "iptables", "iptables-restore", "iptables-save", "setpriv", "sysctl", "nsenter", "conntrack"]
    if "ipv6" in ip_families:
        needed += ["ip6tables-restore", "ip6tables-save"]
    if any(s.meshed and s.rules == "nftables" for s in specs):
        needed.append("nft")
    if proxy == "haproxy":
        needed.append("haproxy")
    if app == "nginx":
        needed.append("nginx")
    return needed


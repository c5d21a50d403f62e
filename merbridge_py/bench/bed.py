"""What the benchmark needs from a test bed, and the adapter onto
merbridge_py.testbed. The runner and the measurements see only `Bed`, so a
different bed (a loopback one in tests) fits without touching them.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import sandbox
from . import tcpstats
from ..testbed.options import DEFAULT_ENVOY_WORKERS, DEFAULT_MTLS, MTLS_MODES, PROXIES

SAME_NODE = "same-node"
CROSS_NODE = "cross-node"
PATHS = (SAME_NODE, CROSS_NODE)

MODES = ("nomesh", "iptables", "ebpf")

# The cgroup (under a node's) that holds a busy node's background load
BUSY_CGROUP = "bench-busy"


@dataclass(frozen=True)
class BenchPod:
    name: str
    node: str
    ip: str
    netns: str
    meshed: bool
    cgroup: Path | None = None
    ip6: str = ""       # its IPv6 address on a dual-stack bed, "" otherwise


class Bed(Protocol):
    pods: Sequence[BenchPod]
    # One sentence for the report: how settle() cleans up between mode blocks.
    settle_how: str

    def set_mode(self, mode: str) -> None: ...

    def settle(self) -> None: ...

    def spawn(self, pod: BenchPod, argv: list[str], **popen) -> subprocess.Popen: ...

    def pod_pids(self, pod: BenchPod) -> list[int]: ...

    def agent_pids(self) -> list[int]:
        """Per-node processes of the mode itself (merbridge-py agents in ebpf
        mode): their CPU is part of what a mode costs."""
        ...

    def namespaces(self) -> list[str]:
        """Every network namespace of the bed (nodes and pods), for the
        sysctl record."""
        ...

    def datapath_counters(self) -> dict[str, dict[str, float]]:
        """node -> the counters of its agent's /metrics (ebpf mode; empty in
        the other modes), to see per node what the datapath did in a run."""
        ...

    def tcp_counters(self) -> dict[str, dict[str, int]]:
        """node -> TCP's retransmission and timeout counters (tcpstats.COUNTERS)
        summed over the node's network namespace and its pods'."""
        ...

    def node_process(self, node: str, argv: list[str]) -> contextlib.AbstractContextManager:
        """Run argv on `node` (its network namespace, a cgroup of the node's
        that is no pod's) for a with-block, and stop it and every process
        it started by pid afterwards: the busy-node load (busy.py)."""
        ...

    # Optional: beds with Istio's rules also offer
    #   nat_redirects(pod) -> {"ipv4": n, "ipv6": m}
    # the packets that hit the pod's ISTIO_REDIRECT rule per family so far.


@dataclass(frozen=True)
class PodPair:
    client: BenchPod
    server: BenchPod


def pick_paths(pods: Sequence[BenchPod]) -> dict[str, PodPair]:
    """A meshed client pod with a meshed server on its own node and one on
    another node. Both paths share the client, so the only difference between
    them is where the server lives."""
    meshed = [p for p in pods if p.meshed]
    for client in meshed:
        same = [p for p in meshed if p.node == client.node and p is not client]
        cross = [p for p in meshed if p.node != client.node]
        if same and cross:
            return {SAME_NODE: PodPair(client, same[0]), CROSS_NODE: PodPair(client, cross[0])}
    raise ValueError("the bed needs two meshed pods on one node and a meshed pod on another "
                     f"node; it has {[(p.name, p.node, p.meshed) for p in pods]}")


def pids_of(pod: BenchPod) -> list[int]:
    """A pod's processes: its cgroup's when it has one (what Kubernetes counts
    as the pod), otherwise everything in its network namespace."""
    if pod.cgroup is not None:
        return sandbox.cgroup_pids(pod.cgroup)
    return sandbox.netns_pids(pod.netns)


class TestbedBed:
    """Bed over a running merbridge_py.testbed.Testbed."""

    settle_how = ("the test bed's settle() runs `conntrack -F` and `ss -K` on TIME_WAIT sockets in every "
                  "fabric, node and pod namespace, and checks that no TIME_WAIT socket is left; with HTTP "
                  "sidecars it also closes their pooled connections, so no mode inherits another's")

    def __init__(self, testbed) -> None:
        self._tb = testbed
        # What the bed actually runs (it fills in its own defaults)
        self.proxy: str = getattr(testbed, "proxy", "haproxy")
        self.mtls: str = getattr(testbed, "mtls", "off")
        self.envoy_workers: int | None = getattr(testbed, "envoy_workers", None) if self.proxy == "envoy" else None
        self.ip_families = tuple(getattr(testbed, "ip_families", ("ipv4",)))
        self.pods = [BenchPod(name=p.name, node=p.node, ip=p.ip, netns=p.netns, meshed=bool(p.meshed),
                              cgroup=Path(p.cgroup), ip6=getattr(p, "ip6", "") or "") for p in testbed.pods]

    def set_mode(self, mode: str) -> None:
        self._tb.set_mode(mode)

    def settle(self) -> None:
        self._tb.settle()

    def spawn(self, pod: BenchPod, argv: list[str], **popen) -> subprocess.Popen:
        return self._tb.spawn_in(pod.name, argv, **popen)

    def pod_pids(self, pod: BenchPod) -> list[int]:
        return pids_of(pod)

    def agent_pids(self) -> list[int]:
        return [r.pid for r in self._tb.processes if r.role == "agent" and r.alive()]

    def namespaces(self) -> list[str]:
        return list(self._tb.namespaces())

    def nat_redirects(self, pod: BenchPod) -> dict[str, int]:
        """Packets that hit `pod`'s ISTIO_REDIRECT rule so far, per IP family
        of the rules (iptables, and ip6tables on a dual-stack bed). Its
        increase during a run is the number of the client's connections
        iptables redirected: none in ebpf mode, or the run was not eBPF's."""
        if not pod.meshed or self._tb.mode == "nomesh":
            return {}
        return {family: self._tb.nat_counters(pod.name, family)["ISTIO_REDIRECT"] for family in self.ip_families}

    def tcp_counters(self) -> dict[str, dict[str, int]]:
        return {node.name: tcpstats.total(tcpstats.read_namespace(ns) for ns in
                                          [node.netns] + [p.netns for p in self._tb.pods if p.node == node.name])
                for node in self._tb.nodes}

    @contextlib.contextmanager
    def node_process(self, node: str, argv: list[str]) -> Iterator[subprocess.Popen]:
        n = self._tb.node(node)
        # a sibling of the node's pod cgroups: inside the node, in no pod
        cgroup = sandbox.cgroup_create(Path(n.cgroup) / BUSY_CGROUP)
        try:
            proc = sandbox.spawn(argv, netns=n.netns, cgroup=cgroup, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                try:
                    proc.wait(timeout=0.3)      # one that cannot start (not installed) ends at once
                except subprocess.TimeoutExpired:
                    pass
                else:
                    raise RuntimeError(f"{argv[0]} on node {node} exited at once with {proc.returncode}: is it "
                                       "installed? (scripts/install-system-deps.sh installs it)")
                yield proc
            finally:
                sandbox.stop(proc)
        finally:
            # workers the parent left behind are ours (in our cgroup): ended by pid, then the cgroup goes
            sandbox.cgroup_remove(cgroup)

    def tls_handshakes(self) -> dict[str, dict[str, int]]:
        """pod -> TLS handshakes its Envoy completed since it started (as a
        client: "outbound", as a server: "inbound"): the witness that the
        sidecar-to-sidecar leg was mutual TLS. Empty without Envoy sidecars."""
        if self.proxy != "envoy" or self._tb.mode == "nomesh":
            return {}
        return {p.name: self._tb.sidecar_tls_handshakes(p.name) for p in self.pods if p.meshed}

    def datapath_counters(self) -> dict[str, dict[str, float]]:
        if self._tb.mode != "ebpf":
            return {}
        return {node.name: {k: v for k, v in self._tb.agent_metrics(node).items() if k.startswith("merbridge_")}
                for node in self._tb.nodes}


def add_sidecar_options(parser) -> None:
    """The sidecar options of `merbridge-py bench`, for the profilers in
    benchmarks/ (argparse), so they run on the same sidecars as the bench."""
    parser.add_argument("--proxy", choices=PROXIES, default="envoy")
    parser.add_argument("--mtls", choices=MTLS_MODES, default=None,
                        help=f"[the test bed's default: Istio's, {DEFAULT_MTLS}]")
    parser.add_argument("--envoy-workers", type=int, default=DEFAULT_ENVOY_WORKERS,
                        help=f"Envoy worker threads (Istio's default {DEFAULT_ENVOY_WORKERS})")
    parser.add_argument("--path", choices=PATHS, default=SAME_NODE,
                        help="client and server pod on one node, or on two")


def sidecar_kwargs(args) -> dict:
    """Testbed.up keyword arguments for the options above."""
    kwargs = {"proxy": args.proxy}
    if args.mtls is not None:
        kwargs["mtls"] = args.mtls
    if args.proxy == "envoy":
        kwargs["envoy_workers"] = args.envoy_workers
    return kwargs


def profiler_pair(tb, path: str) -> tuple:
    """(client pod, server pod) of a test bed for `path`: the same pods
    merbridge-py bench picks (pick_paths), as the bed's own Pod objects."""
    pods = TestbedBed(tb).pods
    if path == SAME_NODE and len({p.node for p in pods}) == 1:
        meshed = [p for p in pods if p.meshed]     # a one-node bed has no cross-node pair to pick
        return tb.pod(meshed[0].name), tb.pod(meshed[1].name)
    pair = pick_paths(pods)[path]
    return tb.pod(pair.client.name), tb.pod(pair.server.name)


@contextlib.contextmanager
def testbed(name: str, nodes: int = 2, pods_per_node: int = 2, mode: str = "nomesh",
            app: str = "nginx", http_ports: tuple[int, ...] = (), proxy: str = "envoy",
            mtls: str | None = None, envoy_workers: int | None = None,
            ip_families: tuple[str, ...] = ("ipv4",)) -> Iterator[TestbedBed]:
    """Bring a test bed up for the benchmark and always take it down. The pods'
    app is nginx: the Python test app spends hundreds of microseconds of CPU
    per request, which would hide the cost of the mesh being measured.
    `http_ports`: ports the sidecars proxy as HTTP with pooled upstream
    connections. `mtls` and `envoy_workers` left None take the bed's own
    defaults (Istio's), which the returned bed reports. `ip_families`
    ("ipv4", "ipv6"): a dual-stack bed, for clients on AF_INET6 sockets."""
    try:
        from ..testbed import Testbed
    except ImportError as e:
        raise RuntimeError(f"the test bed (merbridge_py.testbed) is not available: {e}") from e
    sidecar = {"proxy": proxy}
    if mtls is not None:
        sidecar["mtls"] = mtls
    if envoy_workers is not None:
        sidecar["envoy_workers"] = envoy_workers
    if tuple(ip_families) != ("ipv4",):
        sidecar["ip_families"] = tuple(ip_families)
    with Testbed.up(name, nodes=nodes, pods_per_node=pods_per_node, mode=mode, app=app,
                    http_ports=http_ports, **sidecar) as tb:
        yield TestbedBed(tb)

"""Nodes and pods as network namespaces and cgroups.

  fabric   netns mbp-<tb>-fabric: bridge br0, one veth per node (the "wire"
           between machines); 172.31.0.0/24, node N at 172.31.0.(10+N)
  node N   netns mbp-<tb>-nodeN: bridge br0 = 10.S.N.1/24 (the pods'
           gateway), uplink veth into the fabric, a route to every other
           node's pod CIDR, ip_forward on; cgroup <cgroup2>/mbp-<tb>/nodeN
  pod      netns mbp-<tb>-pod-<name>: eth0 = 10.S.N.(10+i)/24, veth into
           its node's bridge, default route via the node;
           cgroup <cgroup2>/mbp-<tb>/nodeN/<name>
  service  every pod is also the one endpoint of a Service whose virtual IP
           is 10.96.N.(10+i). There is no kube-proxy: like Envoy, the
           sidecars resolve service IPs to endpoints, so service IPs work
           from meshed pods only. A pod calling its own service IP is how a
           proxy ends up connecting to its own pod.

S is 200 + the test bed's slot (the lowest free one when it came up), so
pod IPs never repeat across test beds that run side by side: an agent finds a
pod's namespace by its IP, host-wide.

Cross-node traffic leaves the pod, is routed by its node, crosses the fabric
and is routed again by the other node: two namespaces, as between machines.
Nothing is created in the root network namespace; sysctls are set only inside
these namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import sandbox

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,19}$")     # no '-': keeps every prefix unique
POD_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAX_NODES = 200
MAX_PODS_PER_NODE = 200
MAX_SLOTS = 50
APP_PORT = 8080
FABRIC_CIDR = "172.31.0.0/24"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"test bed name {name!r}: use 1-20 lowercase letters and digits, starting with a letter "
                         "(no '-': resources are named mbp-<name>-...)")
    return name


def prefix(name: str) -> str:
    """Every network namespace and bpffs directory of test bed `name` starts with this."""
    return f"{sandbox.OWNED_PREFIX}{name}-"


def cgroup_dir(name: str) -> Path:
    return sandbox.cgroup2_root() / f"{sandbox.OWNED_PREFIX}{name}"


@dataclass(frozen=True)
class PodSpec:
    """What a test wants of a pod; the test bed picks IP, netns and cgroup."""

    name: str
    node: int = 0
    meshed: bool = True
    annotations: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = (APP_PORT,)
    # How Istio was installed for this pod (None: the bed's value, see Testbed.up):
    rules: str | None = None                  # "iptables" (istio-iptables) or "nftables" (native nftables)
    cni: bool | None = None                   # istio-cni (istio-validation) instead of istio-init
    mesh_defaults: dict[str, str] | None = None   # helm global.proxy.* values by name (istio_iptables.MeshDefaults)
    proxy_uid: int | None = None              # the sidecar's uid (-u, runAsUser); default the mesh's proxyUID
    proxy_gid: int | None = None              # its gid (-g, runAsGroup); default the uid


@dataclass
class Node:
    name: str
    index: int
    netns: str
    cidr: str
    gateway: str
    host_ip: str
    cgroup: str
    bpffs: str


@dataclass
class Pod:
    name: str
    node: str
    ip: str
    netns: str
    meshed: bool
    cgroup: str
    annotations: dict[str, str]
    ports: list[int]
    veth: str       # the pod's veth end in its node's namespace
    service_ip: str  # virtual IP of the Service whose only endpoint is this pod
    rules: str = "iptables"          # the PodSpec's install options, resolved
    cni: bool = False
    mesh_defaults: dict[str, str] = field(default_factory=dict)
    proxy_uid: int = 1337
    proxy_gid: int = 1337

    def to_json(self) -> dict:
        return asdict(self)


def default_specs(nodes: int, pods_per_node: int, plain_per_node: int = 0) -> list[PodSpec]:
    """`pods_per_node` pods on each node, named n<node>p<i>; the last
    `plain_per_node` of each node are not meshed."""
    return [PodSpec(name=f"n{n}p{i}", node=n, meshed=i < pods_per_node - plain_per_node)
            for n in range(nodes) for i in range(pods_per_node)]


def pod_supernet(slot: int) -> str:
    if not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be 0..{MAX_SLOTS - 1}, got {slot}")
    return f"10.{200 + slot}"


def plan(name: str, specs: list[PodSpec], nodes: int | None = None,
         slot: int = 0) -> tuple[list[Node], list[Pod], str]:
    """Names and addresses of everything a test bed will create (nothing is
    created here): (nodes, pods, fabric netns)."""
    check_name(name)
    net = pod_supernet(slot)
    n_nodes = nodes if nodes is not None else max((s.node for s in specs), default=0) + 1
    if not 1 <= n_nodes <= MAX_NODES:
        raise ValueError(f"nodes must be 1..{MAX_NODES}, got {n_nodes}")
    seen = set()
    for s in specs:
        if not POD_NAME_RE.match(s.name):
            raise ValueError(f"pod name {s.name!r}: lowercase letters, digits and '-', starting with a letter")
        if s.name in seen:
            raise ValueError(f"pod name {s.name!r} is used twice")
        if not 0 <= s.node < n_nodes:
            raise ValueError(f"pod {s.name!r} is on node {s.node}, but the test bed has {n_nodes} nodes")
        seen.add(s.name)
    pfx = prefix(name)
    cg = cgroup_dir(name)
    node_list = [Node(name=f"node{n}", index=n, netns=f"{pfx}node{n}", cidr=f"{net}.{n}.0/24",
                      gateway=f"{net}.{n}.1", host_ip=f"172.31.0.{10 + n}", cgroup=str(cg / f"node{n}"),
                      bpffs=f"/sys/fs/bpf/{pfx}node{n}")
                 for n in range(n_nodes)]
    pods = []
    per_node: dict[int, int] = {}
    for s in specs:
        i = per_node.get(s.node, 0)
        if i >= MAX_PODS_PER_NODE:
            raise ValueError(f"more than {MAX_PODS_PER_NODE} pods on node {s.node}")
        per_node[s.node] = i + 1
        pods.append(Pod(name=s.name, node=f"node{s.node}", ip=f"{net}.{s.node}.{10 + i}", netns=f"{pfx}pod-{s.name}",
                        meshed=s.meshed, cgroup=str(cg / f"node{s.node}" / s.name), annotations=dict(s.annotations),
                        ports=list(s.ports), veth=f"p{i}", service_ip=f"10.96.{s.node}.{10 + i}",
                        rules=s.rules or "iptables", cni=bool(s.cni), mesh_defaults=dict(s.mesh_defaults or {}),
                        proxy_uid=1337 if s.proxy_uid is None else s.proxy_uid,
                        proxy_gid=(1337 if s.proxy_uid is None else s.proxy_uid) if s.proxy_gid is None
                        else s.proxy_gid))
    return node_list, pods, f"{pfx}fabric"


# --- creating and removing the network ------------------------------------------

def _ip_batch(netns: str, commands: list[str]) -> None:
    """Several `ip` commands in one namespace with one process."""
    sandbox.sh("ip", "-n", netns, "-batch", "-", input="\n".join(commands) + "\n")


def _sysctl(netns: str, key: str, value: str) -> None:
    sandbox.sh("sysctl", "-q", "-w", f"{key}={value}", netns=netns)


def create_fabric(fabric: str) -> None:
    sandbox.netns_add(fabric)
    _ip_batch(fabric, ["link add br0 type bridge", "link set br0 up"])


def create_node(node: Node, fabric: str, all_nodes: list[Node]) -> None:
    sandbox.netns_add(node.netns)
    prefix_len = ipaddress.ip_network(FABRIC_CIDR).prefixlen
    # the wire: fabric end "nN" on the fabric bridge, node end "uplink"
    _ip_batch(fabric, [f"link add n{node.index} type veth peer name uplink netns {node.netns}",
                       f"link set n{node.index} master br0", f"link set n{node.index} up"])
    commands = ["link add br0 type bridge", f"addr add {node.gateway}/24 dev br0", "link set br0 up",
                f"addr add {node.host_ip}/{prefix_len} dev uplink", "link set uplink up"]
    commands += [f"route add {other.cidr} via {other.host_ip} dev uplink" for other in all_nodes if other is not node]
    _ip_batch(node.netns, commands)
    _sysctl(node.netns, "net.ipv4.ip_forward", "1")
    sandbox.cgroup_create(Path(node.cgroup))


def create_pod(pod: Pod, node: Node) -> None:
    sandbox.netns_add(pod.netns)
    _ip_batch(node.netns, [f"link add {pod.veth} type veth peer name eth0 netns {pod.netns}",
                           f"link set {pod.veth} master br0", f"link set {pod.veth} up"])
    _ip_batch(pod.netns, [f"addr add {pod.ip}/24 dev eth0", "link set eth0 up",
                          f"route add default via {node.gateway} dev eth0"])
    sandbox.cgroup_create(Path(pod.cgroup))


def owned_netns(name: str) -> list[str]:
    return sandbox.netns_list(prefix(name))


def remove_network(name: str) -> None:
    """Delete every namespace of test bed `name` (pods first, so their veths
    disappear with them)."""
    spaces = owned_netns(name)
    for ns in sorted(spaces, key=lambda n: ("-pod-" not in n, n)):
        sandbox.netns_delete(ns)

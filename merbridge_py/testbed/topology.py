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

Dual stack (`ip_families=("ipv4", "ipv6")`): every address above gets an
IPv6 twin in a unique local (ULA, fd00::/8) prefix that also carries S, so
IPv6 addresses never repeat across beds either; the digits mirror the IPv4
ones (read as hex groups):
  fabric   fd31:S::(10+N)/64                     (172.31.0.(10+N))
  node N   br0 = fd10:S:N::1/64, routes to every other node's fd10:S:M::/64
           via fd31:S::(10+M); IPv6 forwarding on
  pod      eth0 = fd10:S:N::(10+i)/64            (10.S.N.(10+i))
  service  fd96:S:N::(10+i)                      (10.96.N.(10+i))
IPv6 is switched on (and duplicate address detection off, `nodad` on every
address) by sysctls inside the bed's own namespaces only.

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
from . import userns_pod

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,19}$")     # no '-': keeps every prefix unique
POD_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
MAX_NODES = 200
MAX_PODS_PER_NODE = 200
MAX_SLOTS = 50
APP_PORT = 8080
FABRIC_CIDR = "172.31.0.0/24"
IP_FAMILIES = ("ipv4", "ipv6")
IPV4_ONLY = ("ipv4",)
DUAL_STACK = ("ipv4", "ipv6")
IPV6_PREFIX_LEN = 64


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
    # The ports the bed's own app serves (None: all of `ports`). The others are
    # still declared (the sidecars give them Service clusters and mTLS), and a
    # test serves them with an app of its own (tests/test_fionread_apps.py).
    app_ports: tuple[int, ...] | None = None
    # How Istio was installed for this pod (None: the bed's value, see Testbed.up):
    rules: str | None = None                  # "iptables" (istio-iptables) or "nftables" (native nftables)
    cni: bool | None = None                   # istio-cni (istio-validation) instead of istio-init
    mesh_defaults: dict[str, str] | None = None   # helm global.proxy.* values by name (istio_iptables.MeshDefaults)
    proxy_uid: int | None = None              # the sidecar's uid (-u, runAsUser); default the mesh's proxyUID
    proxy_gid: int | None = None              # its gid (-g, runAsGroup); default the uid
    # False: the pod runs in its own user namespace (Kubernetes' hostUsers: false), ids 0-65535
    # inside = 100000-165535 on the host, owning its network namespace (testbed/userns_pod.py)
    host_users: bool = True


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
    # IPv6 twins of cidr/gateway/host_ip; "" in an IPv4-only bed
    cidr6: str = ""
    gateway6: str = ""
    host_ip6: str = ""


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
    ip6: str = ""          # the pod's IPv6 address; "" in an IPv4-only bed
    service_ip6: str = ""  # the Service's IPv6 virtual IP (a dual-stack Service); "" in an IPv4-only bed
    rules: str = "iptables"          # the PodSpec's install options, resolved
    cni: bool = False
    mesh_defaults: dict[str, str] = field(default_factory=dict)
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    host_users: bool = True   # False: its own user namespace (PodSpec.host_users)
    app_ports: list[int] | None = None   # PodSpec.app_ports

    @property
    def bed_app_ports(self) -> list[int]:
        """The ports the bed's own app listens on."""
        return self.ports if self.app_ports is None else self.app_ports

    def host_id(self, inner: int) -> int:
        """The host's view of uid/gid `inner` of this pod's processes."""
        return inner if self.host_users else userns_pod.HOST_ID_BASE + inner

    @property
    def ips(self) -> list[str]:
        """Every address of the pod, IPv4 first (status.podIPs order of an
        IPv4-primary dual-stack cluster)."""
        return [ip for ip in (self.ip, self.ip6) if ip]

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


def check_ip_families(ip_families) -> tuple[str, ...]:
    """("ipv4",) or ("ipv4", "ipv6"): the bed's pods always have IPv4 (the
    datapath and every other test assume it); IPv6 comes on top."""
    families = tuple(ip_families)
    if families not in (IPV4_ONLY, DUAL_STACK):
        raise ValueError(f"ip_families {ip_families!r}: {IPV4_ONLY!r} or {DUAL_STACK!r}")
    return families


def _v6(first: str, slot: int, *groups: int | str) -> str:
    """An address of the ULA plan above: decimal numbers written as hex groups
    (fd10:S:N::10+i), so the IPv6 address reads like its IPv4 twin."""
    tail = groups[-1]
    head = ":".join(str(g) for g in (first, 200 + slot) + tuple(groups[:-1]))
    return str(ipaddress.IPv6Address(f"{head}::{tail}"))


def plan(name: str, specs: list[PodSpec], nodes: int | None = None,
         slot: int = 0, ip_families=IPV4_ONLY) -> tuple[list[Node], list[Pod], str]:
    """Names and addresses of everything a test bed will create (nothing is
    created here): (nodes, pods, fabric netns)."""
    check_name(name)
    dual = check_ip_families(ip_families) == DUAL_STACK
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
    if dual:
        for node in node_list:
            n = node.index
            node.cidr6 = str(ipaddress.IPv6Network(f"{_v6('fd10', slot, n, 0)}/{IPV6_PREFIX_LEN}"))
            node.gateway6 = _v6("fd10", slot, n, 1)
            node.host_ip6 = _v6("fd31", slot, 10 + n)
    pods = []
    per_node: dict[int, int] = {}
    for s in specs:
        i = per_node.get(s.node, 0)
        if i >= MAX_PODS_PER_NODE:
            raise ValueError(f"more than {MAX_PODS_PER_NODE} pods on node {s.node}")
        per_node[s.node] = i + 1
        if s.app_ports is not None and not set(s.app_ports) <= set(s.ports):
            raise ValueError(f"pod {s.name}: app_ports {list(s.app_ports)} are not all among its ports {list(s.ports)}")
        pods.append(Pod(name=s.name, node=f"node{s.node}", ip=f"{net}.{s.node}.{10 + i}", netns=f"{pfx}pod-{s.name}",
                        meshed=s.meshed, cgroup=str(cg / f"node{s.node}" / s.name), annotations=dict(s.annotations),
                        ports=list(s.ports), veth=f"p{i}", service_ip=f"10.96.{s.node}.{10 + i}",
                        rules=s.rules or "iptables", cni=bool(s.cni), mesh_defaults=dict(s.mesh_defaults or {}),
                        proxy_uid=1337 if s.proxy_uid is None else s.proxy_uid,
                        proxy_gid=(1337 if s.proxy_uid is None else s.proxy_uid) if s.proxy_gid is None
                        else s.proxy_gid, host_users=s.host_users,
                        app_ports=None if s.app_ports is None else list(s.app_ports)))
        if dual:
            pods[-1].ip6 = _v6("fd10", slot, s.node, 10 + i)
            pods[-1].service_ip6 = _v6("fd96", slot, s.node, 10 + i)
    return node_list, pods, f"{pfx}fabric"


# --- creating and removing the network ------------------------------------------

def _ip_batch(netns: str, commands: list[str]) -> None:
    """Several `ip` commands in one namespace with one process."""
    sandbox.sh("ip", "-n", netns, "-batch", "-", input="\n".join(commands) + "\n")


def _sysctl(netns: str, key: str, value: str) -> None:
    sandbox.sh("sysctl", "-q", "-w", f"{key}={value}", netns=netns)


def enable_ipv6(netns: str, forwarding: bool = False) -> None:
    """IPv6 on in one of the bed's namespaces (whatever the host's defaults
    are), without duplicate address detection: addresses are usable at once.
    Before any interface is added, so every new one inherits `default`."""
    settings = [f"net.ipv6.conf.{scope}.{key}={value}" for scope in ("all", "default")
                for key, value in (("disable_ipv6", "0"), ("accept_dad", "0"))]
    if forwarding:
        settings.append("net.ipv6.conf.all.forwarding=1")
    sandbox.sh("sysctl", "-q", "-w", *settings, netns=netns)


def create_fabric(fabric: str, dual_stack: bool = False) -> None:
    sandbox.netns_add(fabric)
    if dual_stack:
        enable_ipv6(fabric)
    _ip_batch(fabric, ["link add br0 type bridge", "link set br0 up"])


def create_node(node: Node, fabric: str, all_nodes: list[Node]) -> None:
    sandbox.netns_add(node.netns)
    if node.cidr6:
        enable_ipv6(node.netns, forwarding=True)
    prefix_len = ipaddress.ip_network(FABRIC_CIDR).prefixlen
    # the wire: fabric end "nN" on the fabric bridge, node end "uplink"
    _ip_batch(fabric, [f"link add n{node.index} type veth peer name uplink netns {node.netns}",
                       f"link set n{node.index} master br0", f"link set n{node.index} up"])
    commands = ["link add br0 type bridge", f"addr add {node.gateway}/24 dev br0", "link set br0 up",
                f"addr add {node.host_ip}/{prefix_len} dev uplink", "link set uplink up"]
    commands += [f"route add {other.cidr} via {other.host_ip} dev uplink" for other in all_nodes if other is not node]
    if node.cidr6:
        commands += [f"addr add {node.gateway6}/{IPV6_PREFIX_LEN} dev br0 nodad",
                     f"addr add {node.host_ip6}/{IPV6_PREFIX_LEN} dev uplink nodad"]
        commands += [f"route add {other.cidr6} via {other.host_ip6} dev uplink"
                     for other in all_nodes if other is not node]
    _ip_batch(node.netns, commands)
    _sysctl(node.netns, "net.ipv4.ip_forward", "1")
    sandbox.cgroup_create(Path(node.cgroup))


def create_pod(pod: Pod, node: Node) -> None:
    if pod.host_users:
        sandbox.netns_add(pod.netns)
    else:
        # its pause: owns the user namespace that owns the network namespace; in the
        # pod's cgroup, so removing the cgroup ends it
        sandbox.cgroup_create(Path(pod.cgroup))
        holder = userns_pod.start_holder(cgroup=Path(pod.cgroup), start_new_session=True)
        sandbox.netns_bind(pod.netns, f"/proc/{holder.pid}/ns/net")
        sandbox.sh("ip", "link", "set", "lo", "up", netns=pod.netns)
    if pod.ip6:
        enable_ipv6(pod.netns)
    _ip_batch(node.netns, [f"link add {pod.veth} type veth peer name eth0 netns {pod.netns}",
                           f"link set {pod.veth} master br0", f"link set {pod.veth} up"])
    commands = [f"addr add {pod.ip}/24 dev eth0", "link set eth0 up", f"route add default via {node.gateway} dev eth0"]
    if pod.ip6:
        commands += [f"addr add {pod.ip6}/{IPV6_PREFIX_LEN} dev eth0 nodad",
                     f"route add ::/0 via {node.gateway6} dev eth0"]
    _ip_batch(pod.netns, commands)
    sandbox.cgroup_create(Path(pod.cgroup))


def owned_netns(name: str) -> list[str]:
    return sandbox.netns_list(prefix(name))


def remove_network(name: str) -> None:
    """Delete every namespace of test bed `name` (pods first, so their veths
    disappear with them)."""
    spaces = owned_netns(name)
    for ns in sorted(spaces, key=lambda n: ("-pod-" not in n, n)):
        sandbox.netns_delete(ns)

"""Random meshed pods and random probes for the equivalence matrix, drawn
from a seeded random.Random so any run can be repeated from its seed.

Pods: install options (rules backend iptables or nftables, istio-init or
istio-cni, mesh-wide injection defaults, proxy uid 1337 or another) and
annotation sets Istio's injector accepts (traffic.sidecar.istio.io/
include/exclude OutboundIPRanges, include/exclude OutboundPorts,
include/exclude InboundPorts, status.sidecar.istio.io/port) whose address
ranges are drawn from the bed's own address plan (topology.py: pod IPs
10.<200+slot>.<node>.<10+i>, Service IPs 10.96.<node>.<10+i>), so every
range covers some of the bed's pods and misses others. The slot must be the
one the bed will get (`next_slot`); the caller checks it got that slot.

Some meshed pods also capture DNS (Istio's ISTIO_META_DNS_CAPTURE proxy
metadata, so the bed runs Istio's DNS proxy in them), and `userns_per_node`
more run in their own user namespace (hostUsers: false; istio-init, proxy
uid 1337 inside: a uid from another range has no id inside the pod's
65536-id user namespace).

Probes (for a bed that is up): for each meshed pod, one destination inside
each address range of its annotations, a few drawn at random (meshed pods,
their Service IPs, a plain pod outside the mesh, the pod itself), and
inbound requests to it from a plain pod; ports from the ports the pods
serve, one nobody serves, the default status port and the pod's own. Then
issue 20's kinds: some of those outbound requests again from a v4-mapped
AF_INET6 socket and again as the pod's proxy uid (which must go out
directly), DNS lookups of a mesh name and an outside name over drawn
transports (also as the proxy, in a pod that captures DNS), and on a
dual-stack bed native IPv6 requests out of and into the pod.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from dataclasses import dataclass

from . import istio_iptables as ii
from . import state, topology
from .probes import Probe
from .topology import Pod, PodSpec

SERVED_PORTS = (8080, 9090)     # every drawn pod serves these
UNSERVED_PORT = 7070            # nobody listens: refused, directly or behind a sidecar
STATUS_PORTS = ("15020", "15030")   # Istio's default and a moved status port
OTHER_PROXY_UID = 1000720000    # an OpenShift-style uid from a namespace's range
DNS_CAPTURE = {"proxy.istio.io/config": 'proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: "true"\n'}
DNS_NAMES = ("mesh.dns.test", "outside.dns.test")   # one the DNS proxy answers, one only the server knows
DNS_TRANSPORTS = ("unconnected", "connected", "tcp", "unconnected6", "connected6", "tcp6")


def next_slot() -> int:
    """The slot Testbed.up() gives the next bed (the lowest free one)."""
    free = sorted(set(range(topology.MAX_SLOTS)) - state.used_slots())
    if not free:
        raise RuntimeError("no free test bed slot")
    return free[0]


@dataclass(frozen=True)
class AddressPlan:
    """Addresses of the pods a draw will create, known before the bed exists."""

    slot: int
    nodes: int
    per_node: int        # pods per node, meshed and plain

    def pod_ip(self, node: int, i: int) -> str:
        return f"{topology.pod_supernet(self.slot)}.{node}.{10 + i}"

    def service_ip(self, node: int, i: int) -> str:
        return f"10.96.{node}.{10 + i}"

    def ranges(self, rng: random.Random) -> str:
        """One to two CIDRs, each covering part of the bed."""
        net = topology.pod_supernet(self.slot)
        node, i = rng.randrange(self.nodes), rng.randrange(self.per_node)
        choices = [f"{net}.{node}.0/24", f"{net}.0.0/16", f"{net}.{node}.16/28", f"{self.pod_ip(node, i)}/32",
                   "10.96.0.0/16", f"10.96.{node}.0/24", f"{self.service_ip(node, i)}/32", "10.0.0.0/8"]
        return ",".join(rng.sample(choices, rng.choice((1, 1, 2))))


def _ports(rng: random.Random, most: int = 2) -> str:
    pool = [str(p) for p in (*SERVED_PORTS, UNSERVED_PORT)] + ["15020"]
    return ",".join(rng.sample(pool, rng.randint(1, most)))


def draw_annotations(rng: random.Random, plan: AddressPlan) -> dict[str, str]:
    """A valid annotation set; each annotation present with its own odds."""
    ann: dict[str, str] = {}
    include = rng.random()
    if include < 0.15:
        # capture nothing by address, only the listed ports
        ann[ii.ANN_INCLUDE_OUTBOUND_IP_RANGES] = ""
        ann[ii.ANN_INCLUDE_OUTBOUND_PORTS] = _ports(rng)
    elif include < 0.45:
        ann[ii.ANN_INCLUDE_OUTBOUND_IP_RANGES] = plan.ranges(rng)
    if rng.random() < 0.4:
        ann[ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES] = plan.ranges(rng)
    if rng.random() < 0.3:
        ann[ii.ANN_EXCLUDE_OUTBOUND_PORTS] = _ports(rng)
    if rng.random() < 0.15 and ii.ANN_INCLUDE_OUTBOUND_PORTS not in ann:
        ann[ii.ANN_INCLUDE_OUTBOUND_PORTS] = _ports(rng, 1)
    inbound = rng.random()
    if inbound < 0.1:
        ann[ii.ANN_INCLUDE_INBOUND_PORTS] = ""                   # no inbound capture at all
    elif inbound < 0.3:
        ann[ii.ANN_INCLUDE_INBOUND_PORTS] = _ports(rng)
    elif inbound < 0.6:
        ann[ii.ANN_EXCLUDE_INBOUND_PORTS] = _ports(rng)
    if rng.random() < 0.3:
        ann[ii.ANN_STATUS_PORT] = rng.choice(STATUS_PORTS)
    return ann


def draw_mesh_defaults(rng: random.Random, plan: AddressPlan) -> dict[str, str]:
    """Mesh-wide injection values (helm global.proxy.* names) the pod was
    injected with; none for about half the pods."""
    mesh: dict[str, str] = {}
    if rng.random() < 0.5:
        return mesh
    if rng.random() < 0.35:
        mesh["excludeIPRanges"] = plan.ranges(rng)
    if rng.random() < 0.15:
        mesh["includeIPRanges"] = plan.ranges(rng)
    if rng.random() < 0.25:
        mesh["excludeOutboundPorts"] = _ports(rng)
    if rng.random() < 0.1:
        mesh["includeOutboundPorts"] = _ports(rng, 1)
    if rng.random() < 0.2:
        mesh["excludeInboundPorts"] = _ports(rng)
    if rng.random() < 0.15:
        mesh["statusPort"] = rng.choice(STATUS_PORTS)
    if rng.random() < 0.25:
        mesh["proxyUID"] = str(OTHER_PROXY_UID)
    return mesh


def draw_install(rng: random.Random, plan: AddressPlan, rules: str | None = None) -> dict:
    """PodSpec install options: rules backend (`rules`, else drawn),
    istio-init or istio-cni, mesh-wide defaults, proxy uid (the pod's own,
    else the mesh's)."""
    drawn = rng.choice(("iptables", "nftables"))
    return {"rules": rules or drawn, "cni": rng.random() < 0.4,
            "mesh_defaults": draw_mesh_defaults(rng, plan),
            "proxy_uid": OTHER_PROXY_UID if rng.random() < 0.25 else None}


def draw_pods(rng: random.Random, slot: int, meshed_per_node: int, nodes: int = 2,
              plain_per_node: int = 1, userns_per_node: int = 0, dns_capture: float = 0.25,
              rules: str | None = None) -> list[PodSpec]:
    """`meshed_per_node` drawn meshed pods, `userns_per_node` drawn meshed pods
    in their own user namespace and `plain_per_node` plain pods (outside the
    mesh) per node, in the order topology.plan numbers them. `dns_capture`:
    the odds that a pod captures DNS (never a user-namespaced one: the bed's
    DNS proxy files are not laid out for it; nor Istio's nftables rules
    under istio-cni, which capture all DNS, a case the bed does not model).
    `rules`: every pod's rules backend (a dual-stack bed needs "iptables"),
    else drawn."""
    plan = AddressPlan(slot, nodes, meshed_per_node + userns_per_node + plain_per_node)
    specs = []
    for node in range(nodes):
        for i in range(meshed_per_node):
            annotations, install = draw_annotations(rng, plan), draw_install(rng, plan, rules)
            if rng.random() < dns_capture and not (install["rules"] == "nftables" and install["cni"]):
                annotations.update(DNS_CAPTURE)
            specs.append(PodSpec(f"m{node}x{i}", node=node, annotations=annotations, ports=SERVED_PORTS,
                                 **install))
        for i in range(userns_per_node):
            install = draw_install(rng, plan, rules)
            mesh = {k: v for k, v in install["mesh_defaults"].items() if k != "proxyUID"}
            specs.append(PodSpec(f"u{node}x{i}", node=node, annotations=draw_annotations(rng, plan),
                                 ports=SERVED_PORTS, rules=install["rules"], cni=False, mesh_defaults=mesh,
                                 host_users=False))
        for i in range(plain_per_node):
            specs.append(PodSpec(f"plain{node}x{i}", node=node, meshed=False, ports=SERVED_PORTS))
    return specs


def describe_pod(spec: PodSpec) -> str:
    short = {ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "inIPs", ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES: "exIPs",
             ii.ANN_INCLUDE_OUTBOUND_PORTS: "inOutPorts", ii.ANN_EXCLUDE_OUTBOUND_PORTS: "exOutPorts",
             ii.ANN_INCLUDE_INBOUND_PORTS: "inInPorts", ii.ANN_EXCLUDE_INBOUND_PORTS: "exInPorts",
             ii.ANN_STATUS_PORT: "status"}
    ann = " ".join(f"{short.get(k, k)}={v!r}" for k, v in sorted(spec.annotations.items()))
    mesh = " ".join(f"{k}={v!r}" for k, v in sorted((spec.mesh_defaults or {}).items()))
    install = f"{spec.rules or 'iptables'} {'istio-cni' if spec.cni else 'istio-init'}"
    install += "" if spec.host_users else " hostUsers=false"
    uid = f" uid {spec.proxy_uid}" if spec.proxy_uid is not None else ""
    return (f"{spec.name} node{spec.node} {install}{uid}; annotations: {ann or '-'}; "
            f"mesh: {mesh or '-'}")


def _cidrs(value: str) -> list[ipaddress.IPv4Network]:
    out = []
    for item in value.split(","):
        item = item.strip()
        if item and item != "*":
            out.append(ipaddress.ip_network(item, strict=False))
    return out


def _port_pool(pod: Pod) -> list[int]:
    status = int(pod.annotations.get(ii.ANN_STATUS_PORT,
                                     pod.mesh_defaults.get("statusPort", ii.DEFAULT_STATUS_PORT)))
    return sorted({*SERVED_PORTS, UNSERVED_PORT, int(ii.DEFAULT_STATUS_PORT), status})


def draw_probes(rng: random.Random, pods: list[Pod], random_outbound: int = 5, inbound: int = 3,
                v4_mapped: int = 1, as_proxy: int = 1, lookups: int = 1, ipv6: int = 2,
                nameservers: dict[str, str] | None = None) -> list[Probe]:
    """Probes for every meshed pod of a bed that is up (see the module's
    docstring). Deterministic for a given rng state and pod list. Per meshed
    pod: `v4_mapped` and `as_proxy` of its outbound probes are repeated in
    that way, `lookups` DNS queries go to its node's nameserver
    (`nameservers`: node name -> address; no DNS probes without it), and on
    a dual-stack bed `ipv6` native IPv6 requests go out of it and `inbound`
    of them (at most 1) into it."""
    from .dns import captures_dns
    meshed = [p for p in pods if p.meshed]
    plain = [p for p in pods if not p.meshed]
    # every address a request can go to, with the pod behind it
    targets = [(p.ip, p, "pod") for p in pods] + [(p.service_ip, p, "service") for p in pods]
    targets6 = [(p.ip6, p, "IPv6 pod") for p in pods if p.ip6] + \
        [(p.service_ip6, p, "IPv6 service") for p in pods if p.service_ip6]
    probes: list[Probe] = []

    def add(client: Pod, address: str, server: Pod, kind: str, port: int | None = None, **how) -> None:
        port = port if port is not None else rng.choice(_port_pool(server))
        mesh_word = "meshed" if server.meshed else "plain"
        probes.append(Probe(client.name, address, port, f"{kind} of {mesh_word} {server.name}", server.name, **how))

    for pod in meshed:
        first = len(probes)
        # one destination inside every range the pod's annotations or mesh defaults name
        ranges = [pod.annotations.get(name, "") for name in (ii.ANN_INCLUDE_OUTBOUND_IP_RANGES,
                                                             ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES)]
        ranges += [pod.mesh_defaults.get(name, "") for name in ("includeIPRanges", "excludeIPRanges")]
        for value in ranges:
            for net in _cidrs(value):
                inside = [t for t in targets if ipaddress.ip_address(t[0]) in net]
                if inside:
                    address, server, kind = rng.choice(inside)
                    add(pod, address, server, kind)
        for _ in range(random_outbound):
            address, server, kind = rng.choice([t for t in targets if t[1].meshed and t[1] is not pod])
            add(pod, address, server, kind)
        if plain:
            server = rng.choice(plain)
            add(pod, server.ip, server, "pod")
        address, kind = rng.choice(((pod.ip, "pod"), (pod.service_ip, "service")))
        add(pod, address, pod, f"own {kind}", rng.choice(SERVED_PORTS))
        outbound = probes[first:]
        for _ in range(v4_mapped):
            probes.append(dataclasses.replace(rng.choice(outbound), family="v4-mapped"))
        for _ in range(as_proxy):
            probes.append(dataclasses.replace(rng.choice(outbound), proxy=True))
        if pod.ip6 and targets6:
            for _ in range(ipv6):
                address, server, kind = rng.choice([t for t in targets6 if t[1] is not pod])
                add(pod, address, server, kind, family="inet6")
            for _ in range(min(inbound, 1) if plain else 0):
                add(rng.choice([p for p in plain if p.ip6] or plain), pod.ip6, pod, "IPv6 inbound to pod",
                    family="inet6")
        if nameservers:
            server = nameservers[pod.node]
            kinds = [False] * lookups + ([True] if lookups and captures_dns(pod) else [])
            for proxy in kinds:
                probes.append(Probe(pod.name, server, 53, "nameserver", None, proxy=proxy,
                                    dns_name=rng.choice(DNS_NAMES), dns_how=rng.choice(DNS_TRANSPORTS)))
        for _ in range(inbound if plain else 0):
            add(rng.choice(plain), pod.ip, pod, "inbound to pod")
    return probes

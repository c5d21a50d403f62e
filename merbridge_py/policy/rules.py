"""PodPolicy -> the first-match rule lists the datapath walks (ebpf/merbridge.h:
outbound_captured, inbound_captured).

The lists mirror the nat rules istio-iptables appends to ISTIO_OUTPUT and
ISTIO_INBOUND in REDIRECT mode (tools/istio-iptables/pkg/capture/run.go and
its testdata/*.golden), keeping only the rules that can match a TCP connect
from an application process to a destination that is neither loopback nor the
pod's own address; the kernel side handles loopback, own-pod and proxy-uid
traffic itself.

ISTIO_OUTPUT, in order:
  -p tcp --dport P -j RETURN          for P in excludeOutboundPorts (-o)
  (DNS capture) TCP 53 -> istio-agent  only with ISTIO_META_DNS_CAPTURE
  -d 127.0.0.1/32 -j RETURN           loopback: kernel side
  -d CIDR -j RETURN                   for CIDR in excludeOutboundIPRanges (-x), IPv4 only
  -p tcp --dport P -j ISTIO_REDIRECT  for P in includeOutboundPorts (-q)
  -j ISTIO_REDIRECT                   includeOutboundIPRanges "*" (-i), or
  -d CIDR -j ISTIO_REDIRECT           for CIDR in includeOutboundIPRanges
ISTIO_INBOUND, in order:
  -p tcp --dport 15008 -j RETURN      the HBONE tunnel port, always first
  "*":   --dport P -j RETURN for P in -d, then -j ISTIO_IN_REDIRECT
  list:  --dport P -j ISTIO_IN_REDIRECT for P in -b (-d is ignored)

"Not captured" by the datapath means the connection continues to Istio's own
iptables rules, which stay installed in the pod: a rule list that errs towards
not capturing is safe, one that captures more than Istio would is not. That is
why the DNS port, which iptables sends to the agent rather than to the
outbound listener, becomes a non-capturing rule here.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

from merbridge_py.mesh import MeshProfile
from merbridge_py.policy.model import PodPolicy, Verdict

ANY_IPV4 = IPv4Network("0.0.0.0/0")
ANY_PORT = 0
DNS_PORT = 53


@dataclass(frozen=True)
class OutboundRule:
    network: IPv4Network
    port: int          # 0 = any port
    capture: bool

    def matches(self, ip: int, port: int) -> bool:
        return (ip & int(self.network.netmask)) == int(self.network.network_address) and \
            self.port in (ANY_PORT, port)


@dataclass(frozen=True)
class InboundRule:
    port: int          # 0 = any port
    capture: bool

    def matches(self, port: int) -> bool:
        return self.port in (ANY_PORT, port)


def inbound_tunnel_port(mesh: MeshProfile) -> int:
    return mesh.inbound_tunnel_port


def _real_ports(ports) -> list[int]:
    # "--dport 0" matches nothing a TCP connect can reach, but port 0 in a rule
    # means "any port" to the datapath: drop such entries instead of widening them.
    return [p for p in ports if p != ANY_PORT]


def outbound_rules(policy: PodPolicy) -> list[OutboundRule]:
    rules = [OutboundRule(ANY_IPV4, p, False) for p in _real_ports(policy.exclude_outbound_ports)]
    if policy.dns_capture:
        rules.append(OutboundRule(ANY_IPV4, DNS_PORT, False))
    rules += [OutboundRule(n, ANY_PORT, False) for n in policy.exclude_outbound_ip_ranges if n.version == 4]
    rules += [OutboundRule(ANY_IPV4, p, True) for p in _real_ports(policy.include_outbound_ports)]
    rules += [OutboundRule(n, ANY_PORT, True) for n in policy.include_outbound_ip_ranges if n.version == 4]
    return rules


def inbound_rules(policy: PodPolicy, mesh: MeshProfile) -> list[InboundRule]:
    rules = [InboundRule(inbound_tunnel_port(mesh), False)]
    if policy.captures_all_inbound_ports:
        rules += [InboundRule(p, False) for p in _real_ports(policy.exclude_inbound_ports)]
        rules.append(InboundRule(ANY_PORT, True))
    else:
        rules += [InboundRule(p, True) for p in _real_ports(policy.include_inbound_ports)]
    return rules


def _compact(rules: list) -> list:
    """Drop rules that can never decide anything, keeping first-match results.

    A rule whose match repeats an earlier one is never reached; non-capturing
    rules after the last capturing one only restate "no match = not captured".
    Both matter when a policy is near the datapath's size limit.
    """
    seen, kept = set(), []
    for rule in rules:
        key = (getattr(rule, "network", None), rule.port)
        if key not in seen:
            seen.add(key)
            kept.append(rule)
    while kept and not kept[-1].capture:
        kept.pop()
    return kept


def compile_rules(policy: PodPolicy, mesh: MeshProfile) -> tuple[list[OutboundRule], list[InboundRule]]:
    """First-match rule lists for the datapath; no match = not captured."""
    return _compact(outbound_rules(policy)), _compact(inbound_rules(policy, mesh))


def first_match_outbound(rules: list[OutboundRule], ip: str, port: int) -> bool:
    """What the kernel's outbound_captured() answers for these rules."""
    address = int(IPv4Network(ip).network_address)
    return next((r.capture for r in rules if r.matches(address, port)), False)


def first_match_inbound(rules: list[InboundRule], port: int) -> bool:
    """What the kernel's inbound_captured() answers for these rules."""
    return next((r.capture for r in rules if r.matches(port)), False)


@dataclass(frozen=True)
class PodKernelFields:
    """What the kernel holds for an accelerated pod besides its IPv4 address
    and rule lists: the uid/gid whose connections are the proxy's own (never
    redirected, as Istio's owner matches skip them)."""

    proxy_uid: int
    proxy_gid: int


def kernel_fields(verdict: Verdict, mesh: MeshProfile) -> PodKernelFields:
    policy = verdict.policy
    if policy is None:
        return PodKernelFields(mesh.proxy_uid, mesh.proxy_gid)
    return PodKernelFields(policy.proxy_uid, policy.proxy_gid)

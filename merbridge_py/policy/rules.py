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
  -d CIDR -j RETURN                   for CIDR in excludeOutboundIPRanges (-x) of the family
  -p tcp --dport P -j ISTIO_REDIRECT  for P in includeOutboundPorts (-q)
  -j ISTIO_REDIRECT                   includeOutboundIPRanges "*" (-i), or
  -d CIDR -j ISTIO_REDIRECT           for CIDR in includeOutboundIPRanges of the family
ISTIO_INBOUND, in order:
  -p tcp --dport 15008 -j RETURN      the HBONE tunnel port, always first
  "*":   --dport P -j RETURN for P in -d, then -j ISTIO_IN_REDIRECT
  list:  --dport P -j ISTIO_IN_REDIRECT for P in -b (-d is ignored)

ip6tables gets the same chains for a pod with an IPv6 address (Istio's
ipv6*.golden): the same ports, the ranges of -i/-x split by family ("*" is
both families'), ::1/128 for loopback and ::6 as the inbound passthrough
source. So each family has its own outbound list (IPv4 destinations,
v4-mapped ones included, walk the IPv4 list) and both share the inbound one.

"Not captured" by the datapath means the connection continues to Istio's own
iptables rules, which stay installed in the pod: a rule list that errs towards
not capturing is safe, one that captures more than Istio would is not. That is
why the DNS port, which iptables sends to the agent rather than to the
outbound listener, becomes a non-capturing rule here.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from merbridge_py.layout import MAX_OUTBOUND_RULES
from merbridge_py.mesh import MeshProfile
from merbridge_py.policy.model import FamilyVerdict, PodPolicy, Verdict

ANY_IPV4 = IPv4Network("0.0.0.0/0")
ANY_IPV6 = IPv6Network("::/0")
ANY_PORT = 0
DNS_PORT = 53


@dataclass(frozen=True)
class OutboundRule:
    network: IPv4Network | IPv6Network
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


def outbound_rules(policy: PodPolicy, version: int = 4) -> list[OutboundRule]:
    """ISTIO_OUTPUT of iptables (version 4) or ip6tables (version 6)."""
    anywhere = ANY_IPV4 if version == 4 else ANY_IPV6
    rules = [OutboundRule(anywhere, p, False) for p in _real_ports(policy.exclude_outbound_ports)]
    if policy.dns_capture:
        rules.append(OutboundRule(anywhere, DNS_PORT, False))
    rules += [OutboundRule(n, ANY_PORT, False) for n in policy.exclude_outbound_ip_ranges if n.version == version]
    rules += [OutboundRule(anywhere, p, True) for p in _real_ports(policy.include_outbound_ports)]
    if version == 6 and policy.include_outbound_ip_ranges == (ANY_IPV4,) and not policy.ipv6_exact:
        # The policy parsers (policy/annotations.py, spec_sources.py) spell
        # -i "*" as 0.0.0.0/0, and "*" is both families' wildcard in
        # istio-iptables (separateV4V6). Known gap: an explicit -i 0.0.0.0/0
        # reads the same, though ip6tables then gets no ISTIO_REDIRECT rule.
        # A policy read from ip6tables rules (ipv6_exact) lists ::/0 itself.
        rules.append(OutboundRule(ANY_IPV6, ANY_PORT, True))
    rules += [OutboundRule(n, ANY_PORT, True) for n in policy.include_outbound_ip_ranges if n.version == version]
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
    """First-match rule lists for the datapath (IPv4 outbound, inbound); no match = not captured."""
    return _compact(outbound_rules(policy)), _compact(inbound_rules(policy, mesh))


def compile_rules6(policy: PodPolicy) -> list[OutboundRule]:
    """The IPv6 outbound list (ip6tables' ISTIO_OUTPUT); inbound is shared."""
    return _compact(outbound_rules(policy, 6))


def first_match_outbound(rules: list[OutboundRule], ip: str, port: int) -> bool:
    """What the kernel's outbound_captured() (or outbound6_captured()) answers for these rules."""
    network = IPv4Network(ip) if ":" not in ip else IPv6Network(ip)
    address = int(network.network_address)
    return next((r.capture for r in rules if r.network.version == network.version and r.matches(address, port)),
                False)


def first_match_inbound(rules: list[InboundRule], port: int) -> bool:
    """What the kernel's inbound_captured() answers for these rules."""
    return next((r.capture for r in rules if r.matches(port)), False)


@dataclass(frozen=True)
class PodKernelFields:
    """What the kernel holds for an accelerated pod besides its IPv4 address
    and rule lists: the uid/gid whose connections are the proxy's own (never
    redirected, as Istio's owner matches skip them), and its IPv6 side: the
    address and outbound rules, when IPv6 is accelerated (else None, ())."""

    proxy_uid: int
    proxy_gid: int
    ipv6: str | None = None
    outbound6: tuple[OutboundRule, ...] = ()


def kernel_fields(verdict: Verdict, mesh: MeshProfile) -> PodKernelFields:
    policy = verdict.policy
    if policy is None:
        return PodKernelFields(mesh.proxy_uid, mesh.proxy_gid)
    ipv6 = next((f for f in verdict.families if f.family == "ipv6" and f.accelerated), None)
    if ipv6 is None:
        return PodKernelFields(policy.proxy_uid, policy.proxy_gid)
    return PodKernelFields(policy.proxy_uid, policy.proxy_gid, ipv6.address, tuple(compile_rules6(policy)))


# Policy sources read from installed rules: their IPv6 side is known only
# when the reader also read the pod's ip6tables rules (policy.ipv6_exact or
# ipv6_refused, live_rules.with_ipv6); Istio's nftables tables are inet, and
# their IPv6 rules are not read exactly (live_rules._nft_rule skips them).
# policy/capture.py's SOURCE_IPTABLES and SOURCE_NFTABLES (it imports this
# module, so they are spelt out; tests/test_policy.py checks they agree).
IPV4_ONLY_SOURCES = ("iptables rules", "nftables rules")


def family_verdicts(verdict: Verdict, ipv6_addresses: tuple[str, ...]) -> tuple[FamilyVerdict, ...]:
    """Per address family: accelerated or not, and why. IPv4 follows the
    pod's verdict (v4-mapped destinations of AF_INET6 sockets included);
    IPv6 needs an IPv6 pod address and an IPv6 policy known exactly: from
    the spec's flags, or from the pod's ip6tables rules when its policy was
    read from its installed rules (live_rules.with_ipv6)."""
    if not verdict.accelerate:
        why = verdict.reason.removeprefix("not accelerated: ")
        return (FamilyVerdict("ipv4", False, why, verdict.ips[0] if verdict.ips else None),
                FamilyVerdict("ipv6", False, why, ipv6_addresses[0] if ipv6_addresses else None))
    ipv4 = FamilyVerdict("ipv4", True, "accelerated", verdict.ips[0])
    if not ipv6_addresses:
        return ipv4, FamilyVerdict("ipv6", False, "the pod has no IPv6 address", None)
    address = ipv6_addresses[0]
    policy = verdict.policy
    if policy.ipv6_refused:
        return ipv4, FamilyVerdict("ipv6", False, policy.ipv6_refused, address)
    if policy.source.startswith(IPV4_ONLY_SOURCES) and not policy.ipv6_exact:
        if policy.source.startswith("nftables"):
            why = (f"its policy was read from Istio's {policy.source} (inet tables), whose IPv6 rules "
                   "are not read exactly")
        else:
            why = f"its policy was read from the pod's IPv4 {policy.source}, which say nothing of ip6tables' ranges"
        return ipv4, FamilyVerdict("ipv6", False, why, address)
    rules6 = compile_rules6(policy)
    if len(rules6) > MAX_OUTBOUND_RULES:
        why = f"its policy needs {len(rules6)} IPv6 outbound rules, the datapath holds {MAX_OUTBOUND_RULES}"
        return ipv4, FamilyVerdict("ipv6", False, why, address)
    return ipv4, FamilyVerdict("ipv6", True, "accelerated", address)

"""The two values the decision step hands to the rest of the agent: a pod's
capture policy (what Istio's iptables would capture) and the verdict (is the
pod accelerated, why, and with which policy).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

IPNetwork = IPv4Network | IPv6Network

# includeInboundPorts "*" is kept as this marker rather than expanded: Istio
# treats it as "every port except the excluded ones", not as a port list.
ALL_PORTS = "*"


@dataclass(frozen=True)
class PodPolicy:
    """A pod's capture policy, parsed from its annotations the way Istio's
    injector turns them into istio-iptables flags (-i -x -b -d -q -o).

    Ranges hold both families, as istio-iptables' -i/-x do: each family's
    ranges go to that family's rules (policy/rules.py). Ports are ints in the
    order written, duplicates dropped; they apply to both families.
    """

    include_outbound_ip_ranges: tuple[IPNetwork, ...]
    exclude_outbound_ip_ranges: tuple[IPNetwork, ...]
    include_inbound_ports: tuple[int, ...] | tuple[str]   # ("*",) = all ports
    exclude_inbound_ports: tuple[int, ...]                # mesh's exempt ports included
    include_outbound_ports: tuple[int, ...]
    exclude_outbound_ports: tuple[int, ...]
    # istio-iptables sends TCP port 53 to the agent's DNS proxy when the pod
    # runs with ISTIO_META_DNS_CAPTURE; the datapath must leave port 53 alone.
    # Not part of the JSON shape (issue 4 fixes it); the verdict's reason says it.
    dns_capture: bool = False
    # The proxy's own traffic is never captured: the uid/gid Istio's rules
    # exempt (istio-iptables -u/-g, the owner matches of the installed rules).
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    # Where the values were read (see policy/installed.py): the pod's live
    # nat rules, istio-init's arguments, or the annotations.
    source: str = "annotations"
    # The IPv6 side (policy/rules.py family_verdicts). ipv6_exact: the IPv6
    # ranges were read from the pod's ip6tables rules, each family's as
    # written (-i "*" is then not spread from 0.0.0.0/0). ipv6_refused: why
    # IPv6 stays on iptables whatever the ranges say (set from installed rules).
    ipv6_exact: bool = False
    ipv6_refused: str | None = None

    @property
    def captures_all_inbound_ports(self) -> bool:
        return self.include_inbound_ports == (ALL_PORTS,)

    def to_json(self) -> dict:
        return {
            "include_outbound_ip_ranges": [str(n) for n in self.include_outbound_ip_ranges],
            "exclude_outbound_ip_ranges": [str(n) for n in self.exclude_outbound_ip_ranges],
            "include_inbound_ports": list(self.include_inbound_ports),
            "exclude_inbound_ports": list(self.exclude_inbound_ports),
            "include_outbound_ports": list(self.include_outbound_ports),
            "exclude_outbound_ports": list(self.exclude_outbound_ports),
            "proxy_uid": self.proxy_uid,
            "proxy_gid": self.proxy_gid,
            "source": self.source,
        }


@dataclass(frozen=True)
class FamilyVerdict:
    """Whether one address family of an accelerated pod is, and why not."""

    family: str               # "ipv4" | "ipv6"
    accelerated: bool
    reason: str               # "accelerated", or why not
    address: str | None       # the pod's address of this family

    def to_json(self) -> dict:
        return {"accelerated": self.accelerated, "reason": self.reason, "address": self.address}


@dataclass(frozen=True)
class Verdict:
    pod: str                      # "namespace/name"
    accelerate: bool
    reason: str                   # always set; starts with "accelerated:" or "not accelerated:"
    mesh: str
    ips: tuple[str, ...]          # IPv4 pod IPs
    policy: PodPolicy | None      # None only when the policy could not be parsed
    code: str = "accelerated"     # short, stable: a metrics label (not part of the JSON)
    families: tuple[FamilyVerdict, ...] = ()   # per family (policy.rules.family_verdicts)
    dns: object = None            # policy.dns.DnsDecision of an accelerated pod (issue 14)

    def to_json(self) -> dict:
        return {
            "pod": self.pod,
            "accelerate": self.accelerate,
            "reason": self.reason,
            "mesh": self.mesh,
            "ips": list(self.ips),
            "policy": None if self.policy is None else self.policy.to_json(),
            "families": {f.family: f.to_json() for f in self.families},
            **({} if self.dns is None else {"dns": self.dns.to_dict()}),
        }

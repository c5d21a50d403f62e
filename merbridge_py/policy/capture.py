"""One source's reading of a pod's capture: the istio-iptables flag set
(Capture), and choosing between sources (choose): the most trusted readable
source wins, and a pod whose other sources would leave alone something the
chosen one captures is refused -- eBPF must never capture what Istio's rules
leave alone. The sources are in spec_sources.py and live_rules.py; installed.py
is the entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network

from merbridge_py.policy.annotations import dedupe
from merbridge_py.policy.model import ALL_PORTS, IPNetwork, PodPolicy
from merbridge_py.policy.reference import captures_inbound, captures_outbound

DEFAULT_PROXY_UID = 1337            # istio-iptables: the istio-proxy user of the proxyv2 image
DNS_PORT = 53

SOURCE_IPTABLES = "iptables rules"
SOURCE_NFTABLES = "nftables rules"
SOURCE_ARGS = "istio-init arguments"
SOURCE_CNI = "istio-cni annotations"
SOURCE_ANNOTATIONS = "annotations"


class InstalledError(ValueError):
    """A source that cannot be read exactly; the message is the reason."""


@dataclass(frozen=True)
class Capture:
    """The istio-iptables flag set one source yields, parsed."""

    source: str
    policy: PodPolicy                       # -i -x -b -d -q -o and DNS capture
    proxy_uids: tuple[int, ...] = (DEFAULT_PROXY_UID,)      # -u
    proxy_gids: tuple[int, ...] = (DEFAULT_PROXY_UID,)      # -g
    proxy_port: int = 15001                 # -p
    inbound_port: int = 15006               # -z
    mode: str = "REDIRECT"                  # -m
    notes: tuple[str, ...] = field(default=())
    # (protocol, server network or None for any) of each rule of the installed
    # ISTIO_OUTPUT_DNS chain, for DNS capture (policy/dns.py); None when this
    # capture was not read from installed rules. Not part of the comparison.
    dns_redirects: tuple[tuple[str, str | None], ...] | None = field(default=None, compare=False)

    def describe(self) -> str:
        """The flags in istio-iptables spelling, for reasons."""
        p = self.policy
        include = "*" if p.include_outbound_ip_ranges == (IPv4Network("0.0.0.0/0"),) else \
            _joined(p.include_outbound_ip_ranges)
        text = (f"-p {self.proxy_port} -z {self.inbound_port} -u {_joined(self.proxy_uids)} "
                f"-g {_joined(self.proxy_gids)} -m {self.mode} -i '{include}' "
                f"-x '{_joined(p.exclude_outbound_ip_ranges)}' -b '{_joined(p.include_inbound_ports)}'")
        if p.captures_all_inbound_ports:
            text += f" -d '{_joined(p.exclude_inbound_ports)}'"
        text += f" -q '{_joined(p.include_outbound_ports)}' -o '{_joined(p.exclude_outbound_ports)}'"
        return text + (" (DNS capture)" if p.dns_capture else "")


def _joined(items: Iterable) -> str:
    return ",".join(str(x) for x in items)


def make_capture(source: str, *, include_ranges: Sequence[IPNetwork], exclude_ranges: Sequence[IPNetwork],
                 include_inbound: Sequence[int] | str, exclude_inbound: Sequence[int],
                 include_outbound: Sequence[int], exclude_outbound: Sequence[int], dns: bool,
                 uids: Sequence[int], gids: Sequence[int], proxy_port: int, inbound_port: int,
                 mode: str = "REDIRECT", notes: Sequence[str] = (),
                 dns_redirects: Sequence[tuple[str, str | None]] | None = None) -> Capture:
    policy = PodPolicy(
        include_outbound_ip_ranges=dedupe(include_ranges),
        exclude_outbound_ip_ranges=dedupe(exclude_ranges),
        include_inbound_ports=(ALL_PORTS,) if include_inbound == ALL_PORTS else dedupe(include_inbound),
        exclude_inbound_ports=dedupe(exclude_inbound),
        include_outbound_ports=dedupe(include_outbound),
        exclude_outbound_ports=dedupe(exclude_outbound),
        dns_capture=dns,
        proxy_uid=uids[0] if uids else DEFAULT_PROXY_UID,
        proxy_gid=gids[0] if gids else DEFAULT_PROXY_UID,
        source=source,
    )
    return Capture(source, policy, dedupe(uids), dedupe(gids), proxy_port, inbound_port, mode, tuple(notes),
                   None if dns_redirects is None else tuple(dns_redirects))


# --- choosing -------------------------------------------------------------------

class Refused(Exception):
    """Two sources disagree in a way that would make eBPF capture more."""


def _outbound_points(a: PodPolicy, b: PodPolicy) -> tuple[list[IPv4Address], list[int]]:
    """Representative destinations: CIDRs nest or are disjoint, so each region
    their boundaries cut out contains 0.0.0.0, a CIDR's first address or the
    address after a CIDR's last; ports: every listed one plus one unlisted."""
    nets = [n for p in (a, b) for n in p.include_outbound_ip_ranges + p.exclude_outbound_ip_ranges if n.version == 4]
    ips = {IPv4Address(0)}
    for n in nets:
        ips.add(n.network_address)
        if int(n.broadcast_address) < 2 ** 32 - 1:
            ips.add(n.broadcast_address + 1)
    listed = {x for p in (a, b) for x in p.include_outbound_ports + p.exclude_outbound_ports} | {DNS_PORT}
    unlisted = next(x for x in range(1, 65536) if x not in listed)
    return sorted(ips), sorted(listed | {unlisted})


def extra_capture(used: PodPolicy, other: PodPolicy) -> str | None:
    """A connection `used` captures and `other` leaves alone, or None."""
    ips, ports = _outbound_points(used, other)
    for ip in ips:
        for port in ports:
            if port and captures_outbound(used, str(ip), port) and not captures_outbound(other, str(ip), port):
                return f"outbound to {ip}:{port}"
    inbound = {x for p in (used, other) for x in p.include_inbound_ports + p.exclude_inbound_ports
               if isinstance(x, int)}
    extra = set(range(1, 65536)) if used.captures_all_inbound_ports and not other.captures_all_inbound_ports \
        else inbound | {next(x for x in range(1, 65536) if x not in inbound)}
    for port in sorted(extra):
        if captures_inbound(used, port) and not captures_inbound(other, port):
            return f"inbound to port {port}"
    return None


def choose(sources: Sequence[Capture | InstalledError | None]) -> Capture:
    """The most trusted readable source (sources in trust order; None = not
    available). Raises Refused when no source is readable, or when another
    available source would leave alone something the chosen one captures, or
    names other proxy ids or ports; the reason names both values."""
    available = [s for s in sources if s is not None]
    if not available:
        raise Refused("no source of the capture policy is available")
    first = available[0]
    if isinstance(first, InstalledError):
        raise Refused(f"installed rules cannot be read exactly: {first}")
    notes = []
    for other in available[1:]:
        if isinstance(other, InstalledError):
            notes.append(f"not compared with a source that cannot be read ({other})")
            continue
        for what in ("proxy_uids", "proxy_gids", "proxy_port", "inbound_port", "mode"):
            mine, theirs = getattr(first, what), getattr(other, what)
            if mine != theirs:
                raise Refused(f"{first.source} and {other.source} disagree on {what}: {mine} vs {theirs}")
        extra = extra_capture(first.policy, other.policy)
        if extra is not None:
            raise Refused(f"{first.source} capture {extra}, which {other.source} leave alone: "
                          f"{first.source}: {first.describe()}; {other.source}: {other.describe()}")
        if extra_capture(other.policy, first.policy) is not None:
            notes.append(f"{other.source} would capture more than {first.source}; {first.source} apply")
    return replace(first, notes=first.notes + tuple(notes))

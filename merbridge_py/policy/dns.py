"""Does the datapath take over a pod's DNS capture, and how (issue 14)?

Istio's rules (docs/dns.md) send the app's TCP and UDP port 53 to the DNS
servers of the pod's resolv.conf -- or to any address under istio-cni's
capture-all -- to the agent's DNS proxy on 127.0.0.1:15053, never the proxy's
own lookups (its uid/gid), and not at all when port 53 is an excluded
outbound port. The datapath does the same (ebpf/dns_*.bpf.c) from a per-pod
entry this module decides. Whatever it cannot do exactly stays with Istio's
rules, with the reason in the decision.

The server list lives only in the pod (resolv.conf, read by istio-init), so
it comes from the pod's installed nat rules (its ISTIO_OUTPUT_DNS chain).
When the agent read those rules to decide (policy/live_rules.py, cached per
namespace and spec), `intent()` completes the decision from them at once
(`Capture.dns_redirects`). Decided from the spec alone, the decision is
pending and `with_installed_rules()` completes it from `iptables-save` text
when the agent writes the pod's entries.
"""

from __future__ import annotations

import ipaddress
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace

from ..layout import MAX_DNS_SERVERS
from .capture import DNS_PORT, SOURCE_NFTABLES, Capture

DNS_PROXY_PORT = 15053
DNS_CHAIN = "ISTIO_OUTPUT_DNS"


@dataclass(frozen=True)
class DnsDecision:
    """`captured`: Istio's rules capture the pod's DNS. `accelerated`: the
    datapath does it instead (else port 53 stays with iptables). `servers`
    are IPv4 strings; () with capture_all. `pending`: the servers are read
    from the installed rules when the pod is written to the datapath."""

    captured: bool
    accelerated: bool
    reason: str
    capture_all: bool = False
    servers: tuple[str, ...] = ()
    proxy_uid: int | None = None
    proxy_gid: int | None = None
    pending: bool = False

    def to_dict(self) -> dict:
        return {"captured": self.captured, "accelerated": self.accelerated, "reason": self.reason,
                "capture_all": self.capture_all, "servers": list(self.servers),
                "proxy_uid": self.proxy_uid, "proxy_gid": self.proxy_gid}


NOT_CAPTURED = DnsDecision(False, False, "the pod's rules do not capture DNS")


def _iptables(why: str, **fields) -> DnsDecision:
    return DnsDecision(True, False, f"port 53 stays with iptables: {why}", **fields)


def intent(capture: Capture | None, cni: bool) -> DnsDecision:
    """What the capture policy says about DNS. `cni`: the pod's rules were
    installed by istio-cni, which captures DNS to every address."""
    if capture is None or not capture.policy.dns_capture:
        return NOT_CAPTURED
    policy = capture.policy
    if DNS_PORT in policy.exclude_outbound_ports:
        # Istio's -o RETURN rules come before the DNS chain: nothing is captured.
        return DnsDecision(False, False, "port 53 is an excluded outbound port (-o): DNS is not captured")
    if len(capture.proxy_uids) != 1 or len(capture.proxy_gids) != 1:
        return _iptables(f"the rules exempt several proxy uids/gids ({capture.proxy_uids}/{capture.proxy_gids}); "
                         "the datapath's DNS policy holds one of each")
    uid, gid = capture.proxy_uids[0], capture.proxy_gids[0]
    keep = {"proxy_uid": uid, "proxy_gid": gid}
    if capture.source == SOURCE_NFTABLES:
        # Istio's nftables backend writes its own DNS chain (istio-output-dns);
        # the datapath's DNS capture is checked against istio-iptables' rules
        # only, so it never takes over (and never captures more than) those.
        return _iptables("Istio's nftables DNS rules are not taken over by the datapath (only istio-iptables' "
                         "DNS rules are modelled); they keep capturing DNS", **keep)
    if capture.dns_redirects is not None:     # read from the installed rules when the pod was decided
        return with_redirects(DnsDecision(True, True, "", pending=True, **keep), capture.dns_redirects,
                              istio_rules=True)
    if cni:
        return DnsDecision(True, True, "DNS to any address goes to the DNS proxy (istio-cni captures all)",
                           capture_all=True, proxy_uid=uid, proxy_gid=gid)
    return DnsDecision(True, True, "DNS servers are read from the pod's installed rules", proxy_uid=uid,
                       proxy_gid=gid, pending=True)


def _server(proto: str, dst: str | None, what: str) -> tuple[str, str | None]:
    """A DNS redirect's (protocol, IPv4 server or None for any); a
    destination that is not one IPv4 address is a ValueError."""
    if dst is None:
        return proto, None
    try:
        net = ipaddress.ip_network(dst, strict=True)
    except ValueError:
        raise ValueError(f"unexpected destination in {DNS_CHAIN}: {what}") from None
    if net.version != 4 or net.prefixlen != 32:
        raise ValueError(f"unexpected destination in {DNS_CHAIN}: {what}")
    return proto, str(net.network_address)


def dns_redirects(nat_text: str) -> list[tuple[str, str | None]]:
    """(protocol, server or None for any) of each DNS redirect rule in the
    nat table's ISTIO_OUTPUT_DNS chain of iptables-save text. Anything else in
    that chain is a ValueError: the chain is not one istio-iptables wrote."""
    out = []
    table = "nat"    # text without table headers is the nat table's
    for line in nat_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        if table != "nat" or not line.startswith(f"-A {DNS_CHAIN} "):
            continue
        words = shlex.split(line)[2:]
        opts: dict[str, str] = {}
        while words:
            word = words.pop(0)
            if not word.startswith("-") or not words:
                raise ValueError(f"unexpected rule in {DNS_CHAIN}: {line}")
            opts[word] = words.pop(0)
        proto, dport, target = opts.pop("-p", None), opts.pop("--dport", None), opts.pop("-j", None)
        if opts.get("-m") == proto:   # iptables-save spells the port match's module out
            opts.pop("-m")
        to_port = opts.pop("--to-ports", None) or opts.pop("--to-port", None)
        dst = opts.pop("-d", None)
        if (proto not in ("tcp", "udp") or dport != str(DNS_PORT) or target != "REDIRECT"
                or to_port != str(DNS_PROXY_PORT) or opts):
            raise ValueError(f"unexpected rule in {DNS_CHAIN}: {line}")
        out.append(_server(proto, dst, line))
    return out


def with_installed_rules(decision: DnsDecision, nat_text: str | None, read_error: str | None = None) -> DnsDecision:
    """Complete a pending decision with the servers the pod's installed nat
    rules capture. Decisions that are not pending are returned unchanged."""
    if not decision.pending:
        return decision
    keep = {"proxy_uid": decision.proxy_uid, "proxy_gid": decision.proxy_gid}
    if nat_text is None:
        return _iptables(f"the pod's DNS rules could not be read ({read_error or 'no rules'})", **keep)
    try:
        redirects = dns_redirects(nat_text)
    except ValueError as e:
        return _iptables(str(e), **keep)
    return with_redirects(decision, redirects, istio_rules="-A ISTIO_OUTPUT " in nat_text)


def with_redirects(decision: DnsDecision, redirects, istio_rules: bool) -> DnsDecision:
    """Complete a pending decision from the (protocol, server or None)
    redirects of the installed ISTIO_OUTPUT_DNS chain. `istio_rules`: the
    rules read hold Istio's ISTIO_OUTPUT chain at all."""
    if not decision.pending:
        return decision
    keep = {"proxy_uid": decision.proxy_uid, "proxy_gid": decision.proxy_gid}
    try:
        redirects = [_server(proto, dst, f"{proto} to {dst}") for proto, dst in redirects]
    except ValueError as e:
        return _iptables(str(e), **keep)
    if not redirects and not istio_rules:
        return _iptables("iptables-save shows no Istio nat rules (rules installed with nftables are not read "
                         "for DNS)", **keep)
    if not redirects:
        # istio-iptables writes no DNS rules when it found no server: nothing to take over
        return DnsDecision(False, False, "the installed rules capture no DNS (istio-iptables found no DNS server)")
    tcp = {dst for proto, dst in redirects if proto == "tcp"}
    udp = {dst for proto, dst in redirects if proto == "udp"}
    if tcp != udp:
        return _iptables(f"TCP and UDP DNS go to different servers in the rules ({sorted(map(str, tcp))} vs "
                         f"{sorted(map(str, udp))})", **keep)
    if None in tcp:
        return replace(decision, capture_all=True, servers=(), pending=False,
                       reason="DNS to any address goes to the DNS proxy (from the installed rules)")
    servers = tuple(dst for proto, dst in redirects if proto == "udp")
    if len(servers) > MAX_DNS_SERVERS:
        return _iptables(f"{len(servers)} DNS servers, the datapath holds {MAX_DNS_SERVERS}", **keep)
    return replace(decision, servers=servers, pending=False,
                   reason=f"DNS to {', '.join(servers)} goes to the DNS proxy (from the installed rules)")


def read_nat_rules(netns_path: str) -> tuple[str | None, str | None]:
    """(iptables-save -t nat text of the namespace, error)."""
    tool = shutil.which("iptables-save")
    if tool is None:
        return None, "iptables-save not found"
    try:
        done = subprocess.run(["nsenter", f"--net={netns_path}", tool, "-t", "nat"], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    if done.returncode != 0:
        return None, done.stderr.strip() or f"iptables-save exited with {done.returncode}"
    return done.stdout, None

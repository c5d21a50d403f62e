"""The ip6tables nat rules Istio's `istio-iptables` installs in a sidecar pod
with IPv6 on (ENABLE_INBOUND_IPV6 / a dual-stack or IPv6 pod), REDIRECT mode:
the IPv6 half of its output, generated from the same flags as the IPv4 half
(istio_iptables.CaptureFlags; the flag model and the injector live there).

istio-iptables builds both halves in one pass over the same rule list; a rule
is shared, IPv4-only or IPv6-only. What the IPv6 half has of its own
(tools/istio-iptables/pkg/capture/run.go):
  - the inbound passthrough source is ::6/128 (127.0.0.6/32 in IPv4), and
    istio-iptables puts that address on lo (`ip -6 addr add ::6/128 dev lo`,
    tools/common/tproxy): IPv4 lets a process bind any of 127/8, IPv6 only ::1;
  - the loopback destination is always ::1/128 (IPv4 takes the configurable
    host loopback CIDR);
  - -i/-x keep their IPv6 CIDRs only;
  - DNS capture jumps to ISTIO_OUTPUT_DNS only for IPv6 resolvers
    (`dns_servers_v6`; CaptureFlags.dns_servers are IPv4), and the raw table's
    inbound zone rules only exist with one; the proxy-owned zone rules are
    shared, so they are here whenever DNS capture is on.
Everything else is the IPv4 half's rule for rule, in its order. Checked
against Istio's goldens in tests/test_testbed_ipv6.py (tests/data/istio-ipv6/).
"""

from __future__ import annotations

import ipaddress

from .istio_iptables import DNS_AGENT_PORT, CaptureFlags, _has_loopback, _port_matches, _split, _Table

INBOUND_PASSTHROUGH_IP6 = "::6"       # Envoy's inbound clusters bind here for IPv6 (Istio's InboundPassthroughBindIpv6)
LOOPBACK6 = "::1/128"


def _ipv6_ranges(value: str) -> tuple[bool, list[str]]:
    """(wildcard, IPv6 CIDRs) of an -i/-x value; IPv4 entries belong to the
    IPv4 half, unparsable ones are ignored as the IPv4 half ignores them."""
    if value.strip() == "*":
        return True, []
    cidrs = []
    for item in _split(value):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        if net.version == 6:
            cidrs.append(str(net))
    return False, cidrs


def _check_servers(servers: tuple[str, ...]) -> tuple[str, ...]:
    for server in servers:
        if ipaddress.ip_address(server).version != 6:
            raise ValueError(f"dns_servers_v6: {server!r} is not an IPv6 address")
    return tuple(servers)


def tables(flags: CaptureFlags, dns_servers_v6: tuple[str, ...] = ()) -> list[_Table]:
    """The ip6tables tables istio-iptables writes for these flags (nat, plus
    raw when DNS capture is on)."""
    if flags.interception_mode != "REDIRECT":
        raise ValueError(f"interception mode {flags.interception_mode!r}: the test bed generates REDIRECT mode only")
    if flags.exclude_outbound_ip_ranges.strip() == "*":
        raise ValueError("-x '*' is rejected by istio-iptables (invalid OUTBOUND_IP_RANGES_EXCLUDE)")
    servers6 = _check_servers(dns_servers_v6)
    _, exclude_cidrs = _ipv6_ranges(flags.exclude_outbound_ip_ranges)
    include_wildcard, include_cidrs = _ipv6_ranges(flags.include_outbound_ip_ranges)
    uids, gids = _split(flags.proxy_uid), _split(flags.proxy_gid)
    virt_ifaces = _split(flags.kube_virt_interfaces)
    # istio-iptables turns DNS capture off when it knows no resolver at all
    dns = flags.redirect_dns and bool(flags.dns_servers or servers6)
    tunnel = str(flags.inbound_tunnel_port)

    nat = _Table("nat")
    for iface in virt_ifaces:
        nat.insert_first("PREROUTING", "-i", iface, "-j", "RETURN")
    nat.append("ISTIO_INBOUND", "-p", "tcp", "--dport", tunnel, "-j", "RETURN")
    nat.append("ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(flags.proxy_port))
    nat.append("ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(flags.inbound_capture_port))

    if flags.include_inbound_ports.strip():
        nat.append("PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND")
        if flags.include_inbound_ports.strip() == "*":
            excluded = _split(flags.exclude_inbound_ports)
            if excluded:
                for match in _port_matches(excluded):
                    nat.append("ISTIO_INBOUND", "-p", "tcp", *match, "-j", "RETURN")
            nat.append("ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT")
        else:
            for port in _split(flags.include_inbound_ports):
                nat.append("ISTIO_INBOUND", "-p", "tcp", "--dport", port, "-j", "ISTIO_IN_REDIRECT")

    nat.append("OUTPUT", "-j", "ISTIO_OUTPUT")
    excluded_out = _split(flags.exclude_outbound_ports)
    if excluded_out:
        for proto in ("tcp", "udp"):
            for match in _port_matches(excluded_out):
                nat.append("ISTIO_OUTPUT", "-p", proto, *match, "-j", "RETURN")
    # The inbound proxy reaches its app from ::6: never captured again.
    nat.append("ISTIO_OUTPUT", "-o", "lo", "-s", f"{INBOUND_PASSTHROUGH_IP6}/128", "-j", "RETURN")
    keep_lo_return = not _has_loopback(flags.include_outbound_ip_ranges)
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            if dns and owner == "--uid-owner":
                skip_ports = ["-m", "multiport", "!", "--dports", f"53,{tunnel}"]
            else:
                skip_ports = ["!", "--dport", tunnel]
            nat.append("ISTIO_OUTPUT", "-o", "lo", "!", "-d", LOOPBACK6, "-p", "tcp", *skip_ports,
                       "-m", "owner", owner, ident, "-j", "ISTIO_IN_REDIRECT")
            if keep_lo_return:
                dns_port = ["-p", "tcp", "!", "--dport", "53"] if dns else []
                nat.append("ISTIO_OUTPUT", "-o", "lo", *dns_port, "-m", "owner", "!", owner, ident, "-j", "RETURN")
            nat.append("ISTIO_OUTPUT", "-m", "owner", owner, ident, "-j", "RETURN")
    if dns and servers6:
        nat.append("ISTIO_OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
        for proto, to_flag in (("tcp", "--to-ports"), ("udp", "--to-port")):
            for server in servers6:
                nat.append("ISTIO_OUTPUT_DNS", "-p", proto, "--dport", "53", "-d", f"{server}/128",
                           "-j", "REDIRECT", to_flag, str(DNS_AGENT_PORT))
    nat.append("ISTIO_OUTPUT", "-d", LOOPBACK6, "-j", "RETURN")
    for cidr in exclude_cidrs:
        nat.append("ISTIO_OUTPUT", "-d", cidr, "-j", "RETURN")
    for port in _split(flags.include_outbound_ports):
        nat.append("ISTIO_OUTPUT", "-p", "tcp", "--dport", port, "-j", "ISTIO_REDIRECT")
    if include_wildcard:
        nat.append("ISTIO_OUTPUT", "-j", "ISTIO_REDIRECT")
        for iface in virt_ifaces:
            nat.insert_first("PREROUTING", "-i", iface, "-j", "ISTIO_REDIRECT")
    else:
        for cidr in include_cidrs:
            for iface in virt_ifaces:
                nat.insert_first("PREROUTING", "-i", iface, "-d", cidr, "-j", "ISTIO_REDIRECT")
            nat.append("ISTIO_OUTPUT", "-d", cidr, "-j", "ISTIO_REDIRECT")
    result = [nat]
    if dns:
        result.append(_dns_conntrack_zones(uids, gids, servers6))
    return result


def _dns_conntrack_zones(uids: list[str], gids: list[str], servers6: tuple[str, ...]) -> _Table:
    """The raw table's conntrack zones (see istio_iptables), IPv6 half."""
    raw = _Table("raw")
    raw.append("OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", "53", "-m", "owner", owner, ident,
                       "-j", "CT", "--zone", "1")
            raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--sport", str(DNS_AGENT_PORT), "-m", "owner", owner, ident,
                       "-j", "CT", "--zone", "2")
    if servers6:
        raw.append("PREROUTING", "-j", "ISTIO_INBOUND")
    for server in servers6:
        raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", "53", "-d", f"{server}/128", "-j", "CT", "--zone", "2")
        raw.append("ISTIO_INBOUND", "-p", "udp", "--sport", "53", "-s", f"{server}/128", "-j", "CT", "--zone", "1")
    return raw


def rule_lines(flags: CaptureFlags, dns_servers_v6: tuple[str, ...] = ()) -> list[str]:
    """Every line of the ip6tables-restore payload (the IPv6 half of a golden file)."""
    return [line for table in tables(flags, dns_servers_v6) for line in table.lines()]


def restore_payload(flags: CaptureFlags, dns_servers_v6: tuple[str, ...] = ()) -> str:
    """Input for `ip6tables-restore --noflush` inside the pod's namespace."""
    return "\n".join(rule_lines(flags, dns_servers_v6)) + "\n"


def flush_payload(flags: CaptureFlags, dns_servers_v6: tuple[str, ...] = ()) -> str:
    """Input for `ip6tables-restore` (without --noflush) that empties every
    table `restore_payload` wrote."""
    builtin = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"), "raw": ("PREROUTING", "OUTPUT")}
    out = []
    for table in tables(flags, dns_servers_v6):
        out.append(f"*{table.name}")
        out += [f":{chain} ACCEPT [0:0]" for chain in builtin[table.name]]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def passthrough_address_command(add: bool = True) -> list[str]:
    """`ip` arguments that put ::6 on lo (what istio-iptables does with IPv6
    on) or take it off again. `nodad`: usable at once."""
    if add:
        return ["ip", "-6", "addr", "replace", f"{INBOUND_PASSTHROUGH_IP6}/128", "dev", "lo", "nodad"]
    return ["ip", "-6", "addr", "del", f"{INBOUND_PASSTHROUGH_IP6}/128", "dev", "lo"]


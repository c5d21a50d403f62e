"""The nat rules Istio's `istio-iptables` (the `istio-init` container) installs
in a sidecar pod, REDIRECT mode, IPv4 -- generated here from the same flags.

Two steps, as in Istio:
  1. the injector turns a pod's annotations into flags (`flags_from_annotations`,
     the `istio-init` arguments of an injected pod);
  2. istio-iptables turns flags into rules (`tables`, `restore_payload`).

The rule text, its order and the chain declarations follow Istio's published
golden files (tools/istio-iptables/pkg/capture/testdata/*.golden, the
iptables-restore generation); tests/test_testbed_iptables.py holds the
expected lists for each flag combination. TPROXY mode and IPv6 are not
generated: the test bed runs REDIRECT mode on IPv4 pods only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..mesh import ISTIO, MeshProfile

# Annotations the injector reads (traffic.sidecar.istio.io/* and friends).
ANN_INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
ANN_INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
ANN_EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
ANN_INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
ANN_EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
ANN_INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
ANN_EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
ANN_KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"
ANN_STATUS_PORT = "status.sidecar.istio.io/port"

# The injector's template always excludes Envoy's Prometheus port (15090) and
# the health port (15021) from inbound capture, then appends the agent's status
# port (annotation above, default `global.proxy.statusPort` = 15020) unless the
# user's list already has it: `-d 15090,15021,<excludeInboundPorts>,15020`.
INJECTOR_FIXED_INBOUND_EXCLUDES = "15090,15021"
DEFAULT_STATUS_PORT = "15020"

INBOUND_TUNNEL_PORT = 15008     # HBONE; istio-iptables always lets it through
DNS_AGENT_PORT = 15053          # where pilot-agent's DNS proxy listens
MULTIPORT_MAX = 15              # ports per `-m multiport` match (an iptables limit)

BUILTIN_CHAINS = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}


def _split(value: str) -> list[str]:
    """Istio's list flags: comma separated, blanks and empty items ignored."""
    return [item.strip() for item in value.split(",") if item.strip()]


@dataclass(frozen=True)
class CaptureFlags:
    """istio-iptables' flags, with its own defaults (empty lists: capture
    nothing). List flags keep Istio's string form ("*", "a,b" or "")."""

    proxy_port: int = ISTIO.outbound_port                 # -p
    inbound_capture_port: int = ISTIO.inbound_port        # -z
    inbound_tunnel_port: int = INBOUND_TUNNEL_PORT        # --inbound-tunnel-port
    proxy_uid: str = str(ISTIO.proxy_uid)                 # -u (a list is allowed)
    proxy_gid: str = str(ISTIO.proxy_gid)                 # -g (a list is allowed)
    interception_mode: str = "REDIRECT"                   # -m
    include_outbound_ip_ranges: str = ""                  # -i
    exclude_outbound_ip_ranges: str = ""                  # -x
    include_inbound_ports: str = ""                       # -b
    exclude_inbound_ports: str = ""                       # -d
    exclude_outbound_ports: str = ""                      # -o
    include_outbound_ports: str = ""                      # -q
    kube_virt_interfaces: str = ""                        # -k
    redirect_dns: bool = False                            # ISTIO_META_DNS_CAPTURE
    dns_servers: tuple[str, ...] = field(default=())      # IPv4 resolvers when redirect_dns
    host_loopback_cidr: str = "127.0.0.1/32"

    def argv(self) -> list[str]:
        """The `istio-init` container's arguments, as the injector writes them."""
        args = ["istio-iptables",
                "-p", str(self.proxy_port), "-z", str(self.inbound_capture_port),
                "-u", self.proxy_uid, "-g", self.proxy_gid, "-m", self.interception_mode,
                "-i", self.include_outbound_ip_ranges, "-x", self.exclude_outbound_ip_ranges,
                "-b", self.include_inbound_ports, "-d", self.exclude_inbound_ports]
        for flag, value in (("-o", self.exclude_outbound_ports), ("-q", self.include_outbound_ports),
                            ("-k", self.kube_virt_interfaces)):
            if value:
                args += [flag, value]
        return args + ["--log_output_level=default:info"]


def _exclude_inbound_port(status_port: str, excluded: str) -> str:
    """The injector's merge of the status port into the user's exclude list
    (appended, unless already listed)."""
    port = status_port.strip()
    if not port or port == "0":
        return excluded
    ports = excluded.split(",") if excluded else []
    if port in ports:
        return excluded
    return ",".join([p.strip() for p in ports if p.strip()] + [port])


def flags_from_annotations(annotations: dict[str, str] | None, profile: MeshProfile = ISTIO) -> CaptureFlags:
    """What Istio's sidecar injector passes to istio-iptables for a pod with
    these annotations (default mesh values: capture every outbound range and
    every inbound port)."""
    ann = annotations or {}
    merged = _exclude_inbound_port(ann.get(ANN_STATUS_PORT, DEFAULT_STATUS_PORT),
                                   ann.get(ANN_EXCLUDE_INBOUND_PORTS, ""))
    exclude_inbound = f"{INJECTOR_FIXED_INBOUND_EXCLUDES},{merged}" if merged else INJECTOR_FIXED_INBOUND_EXCLUDES
    return CaptureFlags(
        proxy_port=profile.outbound_port,
        inbound_capture_port=profile.inbound_port,
        proxy_uid=str(profile.proxy_uid),
        proxy_gid=str(profile.proxy_gid),
        interception_mode=ann.get(ANN_INTERCEPTION_MODE, "REDIRECT"),
        include_outbound_ip_ranges=ann.get(ANN_INCLUDE_OUTBOUND_IP_RANGES, "*"),
        exclude_outbound_ip_ranges=ann.get(ANN_EXCLUDE_OUTBOUND_IP_RANGES, ""),
        include_inbound_ports=ann.get(ANN_INCLUDE_INBOUND_PORTS, "*"),
        exclude_inbound_ports=exclude_inbound,
        exclude_outbound_ports=ann.get(ANN_EXCLUDE_OUTBOUND_PORTS, ""),
        include_outbound_ports=ann.get(ANN_INCLUDE_OUTBOUND_PORTS, ""),
        kube_virt_interfaces=ann.get(ANN_KUBEVIRT_INTERFACES, ""),
    )


class _Table:
    """Rules of one table in the order istio-iptables emits them."""

    def __init__(self, name: str):
        self.name = name
        self.rules: list[str] = []

    def append(self, chain: str, *match: str) -> None:
        self.rules.append(" ".join(("-A", chain) + match))

    def insert_first(self, chain: str, *match: str) -> None:
        self.rules.append(" ".join(("-I", chain, "1") + match))

    def chains(self) -> list[str]:
        """Istio's chains in order of first mention (as a rule's chain or
        as a jump target): the order of the `-N` lines in the goldens."""
        seen: list[str] = []
        for rule in self.rules:
            words = rule.split()
            for name in (words[1], words[words.index("-j") + 1] if "-j" in words else None):
                if name and name.startswith("ISTIO_") and name not in seen:
                    seen.append(name)
        return seen

    def lines(self) -> list[str]:
        return [f"* {self.name}"] + [f"-N {c}" for c in self.chains()] + self.rules + ["COMMIT"]


def _port_matches(ports: list[str]) -> list[list[str]]:
    """One `--dport` for a single port, else `-m multiport --dports` in groups
    the multiport match accepts."""
    if len(ports) == 1:
        return [["--dport", ports[0]]]
    return [["-m", "multiport", "--dports", ",".join(ports[i:i + MULTIPORT_MAX])]
            for i in range(0, len(ports), MULTIPORT_MAX)]


def _ipv4_ranges(value: str) -> tuple[bool, list[str]]:
    """(wildcard, IPv4 CIDRs) of an -i/-x value; IPv6 entries belong to
    ip6tables and are skipped, unparsable ones ignored as Istio does."""
    if value.strip() == "*":
        return True, []
    cidrs = []
    for item in _split(value):
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        if net.version == 4:
            cidrs.append(str(net))
    return False, cidrs


def _has_loopback(value: str) -> bool:
    for item in _split(value):
        try:
            if ipaddress.ip_interface(item).ip.is_loopback:
                return True
        except ValueError:
            continue
    return False


def tables(flags: CaptureFlags) -> list[_Table]:
    """The tables istio-iptables writes for these flags (nat, plus raw when
    DNS capture is on)."""
    if flags.interception_mode != "REDIRECT":
        raise ValueError(f"interception mode {flags.interception_mode!r}: the test bed generates REDIRECT mode only")
    exclude_wildcard, exclude_cidrs = _ipv4_ranges(flags.exclude_outbound_ip_ranges)
    if exclude_wildcard:
        raise ValueError("-x '*' is rejected by istio-iptables (invalid OUTBOUND_IP_RANGES_EXCLUDE)")
    include_wildcard, include_cidrs = _ipv4_ranges(flags.include_outbound_ip_ranges)
    uids, gids = _split(flags.proxy_uid), _split(flags.proxy_gid)
    virt_ifaces = _split(flags.kube_virt_interfaces)
    dns = flags.redirect_dns
    tunnel = str(flags.inbound_tunnel_port)
    loopback_dst = flags.host_loopback_cidr

    nat = _Table("nat")
    for iface in virt_ifaces:
        nat.insert_first("PREROUTING", "-i", iface, "-j", "RETURN")
    nat.append("ISTIO_INBOUND", "-p", "tcp", "--dport", tunnel, "-j", "RETURN")
    nat.append("ISTIO_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(flags.proxy_port))
    nat.append("ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", str(flags.inbound_capture_port))

    # Inbound: everything (minus -d) or only the listed ports.
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

    # Outbound.
    nat.append("OUTPUT", "-j", "ISTIO_OUTPUT")
    excluded_out = _split(flags.exclude_outbound_ports)
    if excluded_out:
        for proto in ("tcp", "udp"):
            for match in _port_matches(excluded_out):
                nat.append("ISTIO_OUTPUT", "-p", proto, *match, "-j", "RETURN")
    # The inbound proxy reaches its app from 127.0.0.6: never captured again.
    nat.append("ISTIO_OUTPUT", "-o", "lo", "-s", f"{ISTIO.inbound_passthrough_ip}/32", "-j", "RETURN")
    keep_lo_return = not _has_loopback(flags.include_outbound_ip_ranges)
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            # The proxy calling its own pod over lo goes to the inbound listener.
            if dns and owner == "--uid-owner":
                skip_ports = ["-m", "multiport", "!", "--dports", f"53,{tunnel}"]
            else:
                skip_ports = ["!", "--dport", tunnel]
            nat.append("ISTIO_OUTPUT", "-o", "lo", "!", "-d", loopback_dst, "-p", "tcp", *skip_ports,
                       "-m", "owner", owner, ident, "-j", "ISTIO_IN_REDIRECT")
            # An app calling its own pod over lo is not captured ...
            if keep_lo_return:
                dns_port = ["-p", "tcp", "!", "--dport", "53"] if dns else []
                nat.append("ISTIO_OUTPUT", "-o", "lo", *dns_port, "-m", "owner", "!", owner, ident, "-j", "RETURN")
            # ... and the proxy's own outbound traffic never loops back to it.
            nat.append("ISTIO_OUTPUT", "-m", "owner", owner, ident, "-j", "RETURN")
    if dns:
        nat.append("ISTIO_OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
        for proto, to_flag in (("tcp", "--to-ports"), ("udp", "--to-port")):
            for server in flags.dns_servers:
                nat.append("ISTIO_OUTPUT_DNS", "-p", proto, "--dport", "53", "-d", f"{server}/32",
                           "-j", "REDIRECT", to_flag, str(DNS_AGENT_PORT))
    nat.append("ISTIO_OUTPUT", "-d", loopback_dst, "-j", "RETURN")
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
        result.append(_dns_conntrack_zones(uids, gids, flags.dns_servers))
    return result


def _dns_conntrack_zones(uids: list[str], gids: list[str], servers: tuple[str, ...]) -> _Table:
    """raw-table rules that keep the proxy's upstream DNS (zone 1) apart from
    the app's DNS to the proxy (zone 2), against UDP conntrack races."""
    raw = _Table("raw")
    raw.append("OUTPUT", "-j", "ISTIO_OUTPUT_DNS")
    for owner, ids in (("--uid-owner", uids), ("--gid-owner", gids)):
        for ident in ids:
            raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", "53", "-m", "owner", owner, ident,
                       "-j", "CT", "--zone", "1")
            raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--sport", str(DNS_AGENT_PORT), "-m", "owner", owner, ident,
                       "-j", "CT", "--zone", "2")
    raw.append("PREROUTING", "-j", "ISTIO_INBOUND")
    for server in servers:
        raw.append("ISTIO_OUTPUT_DNS", "-p", "udp", "--dport", "53", "-d", f"{server}/32", "-j", "CT", "--zone", "2")
    for server in servers:
        raw.append("ISTIO_INBOUND", "-p", "udp", "--sport", "53", "-s", f"{server}/32", "-j", "CT", "--zone", "1")
    return raw


def rule_lines(flags: CaptureFlags) -> list[str]:
    """Every line of the iptables-restore payload (the body of a golden file)."""
    return [line for table in tables(flags) for line in table.lines()]


def restore_payload(flags: CaptureFlags) -> str:
    """Input for `iptables-restore --noflush` inside the pod's namespace."""
    return "\n".join(rule_lines(flags)) + "\n"


def flush_payload(flags: CaptureFlags) -> str:
    """Input for `iptables-restore` (without --noflush) that empties every
    table `restore_payload` wrote: the pod's namespace as before istio-init."""
    builtin = {"nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"), "raw": ("PREROUTING", "OUTPUT")}
    out = []
    for table in tables(flags):
        out.append(f"*{table.name}")
        out += [f":{chain} ACCEPT [0:0]" for chain in builtin[table.name]]
        out.append("COMMIT")
    return "\n".join(out) + "\n"

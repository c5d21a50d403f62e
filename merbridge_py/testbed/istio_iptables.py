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

import dataclasses
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
# A moved status port replaces 15020 in that list.
INJECTOR_FIXED_INBOUND_EXCLUDES = "15090,15021"
DEFAULT_STATUS_PORT = "15020"
# istio-cni (cni/pkg/plugin/sidecar_redirect.go) always appends these to the
# annotation's excluded inbound ports, and excludes outbound 15020 when the
# excludeOutboundPorts annotation is absent.
CNI_ALWAYS_EXCLUDED_INBOUND = "15020,15021,15090"
CNI_DEFAULT_EXCLUDED_PORTS = "15020"


@dataclass(frozen=True)
class MeshDefaults:
    """Mesh-wide injection values (helm `values.global.proxy.*`) the injector
    uses where a pod has no annotation, and the proxy uid/gid it passes as
    -u/-g (`.ProxyUID`/`.ProxyGID`, e.g. from an OpenShift namespace's uid
    range; the gid defaults to the uid)."""

    include_ip_ranges: str = "*"              # includeIPRanges -> -i
    exclude_ip_ranges: str = ""               # excludeIPRanges -> -x
    include_inbound_ports: str = "*"          # includeInboundPorts -> -b
    exclude_inbound_ports: str = ""           # excludeInboundPorts -> -d (with the status port)
    include_outbound_ports: str = ""          # includeOutboundPorts -> -q
    exclude_outbound_ports: str = ""          # excludeOutboundPorts -> -o
    status_port: str = DEFAULT_STATUS_PORT    # statusPort
    proxy_uid: int = ISTIO.proxy_uid
    proxy_gid: int | None = None

    FIELDS = ("includeIPRanges", "excludeIPRanges", "includeInboundPorts", "excludeInboundPorts",
              "includeOutboundPorts", "excludeOutboundPorts", "statusPort", "proxyUID", "proxyGID")
    _ATTRS = ("include_ip_ranges", "exclude_ip_ranges", "include_inbound_ports", "exclude_inbound_ports",
              "include_outbound_ports", "exclude_outbound_ports", "status_port", "proxy_uid", "proxy_gid")

    @property
    def gid(self) -> int:
        return self.proxy_uid if self.proxy_gid is None else self.proxy_gid

    @classmethod
    def parse(cls, settings: list[str]) -> "MeshDefaults":
        """From `name=value` items as the test bed's --mesh-default takes them."""
        values: dict[str, str] = {}
        for item in settings:
            name, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"--mesh-default {item!r}: expected NAME=VALUE with NAME one of "
                                 f"{', '.join(cls.FIELDS)}")
            values[name] = value
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, str]) -> "MeshDefaults":
        """From {NAME: value} with the helm names of FIELDS (a PodSpec's mesh_defaults)."""
        names = dict(zip(cls.FIELDS, cls._ATTRS))
        out: dict = {}
        for name, value in (values or {}).items():
            if name not in names:
                raise ValueError(f"mesh default {name!r}: expected one of {', '.join(cls.FIELDS)}")
            if name in ("proxyUID", "proxyGID"):
                text = str(value)
                if not (text.isascii() and text.isdigit() and 0 < int(text) < 2 ** 32 - 1):
                    raise ValueError(f"mesh default {name}={value!r}: a numeric id 1..4294967294")
                out[names[name]] = int(text)
            else:
                out[names[name]] = str(value)
        return cls(**out)

    def to_dict(self) -> dict[str, str]:
        """The values that differ from the defaults, by helm name."""
        base = MeshDefaults()
        return {name: str(getattr(self, attr)) for name, attr in zip(self.FIELDS, self._ATTRS)
                if getattr(self, attr) != getattr(base, attr)}

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

    def argv(self, cni: bool = False, native_nftables: bool = False) -> list[str]:
        """The `istio-init` container's arguments, as the injector's template
        writes them (-q/-o only when set; -g only when it is not the uid:
        istio-iptables defaults it to the uid; --native-nftables with
        values.global.nativeNftables)."""
        args = ["istio-iptables",
                "-p", str(self.proxy_port), "-z", str(self.inbound_capture_port), "-u", self.proxy_uid]
        if self.proxy_gid != self.proxy_uid:
            args += ["-g", self.proxy_gid]
        args += ["-m", self.interception_mode,
                 "-i", self.include_outbound_ip_ranges, "-x", self.exclude_outbound_ip_ranges,
                 "-b", self.include_inbound_ports, "-d", self.exclude_inbound_ports]
        for flag, value in (("-q", self.include_outbound_ports), ("-o", self.exclude_outbound_ports),
                            ("-k", self.kube_virt_interfaces)):
            if value:
                args += [flag, value]
        args.append("--log_output_level=default:info")
        if native_nftables:
            args.append("--native-nftables")
        return args + (["--run-validation", "--skip-rule-apply"] if cni else [])


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


def flags_from_annotations(annotations: dict[str, str] | None, profile: MeshProfile = ISTIO,
                           mesh: MeshDefaults = MeshDefaults()) -> CaptureFlags:
    """What Istio's sidecar injector passes to istio-iptables (istio-init's
    arguments) for a pod with these annotations: each value from the
    annotation, or else the mesh-wide default (injection-template.yaml)."""
    ann = annotations or {}
    merged = _exclude_inbound_port(ann.get(ANN_STATUS_PORT, mesh.status_port),
                                   ann.get(ANN_EXCLUDE_INBOUND_PORTS, mesh.exclude_inbound_ports))
    exclude_inbound = f"{INJECTOR_FIXED_INBOUND_EXCLUDES},{merged}" if merged else INJECTOR_FIXED_INBOUND_EXCLUDES

    def set_or_mesh(name: str, mesh_value: str) -> str:
        # `-q`/`-o` appear when the annotation is set or the mesh value is not empty
        return ann[name] if name in ann else mesh_value

    uid = str(mesh.proxy_uid if mesh.proxy_uid != ISTIO.proxy_uid else profile.proxy_uid)
    gid = uid if mesh.proxy_gid is None else str(mesh.proxy_gid)
    return CaptureFlags(
        proxy_port=profile.outbound_port,
        inbound_capture_port=profile.inbound_port,
        proxy_uid=uid,
        proxy_gid=gid,
        interception_mode=ann.get(ANN_INTERCEPTION_MODE, "REDIRECT"),
        include_outbound_ip_ranges=ann.get(ANN_INCLUDE_OUTBOUND_IP_RANGES, mesh.include_ip_ranges),
        exclude_outbound_ip_ranges=ann.get(ANN_EXCLUDE_OUTBOUND_IP_RANGES, mesh.exclude_ip_ranges),
        include_inbound_ports=ann.get(ANN_INCLUDE_INBOUND_PORTS, mesh.include_inbound_ports),
        exclude_inbound_ports=exclude_inbound,
        exclude_outbound_ports=set_or_mesh(ANN_EXCLUDE_OUTBOUND_PORTS, mesh.exclude_outbound_ports),
        include_outbound_ports=set_or_mesh(ANN_INCLUDE_OUTBOUND_PORTS, mesh.include_outbound_ports),
        kube_virt_interfaces=ann.get(ANN_KUBEVIRT_INTERFACES, ""),
    )


def cni_annotations(annotations: dict[str, str] | None, mesh: MeshDefaults = MeshDefaults()) -> dict[str, str]:
    """The pod's annotations after injection with istio-cni: the injector
    writes the effective values there (injection-template.yaml, metadata
    block under pilot.cni.enabled) and the CNI plugin reads them."""
    ann = dict(annotations or {})
    out = dict(ann)
    out[ANN_INTERCEPTION_MODE] = ann.get(ANN_INTERCEPTION_MODE, "REDIRECT")
    for name, mesh_value in ((ANN_INCLUDE_OUTBOUND_IP_RANGES, mesh.include_ip_ranges),
                             (ANN_EXCLUDE_OUTBOUND_IP_RANGES, mesh.exclude_ip_ranges)):
        value = ann.get(name, mesh_value)     # `with`: written only when not empty
        if value:
            out[name] = value
        else:
            out.pop(name, None)
    out[ANN_INCLUDE_INBOUND_PORTS] = ann.get(ANN_INCLUDE_INBOUND_PORTS, mesh.include_inbound_ports)
    out[ANN_EXCLUDE_INBOUND_PORTS] = _exclude_inbound_port(
        ann.get(ANN_STATUS_PORT, mesh.status_port), ann.get(ANN_EXCLUDE_INBOUND_PORTS, mesh.exclude_inbound_ports))
    for name, mesh_value in ((ANN_INCLUDE_OUTBOUND_PORTS, mesh.include_outbound_ports),
                             (ANN_EXCLUDE_OUTBOUND_PORTS, mesh.exclude_outbound_ports)):
        if name in ann or mesh_value:
            out[name] = ann.get(name, mesh_value)
    return out


def flags_from_cni_annotations(annotations: dict[str, str], proxy_uid: int = ISTIO.proxy_uid,
                               profile: MeshProfile = ISTIO, proxy_gid: int | None = None) -> CaptureFlags:
    """What the istio-cni plugin hands istio-iptables for a pod: annotation
    values or the plugin's own defaults, its fixed inbound exclusions
    appended, and the proxy container's runAsUser/runAsGroup as -u/-g."""
    excluded = annotations.get(ANN_EXCLUDE_INBOUND_PORTS, CNI_DEFAULT_EXCLUDED_PORTS).strip()
    if excluded and not excluded.endswith(","):
        excluded += ","
    excluded_items = (excluded + CNI_ALWAYS_EXCLUDED_INBOUND).split(",")
    uid = str(proxy_uid or ISTIO.proxy_uid)
    gid = str(proxy_gid or ISTIO.proxy_gid)     # the plugin treats an unset runAsGroup as 1337
    return CaptureFlags(
        proxy_port=profile.outbound_port,
        inbound_capture_port=profile.inbound_port,
        proxy_uid=uid,
        proxy_gid=gid,
        interception_mode=annotations.get(ANN_INTERCEPTION_MODE, "REDIRECT"),
        include_outbound_ip_ranges=annotations.get(ANN_INCLUDE_OUTBOUND_IP_RANGES, "*"),
        exclude_outbound_ip_ranges=annotations.get(ANN_EXCLUDE_OUTBOUND_IP_RANGES, ""),
        include_inbound_ports=annotations.get(ANN_INCLUDE_INBOUND_PORTS, "*"),
        exclude_inbound_ports=",".join(dict.fromkeys(excluded_items)),
        exclude_outbound_ports=annotations.get(ANN_EXCLUDE_OUTBOUND_PORTS, CNI_DEFAULT_EXCLUDED_PORTS),
        include_outbound_ports=annotations.get(ANN_INCLUDE_OUTBOUND_PORTS, ""),
        kube_virt_interfaces=annotations.get(ANN_KUBEVIRT_INTERFACES, ""),
    )


def installed_flags(annotations: dict[str, str] | None, mesh: MeshDefaults = MeshDefaults(),
                    cni: bool = False, profile: MeshProfile = ISTIO) -> CaptureFlags:
    """The flags Istio's rules in a pod are built from: istio-init's
    arguments, or with istio-cni what the plugin reads from the annotations
    the injector wrote."""
    if cni:
        return flags_from_cni_annotations(cni_annotations(annotations, mesh), mesh.proxy_uid, profile, mesh.gid)
    return flags_from_annotations(annotations, profile, mesh)


RULES_BACKENDS = ("iptables", "nftables")   # istio-iptables, or Istio's native nftables (--native-nftables)


def pod_mesh(pod) -> MeshDefaults:
    """The injection values a test-bed pod (topology.Pod) was injected with:
    its mesh-wide defaults and its proxy uid/gid."""
    mesh = MeshDefaults.from_dict(getattr(pod, "mesh_defaults", None) or {})
    uid = getattr(pod, "proxy_uid", None)
    gid = getattr(pod, "proxy_gid", None)
    if uid is None:
        return mesh
    return dataclasses.replace(mesh, proxy_uid=uid, proxy_gid=gid if gid is not None else uid)


def pod_flags(pod) -> CaptureFlags:
    """The flags a test-bed pod's rules are built from (istio-init's
    arguments, or istio-cni's reading of the annotations)."""
    return installed_flags(pod.annotations, pod_mesh(pod), cni=getattr(pod, "cni", False))


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

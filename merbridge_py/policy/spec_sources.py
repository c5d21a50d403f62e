"""Sources 2 and 3 of a pod's capture, from its spec: istio-init's argument
list (what istio-iptables ran with; immutable once the pod exists) and, with
istio-cni, the annotations the injector wrote the effective values into and
the CNI plugin reads (cni/pkg/plugin/sidecar_redirect.go).

Facts carried over (not code) from istio/istio: tools/istio-iptables
pkg/cmd/root.go (flag names), tools/common/config/types.go (list flags: split
on ",", empty items dropped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from ipaddress import IPv4Network

from merbridge_py.policy import annotations as ann
from merbridge_py.policy.annotations import PolicyError, parse_cidr_list, parse_port, show
from merbridge_py.policy.capture import DEFAULT_PROXY_UID, SOURCE_ARGS, SOURCE_CNI, Capture, InstalledError, make_capture
from merbridge_py.policy.model import ALL_PORTS, IPNetwork

# --- values as istio-iptables reads them --------------------------------------

def split_list(value: str) -> list[str]:
    """tools/common/config Split: comma separated, empty items dropped (no trimming)."""
    return [item for item in value.split(",") if item != ""]


def _port(what: str, text: str) -> int:
    try:
        return parse_port(what, text, text)
    except PolicyError as e:
        raise InstalledError(f"{what}: {show(text)} is not a port ({e.problem})") from None


def _ports(what: str, value: str) -> list[int]:
    return [_port(what, item) for item in split_list(value)]


def _ranges(what: str, value: str, wildcard: bool) -> list[IPNetwork]:
    if wildcard and value.strip() == "*":
        return [IPv4Network("0.0.0.0/0")]
    try:
        return list(parse_cidr_list(what, ",".join(split_list(value)), wildcard=False))
    except PolicyError as e:
        raise InstalledError(str(e)) from None


def _ids(what: str, value: str) -> list[int]:
    items = split_list(value)
    if not items or not all(i.isascii() and i.isdigit() for i in items):
        raise InstalledError(f"{what}: {show(value)} is not a list of numeric ids")
    return [int(i) for i in items]


_VALUE_FLAGS = {
    "p": "envoy-port", "z": "inbound-capture-port", "e": "inbound-tunnel-port", "u": "proxy-uid",
    "g": "proxy-gid", "m": "istio-inbound-interception-mode", "b": "istio-inbound-ports",
    "d": "istio-local-exclude-ports", "c": "istio-exclude-interfaces", "i": "istio-service-cidr",
    "x": "istio-service-exclude-cidr", "q": "istio-outbound-ports", "o": "istio-local-outbound-ports-exclude",
    "k": "kube-virt-interfaces", "t": "istio-inbound-tproxy-mark", "r": "istio-inbound-tproxy-route-table",
}
_LONG_VALUE_FLAGS = set(_VALUE_FLAGS.values()) | {
    "iptables-probe-port", "probe-timeout", "network-namespace", "force-iptables-binary",
    "log_output_level", "log_stacktrace_level", "log_caller", "log_target", "log_rotate",
    "log_rotate_max_age", "log_rotate_max_size", "log_rotate_max_backups",
}
_BOOL_FLAGS = {"n": "dry-run"}
_LONG_BOOL_FLAGS = set(_BOOL_FLAGS.values()) | {
    "skip-rule-apply", "run-validation", "redirect-dns", "drop-invalid", "dual-stack", "capture-all-dns",
    "cni-mode", "reconcile", "cleanup-only", "force-apply", "native-nftables", "iptables-trace-logging",
    "log_as_json",
}
_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def read_args(argv: Sequence[str]) -> dict[str, str | bool]:
    """istio-iptables' command line as pflag reads it: long name -> value."""
    args = list(argv)
    if args and args[0].rsplit("/", 1)[-1] == "istio-iptables":
        args = args[1:]
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not isinstance(arg, str):
            raise InstalledError(f"argument {show(arg)} is not a string")
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
        elif arg.startswith("-") and len(arg) >= 2:
            short, rest = arg[1], arg[2:]
            name = _VALUE_FLAGS.get(short) or _BOOL_FLAGS.get(short)
            if name is None:
                raise InstalledError(f"unknown istio-iptables flag {show(arg)}")
            eq, value = ("=", rest[1:]) if rest.startswith("=") else (("=", rest) if rest else ("", ""))
        else:
            raise InstalledError(f"unexpected istio-iptables argument {show(arg)}")
        if name in _LONG_VALUE_FLAGS:
            if not eq:
                i += 1
                if i == len(args):
                    raise InstalledError(f"istio-iptables flag {show(arg)} has no value")
                value = args[i]
            out[name] = value
        elif name in _LONG_BOOL_FLAGS:
            if eq and value not in _GO_BOOLS:
                raise InstalledError(f"istio-iptables flag {show(arg)}: not a boolean")
            out[name] = _GO_BOOLS[value] if eq else True
        else:
            raise InstalledError(f"unknown istio-iptables flag {show(arg)}")
        i += 1
    return out


def from_args(argv: Sequence[str], dns_env: bool = False) -> Capture:
    """Source 2: the flags istio-init ran istio-iptables with. `dns_env` is
    ISTIO_META_DNS_CAPTURE from istio-init's env (the flag's environment twin)."""
    flags = read_args(argv)

    def get(name: str, default: str | bool = "") -> str | bool:
        return flags.get(name, default)
    for name in ("skip-rule-apply", "dry-run", "cleanup-only"):
        if get(name, False):
            raise InstalledError(f"istio-init runs with --{name}: it installed no rules")
    if get("istio-exclude-interfaces"):
        raise InstalledError(f"istio-init excludes interfaces (-c {show(get('istio-exclude-interfaces'))}); "
                             "the datapath cannot tell interfaces apart")
    uids = _ids("-u", get("proxy-uid", str(DEFAULT_PROXY_UID)))
    gids = _ids("-g", get("proxy-gid")) if get("proxy-gid") else uids   # root.go: gid defaults to uid
    include_inbound_raw = get("istio-inbound-ports")
    mode = get("istio-inbound-interception-mode", "REDIRECT") or "REDIRECT"
    if mode not in ("REDIRECT", "TPROXY"):
        raise InstalledError(f"-m {show(mode)}: expected REDIRECT or TPROXY")
    exclude_ranges = _ranges("-x", get("istio-service-exclude-cidr"), wildcard=False)
    source = SOURCE_ARGS + (" (native nftables)" if get("native-nftables", False) else "")
    return make_capture(
        source,
        include_ranges=_ranges("-i", get("istio-service-cidr"), wildcard=True),
        exclude_ranges=exclude_ranges,
        include_inbound=ALL_PORTS if include_inbound_raw.strip() == ALL_PORTS else _ports("-b", include_inbound_raw),
        exclude_inbound=_ports("-d", get("istio-local-exclude-ports")),
        include_outbound=_ports("-q", get("istio-outbound-ports")),
        exclude_outbound=_ports("-o", get("istio-local-outbound-ports-exclude")),
        dns=bool(get("redirect-dns", False) or get("capture-all-dns", False) or dns_env),
        uids=uids, gids=gids,
        proxy_port=_port("-p", get("envoy-port", "15001")),
        inbound_port=_port("-z", get("inbound-capture-port", "15006")),
        mode=mode,
    )


# --- source 3: istio-cni's annotations ------------------------------------------

CNI_ALWAYS_EXCLUDED_INBOUND = (15020, 15021, 15090)     # sidecar_redirect.go appends these
CNI_DEFAULT_EXCLUDED_PORTS = "15020"                     # when the annotation is absent


def from_cni_annotations(annotations: Mapping[str, str], proxy_uid: int | None, proxy_gid: int | None,
                         dns: bool) -> Capture:
    """Source 3 with istio-cni: what the CNI plugin builds from the annotations
    (its own defaults where one is absent) and istio-proxy's runAsUser/Group."""
    def value(name: str, default: str) -> str:
        v = ann.read_annotation(annotations, name, default)
        return default if v is None else v

    # a malformed annotation raises PolicyError, named as such by decide()
    include_raw = value(ann.INCLUDE_OUTBOUND_IP_RANGES, "*")
    include_ranges = ann.parse_cidr_list(ann.INCLUDE_OUTBOUND_IP_RANGES, include_raw, wildcard=True)
    exclude_ranges = ann.parse_cidr_list(ann.EXCLUDE_OUTBOUND_IP_RANGES,
                                         value(ann.EXCLUDE_OUTBOUND_IP_RANGES, ""), wildcard=False)
    inbound_raw = value(ann.INCLUDE_INBOUND_PORTS, ALL_PORTS)
    include_inbound = ALL_PORTS if inbound_raw == ALL_PORTS else \
        ann.parse_port_list(ann.INCLUDE_INBOUND_PORTS, inbound_raw)
    exclude_inbound = ann.parse_port_list(ann.EXCLUDE_INBOUND_PORTS,
                                          value(ann.EXCLUDE_INBOUND_PORTS, CNI_DEFAULT_EXCLUDED_PORTS))
    include_outbound = ann.parse_port_list(ann.INCLUDE_OUTBOUND_PORTS, value(ann.INCLUDE_OUTBOUND_PORTS, ""))
    exclude_outbound = ann.parse_port_list(ann.EXCLUDE_OUTBOUND_PORTS,
                                           value(ann.EXCLUDE_OUTBOUND_PORTS, CNI_DEFAULT_EXCLUDED_PORTS))
    uid = proxy_uid or DEFAULT_PROXY_UID      # the plugin treats 0 / unset as 1337
    gid = proxy_gid or DEFAULT_PROXY_UID
    return make_capture(SOURCE_CNI, include_ranges=include_ranges, exclude_ranges=exclude_ranges,
                        include_inbound=include_inbound,
                        exclude_inbound=tuple(exclude_inbound) + CNI_ALWAYS_EXCLUDED_INBOUND,
                        include_outbound=include_outbound, exclude_outbound=exclude_outbound, dns=dns,
                        uids=(uid,), gids=(gid,), proxy_port=15001, inbound_port=15006)

"""Pod annotations -> PodPolicy, accepting exactly what Istio accepts.

Sources (facts, not code, carried over):
- Istio's sidecar injector validates these annotations and refuses to inject a
  pod whose values do not validate (pkg/kube/inject/validate.go): CIDR lists
  are split on "," with no trimming and each entry must parse as a Go
  netip.Prefix; port lists are trimmed, split on ",", each entry trimmed and
  parsed as a 16-bit unsigned decimal; newer Istio also accepts "a:b" and "a:"
  port ranges. istio-cni applies the same checks (cni/pkg/plugin/sidecar_redirect.go).
- The injection template turns them into istio-iptables flags
  (manifests/charts/istio-control/istio-discovery/files/injection-template.yaml):
  -i includeOutboundIPRanges (default "*"), -x excludeOutboundIPRanges,
  -b includeInboundPorts (default "*"), -d "15090,15021," + excludeInboundPorts
  with status.sidecar.istio.io/port (default 15020) appended unless it is 0 or
  already listed (template.go excludeInboundPort), -q includeOutboundPorts,
  -o excludeOutboundPorts. These are the values with no mesh-wide defaults;
  decide() prefers istio-init's arguments, which include them (installed.py).
- istio-iptables (tools/istio-iptables/pkg/capture/run.go): "*" is a wildcard
  only as the whole value; an empty value means an empty list.

A value Istio would reject is "malformed"; a value Istio accepts but the
datapath cannot express (port ranges) is "unsupported". Either way the pod is
not accelerated: there is never a partly applied policy.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

from merbridge_py.mesh import MeshProfile
from merbridge_py.policy.model import ALL_PORTS, IPNetwork, PodPolicy

INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
STATUS_PORT = "status.sidecar.istio.io/port"

# injection-template.yaml: `-d "15090,15021,{{ excludeInboundPort ... }}"`;
# the status port defaults to values.yaml global.proxy.statusPort.
INJECTOR_EXEMPT_INBOUND_PORTS = (15090, 15021)
DEFAULT_STATUS_PORT = 15020

POLICY_ANNOTATIONS = (
    INCLUDE_OUTBOUND_IP_RANGES, EXCLUDE_OUTBOUND_IP_RANGES, INCLUDE_INBOUND_PORTS,
    EXCLUDE_INBOUND_PORTS, INCLUDE_OUTBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, STATUS_PORT,
)

# What Go's strings.TrimSpace removes (unicode.IsSpace). Python's str.strip()
# would also remove \x1c-\x1f, which Go keeps, so a port like "\x1f80" must fail.
GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"

_DECIMAL = re.compile(r"[0-9]+")              # str pattern: ASCII digits only
_PORT_RANGE = re.compile(r"([0-9]+):([0-9]*)")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]*")   # Go's ParsePrefix refuses "08", "+8", "-0"
MAX_PORT = 65535
_SHOWN_VALUE_CHARS = 100
# What one pod may cost the agent. The datapath holds at most 128 rules per
# direction, so longer lists could never be accelerated anyway; refusing them
# by size before parsing keeps a hostile 250 KB annotation from costing a
# parse and a rule compilation (about 0.4-0.8 s).
MAX_ANNOTATION_BYTES = 16384
MAX_LIST_ENTRIES = 1024


class PolicyError(ValueError):
    """An annotation value that keeps the pod from being accelerated."""

    def __init__(self, annotation: str, value: object, problem: str, unsupported: bool = False,
                 too_large: bool = False):
        super().__init__(annotation, value, problem)
        self.annotation = annotation
        self.value = value
        self.problem = problem
        self.unsupported = unsupported
        self.too_large = too_large

    @property
    def code(self) -> str:
        """The reason code (a metrics label) of a pod refused for this."""
        return "annotation_too_large" if self.too_large else "malformed_annotation"

    def __str__(self) -> str:
        what = ("annotation over the agent's limit" if self.too_large else
                "annotation the datapath cannot honour" if self.unsupported else "malformed annotation")
        return f"{what} {self.annotation}: {show(self.value)} ({self.problem})"


def show(value: object) -> str:
    """A value quoted for a one-line reason: escapes make invisible characters visible."""
    if isinstance(value, str):
        if len(value) > _SHOWN_VALUE_CHARS:
            return json.dumps(value[:_SHOWN_VALUE_CHARS]) + "..."
        return json.dumps(value)
    text = repr(value)
    return text if len(text) <= _SHOWN_VALUE_CHARS else text[:_SHOWN_VALUE_CHARS] + "..."


def go_trim_space(text: str) -> str:
    return text.strip(GO_SPACE)


T = TypeVar("T")


def dedupe(items: Iterable[T]) -> tuple[T, ...]:
    """First occurrence wins: in a first-match rule list a repeated rule is dead."""
    return tuple(dict.fromkeys(items))


def parse_port(annotation: str, raw: str, item: str) -> int:
    """One entry of a port list, as Istio's parsePort reads it."""
    text = go_trim_space(item)
    if _DECIMAL.fullmatch(text) and int(text) <= MAX_PORT:
        return int(text)
    ranged = _PORT_RANGE.fullmatch(text)
    if ranged:
        start, end = ranged.group(1), ranged.group(2)
        if int(start) <= MAX_PORT and (end == "" or int(start) <= int(end) <= MAX_PORT):
            raise PolicyError(annotation, raw, f"port range {show(text)} is valid for Istio, "
                              "but the datapath matches single ports only", unsupported=True)
    if text == "":
        raise PolicyError(annotation, raw, "empty entry in the port list")
    raise PolicyError(annotation, raw, f"{show(item)} is not a port number 0-{MAX_PORT}")


def _check_entries(annotation: str, raw: str) -> None:
    entries = raw.count(",") + 1
    if entries > MAX_LIST_ENTRIES:
        raise PolicyError(annotation, raw, f"{entries} entries, more than the {MAX_LIST_ENTRIES} this agent reads",
                          too_large=True)


def parse_port_list(annotation: str, raw: str) -> tuple[int, ...]:
    text = go_trim_space(raw)
    if text == "":
        return ()
    _check_entries(annotation, text)
    return dedupe(parse_port(annotation, raw, item) for item in text.split(","))


def parse_prefix(annotation: str, raw: str, item: str) -> IPNetwork:
    """One CIDR, as Go's netip.ParsePrefix reads it (no trimming, "/" required)."""
    address, slash, bits = item.rpartition("/")
    if not slash:
        raise PolicyError(annotation, raw, f"{show(item)} is not a CIDR (no '/')")
    if "%" in address:
        raise PolicyError(annotation, raw, f"{show(item)}: a zone is not allowed in a CIDR")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise PolicyError(annotation, raw, f"{show(item)} is not a CIDR (bad address)") from None
    if not _PREFIX_BITS.fullmatch(bits) or int(bits) > ip.max_prefixlen:
        raise PolicyError(annotation, raw, f"{show(item)} is not a CIDR (bad prefix length)")
    # iptables masks the host bits of "-d 10.1.2.3/8"; so does strict=False.
    return ipaddress.ip_network((ip, int(bits)), strict=False)


def parse_cidr_list(annotation: str, raw: str, wildcard: bool) -> tuple[IPNetwork, ...]:
    if wildcard and raw == "*":
        # Only the whole value is a wildcard; istio-iptables emits one rule with no -d.
        return (ipaddress.IPv4Network("0.0.0.0/0"),)
    if raw == "":
        return ()
    _check_entries(annotation, raw)
    return dedupe(parse_prefix(annotation, raw, item) for item in raw.split(","))


def read_annotation(annotations: Mapping, name: str, default: str | None = None) -> str | None:
    """The annotation's value, `default` if absent; PolicyError if it is not a string
    (Kubernetes stores strings only; an unquoted YAML number or null is a mistake)."""
    if name not in annotations:
        return default
    value = annotations[name]
    if not isinstance(value, str):
        raise PolicyError(name, value, "annotation values are strings; quote it")
    if len(value) > MAX_ANNOTATION_BYTES:
        raise PolicyError(name, value, f"{len(value)} characters, more than the {MAX_ANNOTATION_BYTES} this "
                          "agent reads", too_large=True)
    return value


def parse_policy(annotations: Mapping, mesh: MeshProfile, dns_capture: bool = False) -> PodPolicy:
    """The policy Istio's injector would hand to istio-iptables for these annotations.

    Raises PolicyError for the first annotation (in POLICY_ANNOTATIONS order)
    that Istio would reject or the datapath cannot honour.
    """
    include_ranges = parse_cidr_list(
        INCLUDE_OUTBOUND_IP_RANGES, read_annotation(annotations, INCLUDE_OUTBOUND_IP_RANGES, "*"), wildcard=True)
    exclude_ranges = parse_cidr_list(
        EXCLUDE_OUTBOUND_IP_RANGES, read_annotation(annotations, EXCLUDE_OUTBOUND_IP_RANGES, ""), wildcard=False)

    include_inbound_raw = read_annotation(annotations, INCLUDE_INBOUND_PORTS, ALL_PORTS)
    if include_inbound_raw == ALL_PORTS:  # exact match, as in validate.go and run.go
        include_inbound: tuple = (ALL_PORTS,)
    else:
        include_inbound = parse_port_list(INCLUDE_INBOUND_PORTS, include_inbound_raw)
    exclude_inbound = parse_port_list(EXCLUDE_INBOUND_PORTS, read_annotation(annotations, EXCLUDE_INBOUND_PORTS, ""))
    include_outbound = parse_port_list(INCLUDE_OUTBOUND_PORTS, read_annotation(annotations, INCLUDE_OUTBOUND_PORTS, ""))
    exclude_outbound = parse_port_list(EXCLUDE_OUTBOUND_PORTS, read_annotation(annotations, EXCLUDE_OUTBOUND_PORTS, ""))

    status_raw = read_annotation(annotations, STATUS_PORT, None)
    status_port = DEFAULT_STATUS_PORT if status_raw is None else parse_port(STATUS_PORT, status_raw, status_raw)
    # The template writes "-d 15090,15021,<excludeInboundPorts>" and appends
    # the status port unless it is 0 or already listed: a moved status port
    # replaces 15020, which is then captured like any other port.
    extra = (status_port,) if status_port else ()
    exclude_inbound = dedupe(INJECTOR_EXEMPT_INBOUND_PORTS + exclude_inbound + extra)

    return PodPolicy(
        include_outbound_ip_ranges=include_ranges,
        exclude_outbound_ip_ranges=exclude_ranges,
        include_inbound_ports=include_inbound,
        exclude_inbound_ports=exclude_inbound,
        include_outbound_ports=include_outbound,
        exclude_outbound_ports=exclude_outbound,
        dns_capture=dns_capture,
    )

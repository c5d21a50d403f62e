"""Property tests of the decision step (hypothesis).

1. Any string in any policy annotation: decide() never raises, and either its
   policy equals an independent reference parse written here from Istio's
   validation rules (pkg/kube/inject/validate.go, template.go), or the pod is
   not accelerated with a reason naming a rejected annotation.
2. For arbitrary policies, addresses and ports, walking compile_rules' first-match
   lists (what the kernel does) answers exactly like the reference model
   captures_outbound / captures_inbound.
3. Arbitrary JSON-like objects never make decide() raise or hit its internal-error guard.
"""

import ipaddress
import re
from ipaddress import IPv4Network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merbridge_py.mesh import ISTIO
from merbridge_py.policy import (
    PodPolicy, captures_inbound, captures_outbound, compile_rules, decide,
    first_match_inbound, first_match_outbound,
)

T = "traffic.sidecar.istio.io/"
RANGE_ANNOTATIONS = (T + "includeOutboundIPRanges", T + "excludeOutboundIPRanges")
PORT_ANNOTATIONS = (T + "includeInboundPorts", T + "excludeInboundPorts", T + "includeOutboundPorts",
                    T + "excludeOutboundPorts", "status.sidecar.istio.io/port")
ALL_ANNOTATIONS = RANGE_ANNOTATIONS + PORT_ANNOTATIONS
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- an independent reference parse -----------------------------------------
# Written from Istio's rules, in a different style from merbridge_py.policy.annotations
# (regular expressions instead of character handling).

# Go's unicode.IsSpace set, as strings.TrimSpace uses it.
_WS = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*"
_PORT_ITEM = re.compile(f"{_WS}([0-9]+){_WS}")
_RANGE_ITEM = re.compile(f"{_WS}[0-9]+:[0-9]*{_WS}")
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_CIDR = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})/(3[0-2]|[12]?[0-9])")


class Rejected(Exception):
    pass


def ref_ports(value: str) -> list[int]:
    if re.fullmatch(_WS, value):
        return []
    ports = []
    for item in value.split(","):
        m = _PORT_ITEM.fullmatch(item)
        if not m or int(m.group(1)) > 65535:
            raise Rejected  # includes "a:b" ranges, which the datapath cannot honour
        ports.append(int(m.group(1)))
    return list(dict.fromkeys(ports))


def ref_single_port(value: str) -> list[int]:
    m = _PORT_ITEM.fullmatch(value)
    if not m or int(m.group(1)) > 65535:
        raise Rejected
    return [int(m.group(1))]


def ref_cidr(item: str):
    m = _IPV4_CIDR.fullmatch(item)
    if m:
        return IPv4Network(item, strict=False)
    address, _, bits = item.rpartition("/")
    if ":" in address and "%" not in address and re.fullmatch("0|[1-9][0-9]{0,2}", bits) and int(bits) <= 128:
        try:
            return ipaddress.IPv6Network(item, strict=False)
        except ValueError:
            pass
    raise Rejected


def ref_ranges(value: str, wildcard: bool) -> list:
    if wildcard and value == "*":
        return [IPv4Network("0.0.0.0/0")]
    return list(dict.fromkeys(ref_cidr(item) for item in value.split(","))) if value else []


def reference_policy(annotations: dict) -> tuple[PodPolicy | None, set[str]]:
    """(policy, names of rejected annotations)"""
    rejected, parsed = set(), {}

    def attempt(name, parse, default):
        try:
            parsed[name] = parse(annotations.get(name, default))
        except Rejected:
            rejected.add(name)

    attempt(T + "includeOutboundIPRanges", lambda v: ref_ranges(v, True), "*")
    attempt(T + "excludeOutboundIPRanges", lambda v: ref_ranges(v, False), "")
    attempt(T + "includeInboundPorts", lambda v: ["*"] if v == "*" else ref_ports(v), "*")
    for name in (T + "excludeInboundPorts", T + "includeOutboundPorts", T + "excludeOutboundPorts"):
        attempt(name, ref_ports, "")
    status = "status.sidecar.istio.io/port"
    if status in annotations:
        attempt(status, ref_single_port, None)
    if rejected:
        return None, rejected
    # -d "15090,15021,<excludeInboundPorts>,<status port>": the status port
    # (default 15020, values.yaml) is appended unless 0; nothing else is implied.
    status_ports = [p for p in parsed.get(status, [15020]) if p != 0]
    excluded_inbound = list(dict.fromkeys([15090, 15021] + parsed[T + "excludeInboundPorts"] + status_ports))
    return PodPolicy(
        include_outbound_ip_ranges=tuple(parsed[T + "includeOutboundIPRanges"]),
        exclude_outbound_ip_ranges=tuple(parsed[T + "excludeOutboundIPRanges"]),
        include_inbound_ports=tuple(parsed[T + "includeInboundPorts"]),
        exclude_inbound_ports=tuple(excluded_inbound),
        include_outbound_ports=tuple(parsed[T + "includeOutboundPorts"]),
        exclude_outbound_ports=tuple(parsed[T + "excludeOutboundPorts"]),
    ), set()


# --- strategies -------------------------------------------------------------

# Mostly values Istio accepts, with the tricky spellings mixed in: whitespace
# (Go's and not-Go's), empty entries, duplicates, ranges, wildcards, bad CIDRs.
spaces = st.sampled_from([""] * 12 + [" ", " ", "\t", "\xa0", "\u3000", "\x1f"])
valid_port = st.integers(0, 65535).map(str)
port_text = st.one_of(*[valid_port] * 8, st.sampled_from(["80", "80", "080", "65536", "+1", "-1",
                                                                          "1:2", "9:", "x", "*", ""]))
valid_v4_cidr = st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=4).map(str), st.integers(0, 32))
cidr_text = st.one_of(
    *[valid_v4_cidr] * 8,
    st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=4).map(str), st.integers(33, 40)),
    st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=6).map(str), st.integers(0, 130)),
    st.sampled_from(["10.0.0.0/8", "", "*", "10.0.0.1", "010.0.0.0/8", "10.0.0.0/08", "fe80::%1/64", "1.2.3.4/ 8"]),
)


def listed(items, pad=spaces):
    """A comma-separated list of items, each maybe padded, maybe a trailing comma."""
    item = st.tuples(pad, items, pad).map("".join)
    return st.builds(lambda xs, trailing: ",".join(xs) + ("," if trailing else ""),
                     st.lists(item, max_size=6), st.sampled_from([False] * 9 + [True]))


def value_for(name: str):
    if name in RANGE_ANNOTATIONS:
        typed = listed(cidr_text, pad=st.sampled_from([""] * 30 + [" ", "\t"]))
    elif name == "status.sidecar.istio.io/port":
        typed = st.tuples(spaces, port_text, spaces).map("".join)
    else:
        typed = listed(port_text)
    return st.one_of(typed, typed, typed, typed, st.text(max_size=20), st.sampled_from(["*", "", " * "]))


annotation_sets = st.fixed_dictionaries({}, optional={name: value_for(name) for name in ALL_ANNOTATIONS})


def pod_with(annotations: dict) -> dict:
    return {"kind": "Pod",
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": [{"name": "app"}, {"name": "istio-proxy"}],
                     "initContainers": [{"name": "istio-init"}]},
            "status": {"podIP": "10.0.0.9"}}


@FAST
@given(st.sampled_from(ALL_ANNOTATIONS).flatmap(lambda name: value_for(name).map(lambda v: {name: v})))
def test_any_value_of_one_annotation_gives_the_reference_policy_or_a_named_refusal(annotations):
    check_against_reference(annotations)


@FAST
@given(annotation_sets)
def test_any_annotation_strings_give_the_reference_policy_or_a_named_refusal(annotations):
    check_against_reference(annotations)


def check_against_reference(annotations):
    verdict = decide(pod_with(annotations))
    expected, rejected = reference_policy(annotations)
    assert "internal error" not in verdict.reason
    if expected is not None:
        assert verdict.policy == expected, verdict.reason
        assert verdict.accelerate or verdict.reason.startswith("not accelerated: policy needs"), verdict.reason
    else:
        assert not verdict.accelerate and verdict.policy is None
        assert any(f" {name}: " in verdict.reason for name in rejected), (verdict.reason, rejected)


@FAST
@given(st.sampled_from(ALL_ANNOTATIONS), st.text())
def test_any_single_string_never_raises(name, value):
    verdict = decide(pod_with({name: value}))
    assert "internal error" not in verdict.reason
    assert verdict.accelerate == (verdict.policy is not None and verdict.reason.startswith("accelerated:"))


# --- compiled first-match lists agree with the reference model -----------------

# Few distinct values, so that generated addresses and ports often hit the policy.
networks = st.builds(lambda a, p: IPv4Network((a, p), strict=False),
                     st.sampled_from(["10.0.0.0", "10.1.2.3", "192.168.7.1", "0.0.0.0", "10.1.0.0"]),
                     st.sampled_from([0, 8, 16, 24, 32]))
ipv6_networks = st.sampled_from([ipaddress.IPv6Network("2001:db8::/32"), ipaddress.IPv6Network("::/0")])
ports = st.sampled_from([1, 53, 80, 443, 5432, 8080, 15008, 15020, 15021, 15090, 65535])
port_tuples = st.lists(st.one_of(ports, st.just(0)), max_size=5).map(lambda xs: tuple(dict.fromkeys(xs)))
range_tuples = st.lists(st.one_of(networks, ipv6_networks), max_size=4).map(lambda xs: tuple(dict.fromkeys(xs)))
policies = st.builds(
    PodPolicy,
    include_outbound_ip_ranges=range_tuples,
    exclude_outbound_ip_ranges=range_tuples,
    include_inbound_ports=st.one_of(st.just(("*",)), port_tuples),
    exclude_inbound_ports=port_tuples,
    include_outbound_ports=port_tuples,
    exclude_outbound_ports=port_tuples,
    dns_capture=st.booleans(),
)
addresses = st.one_of(st.sampled_from(["10.0.0.1", "10.1.2.3", "10.1.9.9", "192.168.7.1", "192.168.7.200",
                                       "8.8.8.8"]), st.ip_addresses(v=4).map(str))
real_ports = st.one_of(ports, st.integers(1, 65535))


@settings(max_examples=1500, deadline=None)
@given(policies, addresses, real_ports)
def test_compiled_outbound_rules_agree_with_the_reference_model(policy, ip, port):
    outbound, _ = compile_rules(policy, ISTIO)
    assert first_match_outbound(outbound, ip, port) == captures_outbound(policy, ip, port)
    # no dead weight: every rule is reachable by its match and the list ends with a capture
    assert len({(r.network, r.port) for r in outbound}) == len(outbound)
    assert not outbound or outbound[-1].capture


@settings(max_examples=1500, deadline=None)
@given(policies, real_ports)
def test_compiled_inbound_rules_agree_with_the_reference_model(policy, port):
    _, inbound = compile_rules(policy, ISTIO)
    assert first_match_inbound(inbound, port) == captures_inbound(policy, port)
    assert len({r.port for r in inbound}) == len(inbound)
    assert not inbound or inbound[-1].capture


# --- arbitrary objects ------------------------------------------------------------

# Leaves include the words a meshed pod is made of, and half the objects have a
# pod's skeleton with random parts, so that random objects do form accelerated
# pods (test_arbitrary_objects_can_be_accelerated shows they do): the property
# below is then about real verdicts both ways.
POD_WORDS = ["istio-proxy", "istio-init", "istio-validation", "Always", "Running", "Succeeded", "10.1.2.3",
             "fd00::1", "true", "false", "TPROXY", "*", "80", "web"]
POD_KEYS = ["metadata", "spec", "status", "name", "annotations", "containers", "initContainers", "podIP",
            "podIPs", "ip", "phase", "hostNetwork", "restartPolicy", "env", "value", "deletionTimestamp",
            "merbridge.io/accelerate"]
leaves = st.none() | st.booleans() | st.integers() | st.sampled_from(POD_WORDS) | st.text(max_size=8)
json_like = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(POD_KEYS), children,
                                                                      max_size=5),
    max_leaves=30,
)
word_or_any = st.sampled_from(POD_WORDS) | json_like


def likely(*words):
    return st.sampled_from(words) | word_or_any


def containers(*names):
    return st.lists(st.fixed_dictionaries({"name": likely(*names)}, optional={"restartPolicy": likely("Always")}),
                    max_size=3)


pod_shaped = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"name": likely("web")}, optional={
        "annotations": st.dictionaries(st.sampled_from(["merbridge.io/accelerate", "sidecar.istio.io/interceptionMode",
                                                        "traffic.sidecar.istio.io/excludeOutboundPorts"]),
                                       word_or_any, max_size=2),
        "deletionTimestamp": word_or_any}),
    "spec": st.fixed_dictionaries({"containers": containers("istio-proxy", "app"),
                                   "initContainers": containers("istio-init", "istio-validation", "istio-proxy")},
                                  optional={"hostNetwork": word_or_any}),
    "status": st.fixed_dictionaries({"podIP": likely("10.1.2.3", "fd00::1")}, optional={"phase": word_or_any}),
}) | json_like


def _named(items, name):
    return [c for c in items if isinstance(c, dict) and c.get("name") == name] if isinstance(items, list) else []


def assert_accelerated_pod_is_well_formed(obj, verdict):
    """What must hold of any object decide() accelerates, read independently of decide()."""
    assert isinstance(obj, dict)
    meta, spec, status = obj.get("metadata"), obj.get("spec"), obj.get("status") or {}
    assert isinstance(meta, dict) and isinstance(meta.get("name"), str) and meta["name"]
    assert meta.get("deletionTimestamp") is None
    annotations = meta.get("annotations") or {}
    assert annotations.get("merbridge.io/accelerate", "true") == "true"
    assert isinstance(spec, dict) and spec.get("hostNetwork") in (None, False)
    assert _named(spec.get("containers"), "istio-proxy") or [
        c for c in _named(spec.get("initContainers"), "istio-proxy") if c.get("restartPolicy") == "Always"]
    assert _named(spec.get("initContainers"), "istio-init") or _named(spec.get("initContainers"), "istio-validation")
    assert status.get("phase") not in ("Succeeded", "Failed")
    ips = [status.get("podIP")] + [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, dict)]
    assert verdict.ips and verdict.ips[0] in ips and ipaddress.ip_address(verdict.ips[0]).version == 4
    assert verdict.reason.startswith("accelerated: ")


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_like, pod_shaped))
def test_arbitrary_objects_get_a_verdict_that_agrees_with_the_object(obj):
    verdict = decide(obj)
    assert "internal error" not in verdict.reason
    if verdict.accelerate:
        assert_accelerated_pod_is_well_formed(obj, verdict)
    else:
        assert verdict.reason.startswith("not accelerated: ")


def test_arbitrary_objects_can_be_accelerated():
    """The strategy above reaches accelerated verdicts, so its property is not vacuous."""
    from hypothesis import find
    found = find(pod_shaped, lambda obj: decide(obj).accelerate, settings=settings(max_examples=2000, database=None))
    assert_accelerated_pod_is_well_formed(found, decide(found))

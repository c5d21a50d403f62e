"""Unit tests of the decision step (merbridge_py.policy).

Expected values come from Istio's own sources and tests, named per test:
  [golden]   tools/istio-iptables/pkg/capture/testdata/*.golden (rule order)
  [run.go]   tools/istio-iptables/pkg/capture/run.go
  [validate] pkg/kube/inject/validate.go (what the injector accepts)
  [template] manifests/charts/istio-control/istio-discovery/files/injection-template.yaml
             and pkg/kube/inject/template.go (annotation -> istio-iptables flag)
"""

import copy
import json
from ipaddress import IPv4Network

import pytest

from merbridge_py.layout import MAX_INBOUND_RULES, MAX_OUTBOUND_RULES
from merbridge_py.mesh import ISTIO
from merbridge_py.policy import (
    InboundRule, OutboundRule, PodPolicy, Verdict, captures_inbound, captures_outbound,
    compile_rules, decide, first_match_inbound, first_match_outbound,
)

T = "traffic.sidecar.istio.io/"
ANY = IPv4Network("0.0.0.0/0")


def make_pod(annotations=None, native=False, setup="istio-init", ips=("10.244.1.7",), **extra):
    """A pod as Istio's injector leaves it: app + istio-proxy + istio-init (or variants)."""
    containers = [{"name": "app", "image": "nginx"}]
    init = [{"name": setup}] if setup else []
    proxy = {"name": "istio-proxy", "image": "istio/proxyv2"}
    if native:
        init.append({**proxy, "restartPolicy": "Always"})
    else:
        containers.append(proxy)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "annotations": dict(annotations or {})},
        "spec": {"containers": containers, "initContainers": init},
        "status": {"phase": "Running", "podIP": ips[0] if ips else None,
                   "podIPs": [{"ip": ip} for ip in ips]},
    }
    for path, value in extra.items():   # e.g. spec__hostNetwork=True
        *parents, leaf = path.split("__")
        node = pod
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return pod


def policy_of(**annotations) -> PodPolicy:
    verdict = decide(make_pod({T + k: v for k, v in annotations.items()}))
    assert verdict.policy is not None, verdict.reason
    return verdict.policy


def rules_of(**annotations):
    return compile_rules(policy_of(**annotations), ISTIO)


# --- which pods are accelerated ---------------------------------------------

def test_classic_sidecar_with_istio_init_is_accelerated():
    v = decide(make_pod())
    assert v.accelerate and v.reason == "accelerated: istio sidecar (classic, istio-init)"
    assert (v.pod, v.mesh, v.ips) == ("shop/web-0", "istio", ("10.244.1.7",))


def test_native_sidecar_with_istio_cni_is_accelerated():
    v = decide(make_pod(native=True, setup="istio-validation"))
    assert v.accelerate and v.reason == "accelerated: istio sidecar (native, istio-cni); policy from istio-cni annotations"


def test_init_container_named_istio_proxy_without_restart_policy_always_is_not_a_sidecar():
    pod = make_pod(native=True)
    del pod["spec"]["initContainers"][1]["restartPolicy"]
    v = decide(pod)
    assert not v.accelerate
    assert "no istio-proxy sidecar" in v.reason and "restartPolicy: Always" in v.reason


def test_pod_without_proxy_is_not_accelerated():
    pod = make_pod()
    pod["spec"]["containers"] = [{"name": "app"}]
    v = decide(pod)
    assert (v.accelerate, v.reason) == (False, "not accelerated: no istio-proxy sidecar")
    assert v.policy is not None  # the parsed policy is still shown


def test_inject_false_annotation_is_irrelevant_when_the_proxy_is_there():
    # The injector reads sidecar.istio.io/inject at admission; a pod that has
    # the proxy (e.g. istioctl kube-inject) is meshed whatever the annotation says.
    v = decide(make_pod({"sidecar.istio.io/inject": "false"}))
    assert v.accelerate


@pytest.mark.parametrize("mutate, reason", [
    (lambda p: p["spec"].update(hostNetwork=True), "not accelerated: hostNetwork pod"),
    (lambda p: p["metadata"].update(deletionTimestamp="2025-01-01T00:00:00Z"),
     "not accelerated: pod is being deleted"),
    (lambda p: p["status"].update(phase="Succeeded"), "not accelerated: pod phase is Succeeded"),
    (lambda p: p["status"].update(phase="Failed"), "not accelerated: pod phase is Failed"),
    (lambda p: p.update(status={}), "not accelerated: no pod IP yet"),
    (lambda p: p["status"].update(podIP="fd00::7", podIPs=[{"ip": "fd00::7"}]),
     "not accelerated: IPv6-only pod (fd00::7); only pods with an IPv4 address are accelerated"),
    (lambda p: p["spec"].update(initContainers=[]),
     "not accelerated: no istio-init or istio-validation init container"),
])
def test_not_accelerated_reasons(mutate, reason):
    pod = make_pod()
    mutate(pod)
    v = decide(pod)
    assert not v.accelerate and v.reason.startswith(reason), v.reason


def test_pending_pod_with_an_ip_is_accelerated_before_its_first_connection():
    assert decide(make_pod(status__phase="Pending")).accelerate


def test_dual_stack_pod_is_accelerated_for_both_families():
    v = decide(make_pod(ips=("fd00::7", "10.244.1.7")))
    assert v.accelerate and v.ips == ("10.244.1.7",)
    assert "; IPv4 and IPv6" in v.reason
    assert v.to_json()["families"] == {"ipv4": {"accelerated": True, "reason": "accelerated", "address": "10.244.1.7"},
                                       "ipv6": {"accelerated": True, "reason": "accelerated", "address": "fd00::7"}}


def test_ipv4_only_pod_says_why_ipv6_is_not_accelerated():
    families = decide(make_pod()).to_json()["families"]
    assert families["ipv4"]["accelerated"] and not families["ipv6"]["accelerated"]
    assert families["ipv6"]["reason"] == "the pod has no IPv6 address"


def test_a_policy_read_from_ipv4_rules_leaves_ipv6_to_iptables():
    import dataclasses

    from merbridge_py.policy.rules import family_verdicts
    v = decide(make_pod(ips=("fd00::7", "10.244.1.7")))
    from_rules = dataclasses.replace(v, policy=dataclasses.replace(v.policy, source="iptables rules"))
    ipv4, ipv6 = family_verdicts(from_rules, ("fd00::7",))
    assert ipv4.accelerated and not ipv6.accelerated and "iptables rules" in ipv6.reason


def test_ipv4_only_sources_are_the_live_rule_sources():
    from merbridge_py.policy.capture import SOURCE_IPTABLES, SOURCE_NFTABLES
    from merbridge_py.policy.rules import IPV4_ONLY_SOURCES
    assert IPV4_ONLY_SOURCES == (SOURCE_IPTABLES, SOURCE_NFTABLES)


def test_not_accelerated_pod_is_not_accelerated_for_either_family():
    v = decide(make_pod(ips=("fd00::7", "10.244.1.7"), annotations={"merbridge.io/accelerate": "false"}))
    assert not v.accelerate
    assert [f["accelerated"] for f in v.to_json()["families"].values()] == [False, False]


def test_pod_ip_without_pod_ips_is_used():
    pod = make_pod()
    del pod["status"]["podIPs"]
    assert decide(pod).ips == ("10.244.1.7",)


@pytest.mark.parametrize("value, accelerate, reason", [
    ("true", True, "accelerated"),
    ("false", False, 'not accelerated: opted out (merbridge.io/accelerate: "false")'),
    ("False", False, 'not accelerated: malformed annotation merbridge.io/accelerate: "False"'),
    ("", False, 'not accelerated: malformed annotation merbridge.io/accelerate: ""'),
])
def test_opt_out_annotation(value, accelerate, reason):
    v = decide(make_pod({"merbridge.io/accelerate": value}))
    assert v.accelerate == accelerate and v.reason.startswith(reason), v.reason


@pytest.mark.parametrize("mode, accelerate, reason", [
    # [validate] validateInterceptionMode: REDIRECT, TPROXY, NONE; anything else is invalid
    ("REDIRECT", True, "accelerated"),
    ("TPROXY", False, "not accelerated: interception mode TPROXY (annotation sidecar.istio.io/interceptionMode)"
                      " is left to Istio's iptables"),
    ("NONE", False, "not accelerated: interception mode NONE"),
    ("redirect", False, 'not accelerated: malformed annotation sidecar.istio.io/interceptionMode: "redirect"'),
])
def test_interception_mode_annotation(mode, accelerate, reason):
    v = decide(make_pod({"sidecar.istio.io/interceptionMode": mode}))
    assert v.accelerate == accelerate and v.reason.startswith(reason), v.reason


def test_tproxy_recorded_in_the_proxy_env_wins_over_a_later_annotation():
    # [template] ISTIO_META_INTERCEPTION_MODE is written at injection time, the
    # mode istio-init used; an annotation edited afterwards does not change iptables.
    pod = make_pod({"sidecar.istio.io/interceptionMode": "REDIRECT"})
    pod["spec"]["containers"][1]["env"] = [{"name": "ISTIO_META_INTERCEPTION_MODE", "value": "TPROXY"}]
    v = decide(pod)
    assert not v.accelerate and "TPROXY (proxy env ISTIO_META_INTERCEPTION_MODE)" in v.reason


def test_exclude_interfaces_cannot_be_honoured():
    v = decide(make_pod({T + "excludeInterfaces": "net1"}))
    assert not v.accelerate
    assert v.reason.startswith("not accelerated: policy cannot be honoured exactly: " + T + "excludeInterfaces")


def test_owner_group_filters_cannot_be_honoured():
    # [run.go] handleCaptureByOwnerGroup: ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE) filter capture by gid
    pod = make_pod()
    pod["spec"]["initContainers"][0]["env"] = [{"name": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "value": "888"}]
    v = decide(pod)
    assert not v.accelerate and "process group" in v.reason


def test_every_non_accelerated_case_has_its_own_reason():
    cases = {
        "no proxy": make_pod(spec__containers=[{"name": "app"}]),
        "hostNetwork": make_pod(spec__hostNetwork=True),
        "no ip": make_pod(ips=()),
        "ipv6 only": make_pod(ips=("fd00::1",)),
        "deleting": make_pod(metadata__deletionTimestamp="2025-01-01T00:00:00Z"),
        "finished": make_pod(status__phase="Succeeded"),
        "tproxy": make_pod({"sidecar.istio.io/interceptionMode": "TPROXY"}),
        "none": make_pod({"sidecar.istio.io/interceptionMode": "NONE"}),
        "opt-out": make_pod({"merbridge.io/accelerate": "false"}),
        "no init": make_pod(setup=None),
        "malformed": make_pod({T + "excludeOutboundPorts": "http"}),
        "range": make_pod({T + "excludeOutboundPorts": "8000:9000"}),
        "too big": make_pod({T + "excludeOutboundPorts": ",".join(map(str, range(1000, 1200)))}),
        "malformed pod": {"kind": "Pod", "metadata": {"name": "x"}},
    }
    reasons = {name: decide(pod).reason.split(":")[1] for name, pod in cases.items()}
    assert all(not decide(pod).accelerate for pod in cases.values())
    assert len(set(reasons.values())) == len(reasons), reasons


# --- malformed objects never raise ------------------------------------------

@pytest.mark.parametrize("pod, problem", [
    (None, "expected a mapping, got NoneType"),
    ([], "expected a mapping, got list"),
    ({}, "metadata is missing"),
    ({"metadata": {"name": "x"}}, "spec is missing"),
    ({"metadata": {"name": ""}, "spec": {}}, "metadata.name is missing"),
    ({"metadata": {"name": "x", "annotations": ["a"]}, "spec": {}}, "metadata.annotations is not a mapping"),
    ({"metadata": {"name": "x"}, "spec": {"containers": "istio-proxy"}}, "spec.containers is not a list"),
    ({"metadata": {"name": "x"}, "spec": {"initContainers": [1]}}, "spec.initContainers[0] is not a mapping"),
    ({"metadata": {"name": "x"}, "spec": {"hostNetwork": "yes"}}, "spec.hostNetwork is not a boolean"),
    ({"metadata": {"name": "x"}, "spec": {}, "status": {"podIP": "10.0.0.300"}},
     'status.podIP is not an IP address: "10.0.0.300"'),
    ({"metadata": {"name": "x"}, "spec": {}, "status": {"podIPs": [{"ip": 7}]}},
     "status.podIPs[0].ip is not a string"),
])
def test_malformed_pod_objects_get_a_verdict_naming_the_field(pod, problem):
    v = decide(pod)
    assert isinstance(v, Verdict) and not v.accelerate and v.policy is None
    assert v.reason == f"not accelerated: malformed pod object: {problem}"
    json.dumps(v.to_json())


def test_namespace_defaults_to_default():
    pod = make_pod()
    del pod["metadata"]["namespace"]
    assert decide(pod).pod == "default/web-0"


def test_non_string_annotation_value_is_named():
    # YAML `status.sidecar.istio.io/port: 15020` (unquoted) is an int; Kubernetes stores strings only.
    v = decide(make_pod({"status.sidecar.istio.io/port": 15020}))
    assert not v.accelerate and v.policy is None
    assert v.reason.startswith("not accelerated: malformed annotation status.sidecar.istio.io/port: 15020")


# --- annotation semantics ---------------------------------------------------

def test_defaults_match_the_injection_template():
    # [template] -i includeIPRanges default "*", -x "", -b `*`, -d "15090,15021," + status port 15020
    assert decide(make_pod()).to_json()["policy"] == {
        "include_outbound_ip_ranges": ["0.0.0.0/0"],
        "exclude_outbound_ip_ranges": [],
        "include_inbound_ports": ["*"],
        "exclude_inbound_ports": [15090, 15021, 15020],
        "include_outbound_ports": [],
        "exclude_outbound_ports": [],
        "proxy_uid": 1337,
        "proxy_gid": 1337,
        "source": "annotations",
    }


def test_default_rules_capture_everything_but_the_exempt_and_tunnel_ports():
    # [golden] inbound-ports-wildcard: "--dport 15008 -j RETURN" first, then -d RETURNs, then ISTIO_IN_REDIRECT
    outbound, inbound = compile_rules(decide(make_pod()).policy, ISTIO)
    assert outbound == [OutboundRule(ANY, 0, True)]
    assert inbound == [InboundRule(15008, False), InboundRule(15090, False), InboundRule(15021, False),
                       InboundRule(15020, False), InboundRule(0, True)]


@pytest.mark.parametrize("status, expected", [
    (None, [15090, 15021, 8080, 15020]),             # values.yaml global.proxy.statusPort: 15020
    ("15999", [15090, 15021, 8080, 15999]),          # a moved status port replaces 15020 (which is captured)
    ("8080", [15090, 15021, 8080]),                  # already listed: not repeated
    ("0", [15090, 15021, 8080]),                     # 0 = no status port: nothing appended
    (" 15999 ", [15090, 15021, 8080, 15999]),        # [validate] parsePort trims
])
def test_status_port_is_merged_into_exclude_inbound_ports(status, expected):
    # [template] -d "15090,15021,{{ excludeInboundPort(statusPort, excludeInboundPorts) }}":
    # 15090/15021 are literal, the status port is appended to the user's list.
    # 15999 is just an example of a moved status port, not a port Istio uses.
    annotations = {T + "excludeInboundPorts": "8080"}
    if status is not None:
        annotations["status.sidecar.istio.io/port"] = status
    policy = decide(make_pod(annotations)).policy
    assert list(policy.exclude_inbound_ports) == expected
    assert captures_inbound(policy, 15020) == (status is not None)


def test_empty_status_port_is_malformed():
    # [validate] validateStatusPort -> parsePort("") fails
    v = decide(make_pod({"status.sidecar.istio.io/port": ""}))
    assert not v.accelerate and "status.sidecar.istio.io/port" in v.reason


def test_ip_range_golden_exclude_before_include():
    # [golden] ip-range: -x 1.1.0.0/16 -i 9.9.0.0/16 ->
    #   -A ISTIO_OUTPUT -d 1.1.0.0/16 -j RETURN ; -A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT
    outbound, _ = rules_of(excludeOutboundIPRanges="1.1.0.0/16", includeOutboundIPRanges="9.9.0.0/16")
    assert outbound == [OutboundRule(IPv4Network("1.1.0.0/16"), 0, False),
                        OutboundRule(IPv4Network("9.9.0.0/16"), 0, True)]


def test_outbound_ports_include_golden():
    # [golden] outbound-ports-include (-q 32000,31000, no -i): one ISTIO_REDIRECT rule per port
    outbound, _ = rules_of(includeOutboundIPRanges="", includeOutboundPorts="32000,31000")
    assert outbound == [OutboundRule(ANY, 32000, True), OutboundRule(ANY, 31000, True)]


def test_outbound_ports_exclude_come_first():
    # [golden] outbound-ports-exclude: the -o RETURN rules are the first in ISTIO_OUTPUT
    outbound, _ = rules_of(excludeOutboundPorts="22,80,443", excludeOutboundIPRanges="10.0.0.0/8",
                           includeOutboundPorts="5432")
    assert outbound == [OutboundRule(ANY, 22, False), OutboundRule(ANY, 80, False), OutboundRule(ANY, 443, False),
                        OutboundRule(IPv4Network("10.0.0.0/8"), 0, False), OutboundRule(ANY, 5432, True),
                        OutboundRule(ANY, 0, True)]


def test_inbound_ports_include_golden():
    # [golden] inbound-ports-include: -b 32000,31000 -> 15008 RETURN, then one ISTIO_IN_REDIRECT per port
    _, inbound = rules_of(includeInboundPorts="32000,31000")
    assert inbound == [InboundRule(15008, False), InboundRule(32000, True), InboundRule(31000, True)]


def test_inbound_wildcard_exclude_golden():
    # [golden] inbound-wildcard-exclude: -b * -d 22,80,443 -> RETURN for each, then ISTIO_IN_REDIRECT
    policy = policy_of(excludeInboundPorts="22,80,443")
    assert policy.exclude_inbound_ports == (15090, 15021, 22, 80, 443, 15020)
    assert [captures_inbound(policy, p) for p in (22, 80, 443, 8080, 15008)] == [False, False, False, True, False]


def test_tunnel_port_is_never_captured_even_when_listed():
    # [run.go] the "--dport 15008 -j RETURN" rule is appended to ISTIO_INBOUND before any include rule
    policy = policy_of(includeInboundPorts="15008,8080")
    _, inbound = compile_rules(policy, ISTIO)
    assert not first_match_inbound(inbound, 15008) and first_match_inbound(inbound, 8080)


def test_empty_include_lists_capture_nothing():
    # [run.go] handleInboundPortsInclude does nothing for ""; handleOutboundIncludeRules nothing for no CIDRs
    policy = policy_of(includeOutboundIPRanges="", includeInboundPorts="")
    assert policy.include_outbound_ip_ranges == () and policy.include_inbound_ports == ()
    assert compile_rules(policy, ISTIO) == ([], [])
    assert "the policy captures no connections" in decide(make_pod(
        {T + "includeOutboundIPRanges": "", T + "includeInboundPorts": ""})).reason
    assert not captures_outbound(policy, "10.0.0.1", 80) and not captures_inbound(policy, 8080)


def test_exclude_inbound_ports_have_no_effect_with_an_include_list():
    # [run.go] -d is only applied when -b is "*" (see also istio/istio#11660)
    v = decide(make_pod({T + "includeInboundPorts": "8080", T + "excludeInboundPorts": "8080"}))
    assert captures_inbound(v.policy, 8080)
    assert "excludeInboundPorts has no effect" in v.reason


def test_exclude_ranges_beat_include_ranges_and_include_ports():
    policy = policy_of(includeOutboundIPRanges="10.0.0.0/8", excludeOutboundIPRanges="10.1.0.0/16",
                       includeOutboundPorts="5432")
    assert captures_outbound(policy, "10.2.0.1", 80)
    assert not captures_outbound(policy, "10.1.2.3", 80)
    assert not captures_outbound(policy, "10.1.2.3", 5432)    # -x before -q
    assert captures_outbound(policy, "192.168.0.1", 5432)      # -q: any address outside -x
    assert not captures_outbound(policy, "192.168.0.1", 80)    # outside -i


def test_exclude_ports_beat_everything():
    policy = policy_of(includeOutboundPorts="5432", excludeOutboundPorts="5432")
    assert not captures_outbound(policy, "10.0.0.1", 5432)


@pytest.mark.parametrize("annotation, value, expected", [
    # [validate] parsePorts: the list and every entry are trimmed
    ("excludeOutboundPorts", " 80, 443 ", [80, 443]),
    ("excludeOutboundPorts", "80,80,443", [80, 443]),          # duplicates: a repeated rule is dead
    ("excludeOutboundPorts", "0080", [80]),                     # ParseUint accepts leading zeros
    ("excludeOutboundPorts", "", []),
    ("includeOutboundPorts", "\t", []),
    ("excludeOutboundIPRanges", "10.1.2.3/8", ["10.0.0.0/8"]),  # iptables masks the host bits
    ("excludeOutboundIPRanges", "10.0.0.0/8,10.0.0.0/8", ["10.0.0.0/8"]),
    ("includeOutboundIPRanges", "", []),
    ("includeOutboundIPRanges", "2001:db8::/32", ["2001:db8::/32"]),
])
def test_accepted_values(annotation, value, expected):
    key = {"excludeOutboundPorts": "exclude_outbound_ports", "includeOutboundPorts": "include_outbound_ports",
           "excludeOutboundIPRanges": "exclude_outbound_ip_ranges",
           "includeOutboundIPRanges": "include_outbound_ip_ranges"}[annotation]
    v = decide(make_pod({T + annotation: value}))
    assert v.accelerate, v.reason
    assert v.to_json()["policy"][key] == expected


@pytest.mark.parametrize("annotation, value, problem", [
    # [validate] validateCIDRList: strings.Split without trimming, netip.ParsePrefix per entry
    ("excludeOutboundIPRanges", "10.0.0.0/8, 172.16.0.0/12", '" 172.16.0.0/12" is not a CIDR'),
    ("excludeOutboundIPRanges", "10.0.0.0/8,", '"" is not a CIDR'),
    ("excludeOutboundIPRanges", "10.0.0.1", "no '/'"),
    ("excludeOutboundIPRanges", "010.0.0.0/8", "bad address"),
    ("excludeOutboundIPRanges", "10.0.0.0/08", "bad prefix length"),
    ("excludeOutboundIPRanges", "10.0.0.0/33", "bad prefix length"),
    ("excludeOutboundIPRanges", "*", "no '/'"),                 # no wildcard for -x
    ("excludeOutboundIPRanges", "fe80::/10%eth0", "bad prefix length"),
    ("excludeOutboundIPRanges", "fe80::%eth0/10", "zone"),
    ("includeOutboundIPRanges", " *", "no '/'"),                # "*" only as the whole value
    ("includeOutboundIPRanges", "*,10.0.0.0/8", "no '/'"),
    # [validate] parsePorts / parsePort: ParseUint(trimmed, 10, 16)
    ("excludeOutboundPorts", "80,", "empty entry"),
    ("excludeOutboundPorts", "65536", "not a port number"),
    ("excludeOutboundPorts", "-1", "not a port number"),
    ("excludeOutboundPorts", "+80", "not a port number"),
    ("excludeOutboundPorts", "http", "not a port number"),
    ("excludeOutboundPorts", "\x1f80", "not a port number"),    # not whitespace to Go's TrimSpace
    ("excludeInboundPorts", "6000,7000,", "empty entry"),       # accepted by istio-iptables, not by the injector
    ("excludeInboundPorts", "*", "not a port number"),
    ("includeInboundPorts", " * ", "not a port number"),
    ("includeOutboundPorts", "*", "not a port number"),
    ("excludeOutboundPorts", "9000:8000", "not a port number"),
])
def test_malformed_values_name_the_annotation_and_the_value(annotation, value, problem):
    v = decide(make_pod({T + annotation: value}))
    assert not v.accelerate and v.policy is None
    assert v.reason.startswith(f"not accelerated: malformed annotation {T}{annotation}: {json.dumps(value)} (")
    assert problem in v.reason


@pytest.mark.parametrize("value", ["8000:9000", "8000:", " 15000:15001 "])
def test_port_ranges_are_valid_for_istio_but_not_honoured(value):
    # newer [validate] parsePort accepts "start:end" and "start:"; the datapath matches single ports
    v = decide(make_pod({T + "excludeOutboundPorts": value}))
    assert not v.accelerate and v.policy is None
    assert v.reason.startswith(f"not accelerated: annotation the datapath cannot honour {T}excludeOutboundPorts")
    assert "port range" in v.reason


def test_ipv6_ranges_reach_the_ipv6_rules_only():
    # [golden] ipv6-ipnets: IPv6 CIDRs only produce ip6tables rules; the IPv4 chain gets no -i rule,
    # ip6tables' ISTIO_OUTPUT gets "-d 2001:db8::/32 -j RETURN" then "-d 2001:db8::/32 -j ISTIO_REDIRECT"
    from merbridge_py.policy.rules import compile_rules6, first_match_outbound
    v = decide(make_pod({T + "includeOutboundIPRanges": "2001:db8::/32",
                         T + "excludeOutboundIPRanges": "2001:db8::/32"}))
    assert v.accelerate
    assert compile_rules(v.policy, ISTIO)[0] == []
    assert not captures_outbound(v.policy, "10.0.0.1", 80)
    assert compile_rules6(v.policy) == []   # the RETURN comes first: nothing captured
    v = decide(make_pod({T + "includeOutboundIPRanges": "2001:db8::/32,10.0.0.0/8",
                         T + "excludeOutboundIPRanges": "2001:db8:1::/48", T + "excludeOutboundPorts": "5432"}))
    rules6 = compile_rules6(v.policy)
    assert [(str(r.network), r.port, r.capture) for r in rules6] == [
        ("::/0", 5432, False), ("2001:db8:1::/48", 0, False), ("2001:db8::/32", 0, True)]
    assert first_match_outbound(rules6, "2001:db8::5", 80)
    assert not first_match_outbound(rules6, "2001:db8:1::5", 80)
    assert not first_match_outbound(rules6, "2001:db8::5", 5432)
    assert not first_match_outbound(rules6, "fd00::5", 80)
    assert [str(r.network) for r in compile_rules(v.policy, ISTIO)[0]] == ["0.0.0.0/0", "10.0.0.0/8"]


def test_port_zero_never_becomes_an_any_port_rule():
    # "--dport 0" matches no connection; in the datapath port 0 means "any port".
    policy = policy_of(excludeOutboundPorts="0", includeInboundPorts="0,8080")
    outbound, inbound = compile_rules(policy, ISTIO)
    assert outbound == [OutboundRule(ANY, 0, True)]
    assert inbound == [InboundRule(15008, False), InboundRule(8080, True)]
    assert captures_outbound(policy, "10.0.0.1", 80)


def test_dns_capture_leaves_tcp_53_to_iptables():
    # [run.go] with REDIRECT_DNS (ISTIO_META_DNS_CAPTURE) TCP/53 goes to istio-agent on 15053, not 15001
    pod = make_pod()
    pod["spec"]["containers"][1]["env"] = [{"name": "ISTIO_META_DNS_CAPTURE", "value": "true"}]
    v = decide(pod)
    # (the outbound rules leave port 53 alone; DNS capture is policy/dns.py's decision, tests/test_dns_policy.py)
    assert v.accelerate and v.policy.dns_capture and "DNS: DNS servers are read from the pod's installed rules" in v.reason
    outbound, _ = compile_rules(v.policy, ISTIO)
    assert outbound == [OutboundRule(ANY, 53, False), OutboundRule(ANY, 0, True)]
    assert not first_match_outbound(outbound, "10.96.0.10", 53)
    assert "dns_capture" not in json.dumps(v.to_json())


# --- datapath size limits ---------------------------------------------------

def test_policy_that_fills_the_outbound_rules_exactly_is_accelerated():
    ports = ",".join(str(p) for p in range(1000, 1000 + MAX_OUTBOUND_RULES - 1))
    v = decide(make_pod({T + "excludeOutboundPorts": ports}))
    assert v.accelerate and len(compile_rules(v.policy, ISTIO)[0]) == MAX_OUTBOUND_RULES


def test_policy_needing_more_outbound_rules_than_the_datapath_holds_is_refused_not_truncated():
    ports = ",".join(str(p) for p in range(1000, 1000 + MAX_OUTBOUND_RULES))
    v = decide(make_pod({T + "excludeOutboundPorts": ports}))
    assert not v.accelerate
    assert v.reason == f"not accelerated: policy needs {MAX_OUTBOUND_RULES + 1} outbound rules, the datapath holds 128"
    assert len(v.policy.exclude_outbound_ports) == MAX_OUTBOUND_RULES  # the policy itself is shown whole


def test_policy_needing_too_many_inbound_rules_is_refused():
    ports = ",".join(str(p) for p in range(2000, 2000 + MAX_INBOUND_RULES))
    v = decide(make_pod({T + "excludeInboundPorts": ports}))
    assert not v.accelerate and "inbound rules, the datapath holds 128" in v.reason


def test_rules_shadowed_by_an_earlier_match_are_dropped():
    # -o 80 then -q 80: iptables keeps both, but the second can never be reached
    outbound, _ = rules_of(excludeOutboundPorts="80", includeOutboundPorts="80,443")
    assert outbound == [OutboundRule(ANY, 80, False), OutboundRule(ANY, 443, True), OutboundRule(ANY, 0, True)]


def test_rules_that_can_never_capture_do_not_count():
    # 200 excluded ports with nothing included: no connection is captured, so no rules are needed
    ports = ",".join(str(p) for p in range(1000, 1200))
    v = decide(make_pod({T + "excludeOutboundPorts": ports, T + "includeOutboundIPRanges": ""}))
    assert v.accelerate and compile_rules(v.policy, ISTIO)[0] == []


# --- JSON shape ---------------------------------------------------------------

def test_to_json_has_exactly_the_documented_shape():
    v = decide(make_pod({T + "includeInboundPorts": "8080", T + "excludeOutboundIPRanges": "169.254.169.254/32"}))
    doc = json.loads(json.dumps(v.to_json()))
    assert list(doc) == ["pod", "accelerate", "reason", "mesh", "ips", "policy", "families"]
    assert doc["policy"] == {
        "include_outbound_ip_ranges": ["0.0.0.0/0"],
        "exclude_outbound_ip_ranges": ["169.254.169.254/32"],
        "include_inbound_ports": [8080],
        "exclude_inbound_ports": [15090, 15021, 15020],
        "include_outbound_ports": [],
        "exclude_outbound_ports": [],
        "proxy_uid": 1337,
        "proxy_gid": 1337,
        "source": "annotations",
    }


def test_decide_does_not_modify_the_pod():
    pod = make_pod({T + "excludeOutboundPorts": "80"})
    before = copy.deepcopy(pod)
    decide(pod)
    assert pod == before

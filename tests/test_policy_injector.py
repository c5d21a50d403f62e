"""decide() against the test bed's model of Istio's injector (hypothesis).

For random annotation sets and random mesh-wide injection defaults, in
istio-init and in istio-cni mode, the pod object the test bed builds (what the
injector would have produced) is decided, and the policy decide() reports must
equal the flags Istio's rules are built from (testbed/istio_iptables.py
installed_flags), compared as sets in the test's own reading of those flags.
"""

from ipaddress import ip_network

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merbridge_py.policy import decide
from merbridge_py.testbed import istio_iptables as ii
from merbridge_py.testbed import kube
from merbridge_py.testbed.topology import Node, Pod

EXAMPLES = 400
NODE = Node("n0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/sys/fs/cgroup/x", "/sys/fs/bpf/x")

port = st.integers(1, 65535).map(str)
port_list = st.lists(port, max_size=4).map(",".join)
cidr = st.one_of(
    st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=4).map(str), st.integers(0, 32)),
    st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=6).map(str), st.integers(0, 128)),
    st.sampled_from(["10.0.0.0/8", "10.96.0.0/12", "192.168.0.0/16"]),
)
cidr_list = st.lists(cidr, max_size=3).map(",".join)
status_port = st.one_of(port, st.sampled_from(["15020", "0", "15021"]))

ANNOTATION_VALUES = {
    ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: st.one_of(st.just("*"), cidr_list),
    ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES: cidr_list,
    ii.ANN_INCLUDE_INBOUND_PORTS: st.one_of(st.just("*"), port_list),
    ii.ANN_EXCLUDE_INBOUND_PORTS: port_list,
    ii.ANN_INCLUDE_OUTBOUND_PORTS: port_list,
    ii.ANN_EXCLUDE_OUTBOUND_PORTS: port_list,
    ii.ANN_STATUS_PORT: status_port,
}
annotation_sets = st.fixed_dictionaries({}, optional=ANNOTATION_VALUES)
mesh_defaults = st.builds(
    ii.MeshDefaults,
    include_ip_ranges=st.one_of(st.just("*"), cidr_list),
    exclude_ip_ranges=cidr_list,
    include_inbound_ports=st.one_of(st.just("*"), port_list),
    exclude_inbound_ports=port_list,
    include_outbound_ports=port_list,
    exclude_outbound_ports=port_list,
    status_port=status_port,
    proxy_uid=st.sampled_from([1337, 1000720000, 1001]),
)


def _ports(value: str) -> set[int]:
    return {int(p) for p in value.split(",") if p.strip()}


def _ranges(value: str) -> set:
    if value == "*":
        return {ip_network("0.0.0.0/0")}
    return {ip_network(c, strict=False) for c in value.split(",") if c}


def expected(flags: ii.CaptureFlags) -> dict:
    """What Istio's rules built from these flags capture, as sets."""
    all_inbound = flags.include_inbound_ports == "*"
    return {
        "include_ranges": _ranges(flags.include_outbound_ip_ranges),
        "exclude_ranges": _ranges(flags.exclude_outbound_ip_ranges),
        "include_inbound": "*" if all_inbound else _ports(flags.include_inbound_ports),
        "exclude_inbound": _ports(flags.exclude_inbound_ports) if all_inbound else None,
        "include_outbound": _ports(flags.include_outbound_ports),
        "exclude_outbound": _ports(flags.exclude_outbound_ports),
        "uid": int(flags.proxy_uid),
        "gid": int(flags.proxy_gid),
    }


def reported(policy) -> dict:
    all_inbound = policy.captures_all_inbound_ports
    return {
        "include_ranges": set(policy.include_outbound_ip_ranges),
        "exclude_ranges": set(policy.exclude_outbound_ip_ranges),
        "include_inbound": "*" if all_inbound else set(policy.include_inbound_ports),
        "exclude_inbound": set(policy.exclude_inbound_ports) if all_inbound else None,
        "include_outbound": set(policy.include_outbound_ports),
        "exclude_outbound": set(policy.exclude_outbound_ports),
        "uid": policy.proxy_uid,
        "gid": policy.proxy_gid,
    }


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(annotations=annotation_sets, mesh=mesh_defaults, cni=st.booleans())
def test_decide_reports_what_the_injected_rules_capture(annotations, mesh, cni):
    pod = Pod("web", "n0", "10.244.0.5", "mbp-x", True, "/x", dict(annotations), [8080], "veth0", "10.96.0.5")
    verdict = decide(kube.pod_object("tb", pod, NODE, mesh=mesh, cni=cni))
    # every proxy uid is accelerated: the kernel takes the pod's own (pod_policy.proxy_uid)
    assert verdict.accelerate, verdict.reason
    assert reported(verdict.policy) == expected(ii.installed_flags(annotations, mesh, cni=cni))
    assert verdict.policy.source == ("istio-cni annotations" if cni else "istio-init arguments")


def test_the_issue_examples():
    """A cluster installed with excludeIPRanges=10.0.0.0/8 and excludeOutboundPorts=5432,
    and one whose proxies run as 1000720000: decide() honours the values the
    injector put into istio-init's arguments although no annotation names them."""
    mesh = ii.MeshDefaults(exclude_ip_ranges="10.0.0.0/8", exclude_outbound_ports="5432", proxy_uid=1000720000)
    pod = Pod("web", "n0", "10.244.0.5", "mbp-x", True, "/x", {}, [8080], "veth0", "10.96.0.5")
    verdict = decide(kube.pod_object("tb", pod, NODE, mesh=mesh))
    policy = verdict.policy
    assert [str(n) for n in policy.exclude_outbound_ip_ranges] == ["10.0.0.0/8"]
    assert policy.exclude_outbound_ports == (5432,)
    assert (policy.proxy_uid, policy.proxy_gid) == (1000720000, 1000720000)
    assert verdict.accelerate, verdict.reason

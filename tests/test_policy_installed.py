"""Reading back what Istio installed (merbridge_py/policy/installed.py).

1. Round trips (hypothesis): random istio-iptables flags -> the test bed's
   iptables rules -> the parser -> the same flags; the same through the
   test bed's nftables rules, real `nft -f` and `nft -j` in a throwaway
   namespace (bpf-marked: needs root), and through real iptables-restore /
   iptables-save.
2. istio-init argument lists as the injector writes them, and malformed ones.
3. Anything not recognised is an error with a reason; choose() refuses when a
   source would leave alone what the chosen one captures.
"""

import json
import os
import shutil
import uuid
from ipaddress import IPv4Network, ip_network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from merbridge_py import sandbox
from merbridge_py.policy import decide
from merbridge_py.policy import installed as inst
from merbridge_py.testbed import istio_iptables as ii
from merbridge_py.testbed import istio_nftables as nft
from merbridge_py.testbed.istio_iptables import CaptureFlags

DATA = Path(__file__).parent / "data"
ROUND_TRIPS = 300
LIVE_ROUND_TRIPS = 60
LIVE_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)   # shrinking through real binaries takes minutes

# --- flag strategies ----------------------------------------------------------

port = st.integers(1, 65535)
ports = st.lists(port, max_size=20, unique=True).map(lambda ps: ",".join(map(str, ps)))
v4_cidr = st.builds(lambda a, b: str(ip_network(f"{a}/{b}", strict=False)), st.ip_addresses(v=4), st.integers(0, 32))
v6_cidr = st.builds(lambda a, b: str(ip_network(f"{a}/{b}", strict=False)), st.ip_addresses(v=6), st.integers(0, 128))
cidrs = st.lists(st.one_of(v4_cidr, v4_cidr, v6_cidr, st.sampled_from(["127.1.2.3/32", "0.0.0.0/0"])),
                 max_size=4, unique=True).map(",".join)
ids = st.lists(st.integers(1, 2 ** 31), min_size=1, max_size=2, unique=True).map(lambda xs: ",".join(map(str, xs)))
flag_sets = st.builds(
    lambda uid, gid, same, dns, servers, **kw: CaptureFlags(
        proxy_uid=uid, proxy_gid=uid if same else gid, redirect_dns=dns and bool(servers),
        dns_servers=tuple(servers) if dns else (), **kw),
    uid=ids, gid=ids, same=st.booleans(), dns=st.booleans(),
    servers=st.lists(st.ip_addresses(v=4).map(str), max_size=2, unique=True),
    proxy_port=port, inbound_capture_port=port,
    include_outbound_ip_ranges=st.one_of(st.just("*"), cidrs),
    exclude_outbound_ip_ranges=cidrs,
    include_inbound_ports=st.one_of(st.just("*"), st.just(""), ports),
    exclude_inbound_ports=ports, include_outbound_ports=ports, exclude_outbound_ports=ports,
)


def expected(flags: CaptureFlags) -> dict:
    """What the rules built from these flags say, in the test's own reading:
    IPv4 only (IPv6 ranges go to ip6tables), -d only with -b '*'."""
    def v4(value):
        if value == "*":
            return {IPv4Network("0.0.0.0/0")}
        return {n for n in (ip_network(c) for c in value.split(",") if c) if n.version == 4}

    def numbers(value):
        return {int(p) for p in value.split(",") if p}
    all_inbound = flags.include_inbound_ports == "*"
    return {
        "include_ranges": v4(flags.include_outbound_ip_ranges),
        "exclude_ranges": v4(flags.exclude_outbound_ip_ranges),
        "include_inbound": "*" if all_inbound else numbers(flags.include_inbound_ports),
        "exclude_inbound": numbers(flags.exclude_inbound_ports) if all_inbound else None,
        "include_outbound": numbers(flags.include_outbound_ports),
        "exclude_outbound": numbers(flags.exclude_outbound_ports),
        "dns": flags.redirect_dns,
        "uids": [int(x) for x in flags.proxy_uid.split(",")],
        "gids": [int(x) for x in flags.proxy_gid.split(",")],
        "ports": (flags.proxy_port, flags.inbound_capture_port),
    }


def parsed(capture: inst.Capture) -> dict:
    p = capture.policy
    all_inbound = p.captures_all_inbound_ports
    return {
        "include_ranges": set(p.include_outbound_ip_ranges),
        "exclude_ranges": set(p.exclude_outbound_ip_ranges),
        "include_inbound": "*" if all_inbound else set(p.include_inbound_ports),
        "exclude_inbound": set(p.exclude_inbound_ports) if all_inbound else None,
        "include_outbound": set(p.include_outbound_ports),
        "exclude_outbound": set(p.exclude_outbound_ports),
        "dns": p.dns_capture,
        "uids": list(capture.proxy_uids),
        "gids": list(capture.proxy_gids),
        "ports": (capture.proxy_port, capture.inbound_port),
    }


# --- 1. round trips -----------------------------------------------------------------

@settings(max_examples=ROUND_TRIPS, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=flag_sets)
def test_iptables_rules_read_back_as_their_flags(flags):
    capture = inst.from_iptables_save(ii.restore_payload(flags))
    assert parsed(capture) == expected(flags)
    assert capture.source == "iptables rules"


@settings(max_examples=ROUND_TRIPS, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=flag_sets)
def test_istio_init_args_read_back_as_their_flags(flags):
    """The argv the injector writes (istio_iptables.CaptureFlags.argv) parses
    to the flags; IPv6 ranges stay in the policy (they are Istio's values)."""
    capture = inst.from_args(flags.argv(), dns_env=flags.redirect_dns)
    got = parsed(capture)
    got["include_ranges"] = {n for n in got["include_ranges"] if n.version == 4}
    got["exclude_ranges"] = {n for n in got["exclude_ranges"] if n.version == 4}
    want = expected(flags)
    if want["include_inbound"] != "*":
        got["exclude_inbound"] = None
    assert got == want


def needs_root(binary: str):
    if os.geteuid() != 0 or shutil.which(binary) is None:
        pytest.skip(f"needs root and {binary}")


@pytest.fixture(scope="module")
def scratch_netns():
    name = f"mbp-rt-{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(name)
    try:
        yield name
    finally:
        sandbox.netns_delete(name)


@pytest.mark.bpf
@settings(max_examples=LIVE_ROUND_TRIPS, deadline=None, phases=LIVE_PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flags=flag_sets)
def test_live_iptables_rules_read_back_as_their_flags(scratch_netns, flags):
    needs_root("iptables-save")
    ns = scratch_netns
    sandbox.sh("iptables-restore", "--noflush", netns=ns, input=ii.restore_payload(flags))
    try:
        capture = inst.from_iptables_save(sandbox.sh("iptables-save", "-t", "nat", netns=ns))
    finally:
        sandbox.sh("iptables-restore", netns=ns, input=ii.flush_payload(flags))
    assert parsed(capture) == expected(flags)


@pytest.mark.bpf
@settings(max_examples=LIVE_ROUND_TRIPS, deadline=None, phases=LIVE_PHASES,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flags=flag_sets)
def test_live_nftables_rules_read_back_as_their_flags(scratch_netns, flags):
    needs_root("nft")
    ns = scratch_netns
    sandbox.sh("nft", "-f", "-", netns=ns, input=nft.script(flags))
    try:
        capture = inst.from_nft_json(sandbox.sh("nft", "-j", "list", "ruleset", netns=ns))
    finally:
        sandbox.sh("nft", "-f", "-", netns=ns, input=nft.delete_script(flags))
    assert parsed(capture) == expected(flags)
    assert capture.source == "nftables rules"
    assert "istio-proxy" not in sandbox.sh("nft", "list", "ruleset", netns=ns)


def test_nft_json_fixture_reads_back():
    """tests/data/istio-nftables-ruleset.json: real `nft -j list ruleset` (nft
    1.0.6) after the test bed loaded -b 8080 -i 10.0.0.0/8 -x 10.96.0.0/12
    -o 5432 -q 443 -u 1000720000 (the JSON drops `meta l4proto tcp` where a
    tcp port match implies it, and prints /32 prefixes as plain addresses)."""
    capture = inst.from_nft_json((DATA / "istio-nftables-ruleset.json").read_text())
    assert parsed(capture) == expected(CaptureFlags(
        include_inbound_ports="8080", exclude_outbound_ip_ranges="10.96.0.0/12", include_outbound_ip_ranges="10.0.0.0/8",
        proxy_uid="1000720000", proxy_gid="1000720000", exclude_outbound_ports="5432", include_outbound_ports="443"))


# --- 2. istio-init arguments ------------------------------------------------------------

def test_args_as_the_template_writes_them():
    argv = ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1000720000", "-m", "REDIRECT", "-i", "*",
            "-x", "10.0.0.0/8", "-b", "*", "-d", "15090,15021,15020", "-o", "5432",
            "--log_output_level=default:info"]
    capture = inst.from_args(argv)
    assert (capture.proxy_uids, capture.proxy_gids) == ((1000720000,), (1000720000,))   # -g defaults to -u
    assert capture.policy.exclude_outbound_ip_ranges == (IPv4Network("10.0.0.0/8"),)
    assert capture.policy.exclude_outbound_ports == (5432,)
    assert capture.policy.exclude_inbound_ports == (15090, 15021, 15020)
    # pflag spellings: --long=value, --long value, -xVALUE
    assert inst.from_args(["--istio-service-exclude-cidr=10.0.0.0/8", "-u1001", "--envoy-port", "15001"]) \
        .policy.exclude_outbound_ip_ranges == (IPv4Network("10.0.0.0/8"),)


@pytest.mark.parametrize("argv, problem", [
    (["-y", "1"], "unknown istio-iptables flag"),
    (["--frobnicate"], "unknown istio-iptables flag"),
    (["-p"], "has no value"),
    (["-u", "istio-proxy"], "numeric ids"),
    (["-o", "99999"], "not a port"),
    (["-x", "10.0.0.0"], "not a CIDR"),
    (["-m", "NONE"], "REDIRECT or TPROXY"),
    (["-c", "eth1"], "excludes interfaces"),
    (["--run-validation", "--skip-rule-apply"], "installed no rules"),
    (["stray"], "unexpected"),
])
def test_bad_args_are_named(argv, problem):
    with pytest.raises(inst.InstalledError, match=problem):
        inst.from_args(argv)


# --- 3. exactness and choosing ---------------------------------------------------------

DEFAULT = ii.restore_payload(ii.flags_from_annotations({}))


@pytest.mark.parametrize("change, problem", [
    (lambda t: t.replace("-A ISTIO_OUTPUT -j ISTIO_REDIRECT", "-A ISTIO_OUTPUT -m comment --comment x -j ISTIO_REDIRECT"),
     "match module"),
    (lambda t: t.replace("COMMIT", "-A ISTIO_OUTPUT -p tcp --dport 9 -j DROP\nCOMMIT", 1), "unrecognised rule"),
    (lambda t: t.replace("-A OUTPUT -j ISTIO_OUTPUT", "-A OUTPUT -j ISTIO_OUTPUT\n-A OUTPUT -j ACCEPT"), "OUTPUT"),
    (lambda t: t.replace("--to-ports 15001", "--to-ports 15001 --random"), "not something Istio"),
    (lambda t: t.replace("-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN\n", ""), "passthrough"),
    (lambda t: t.replace("* nat", "* filter"), "no Istio nat rules"),
    (lambda t: t.replace("-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN\n", ""), "uid 1337 RETURN"),
])
def test_unrecognised_iptables_rules_are_errors_with_a_reason(change, problem):
    with pytest.raises(inst.InstalledError, match=problem):
        inst.from_iptables_save(change(DEFAULT))


def test_tproxy_tables_and_missing_tables_are_refused():
    doc = json.loads((DATA / "istio-nftables-ruleset.json").read_text())
    doc["nftables"].append({"table": {"family": "inet", "name": "istio-proxy-mangle", "handle": 9}})
    with pytest.raises(inst.InstalledError, match="mangle"):
        inst.from_nft_json(json.dumps(doc))
    with pytest.raises(inst.InstalledError, match="no table inet istio-proxy-nat"):
        inst.from_nft_json(json.dumps({"nftables": [{"metainfo": {}}]}))


def capture_of(**annotations):
    return inst.from_cni_annotations({f"traffic.sidecar.istio.io/{k}": v for k, v in annotations.items()},
                                     1337, 1337, False)


def test_choose_prefers_rules_and_accepts_a_spec_that_captures_more():
    rules = inst.from_iptables_save(ii.restore_payload(ii.installed_flags({}, ii.MeshDefaults(exclude_ip_ranges="10.0.0.0/8"),
                                                                          cni=True)))
    chosen = inst.choose([rules, capture_of()])
    assert chosen.source == "iptables rules" and chosen.policy.exclude_outbound_ip_ranges == (IPv4Network("10.0.0.0/8"),)
    assert any("would capture more" in n for n in chosen.notes)


def test_choose_refuses_when_a_source_leaves_alone_what_the_chosen_one_captures():
    """A pod whose annotation was patched after istio-cni applied its rules:
    the rules capture 5432, the annotation now says to leave it alone."""
    rules = inst.from_iptables_save(ii.restore_payload(ii.installed_flags({}, cni=True)))
    with pytest.raises(inst.Refused) as refused:
        inst.choose([rules, capture_of(excludeOutboundPorts="5432")])
    assert "outbound to 0.0.0.0:5432" in str(refused.value)
    assert "-o '15020'" in str(refused.value) and "-o '5432'" in str(refused.value)


def test_choose_refuses_other_proxy_ids_and_unreadable_rules():
    rules = inst.from_iptables_save(ii.restore_payload(CaptureFlags(proxy_uid="1000720000", proxy_gid="1000720000",
                                                                    include_outbound_ip_ranges="*")))
    with pytest.raises(inst.Refused, match="proxy_uids: \\(1000720000,\\) vs \\(1337,\\)"):
        inst.choose([rules, capture_of()])
    with pytest.raises(inst.Refused, match="cannot be read exactly"):
        inst.choose([inst.InstalledError("broken"), capture_of()])


def test_decide_keeps_the_rules_behaviour_or_refuses_after_an_annotation_patch():
    from merbridge_py.testbed import kube
    from merbridge_py.testbed.topology import Node, Pod
    node = Node("n0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/x", "/y")
    pod = Pod("web", "n0", "10.244.0.5", "mbp-x", True, "/x", {}, [8080], "veth0", "10.96.0.5")
    obj = kube.pod_object("tb", pod, node, cni=True)
    rules = inst.from_iptables_save(ii.restore_payload(ii.installed_flags({}, cni=True)))
    assert decide(obj, installed=rules).accelerate
    obj["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = "5432"   # patched later
    verdict = decide(obj, installed=rules)
    assert not verdict.accelerate and "leave alone" in verdict.reason and verdict.code == "installed_mismatch"
    obj["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = ""       # captures more
    verdict = decide(obj, installed=rules)
    assert verdict.accelerate and verdict.policy.exclude_outbound_ports == (15020,)
    assert "policy from iptables rules" in verdict.reason
    unreadable = decide(obj, installed=inst.InstalledError("no Istio nat rules"))
    assert not unreadable.accelerate and unreadable.code == "rules_unreadable"


# --- reading a namespace ------------------------------------------------------------------

def fake_runner(outputs: dict):
    def run(path, argv):
        return outputs.get(argv[0])
    return run


def legacy(*names, ipv6=()):
    """/proc/net/ip_tables_names (and ip6_tables_names) listing these tables."""
    return lambda path, names_file="ip_tables_names": set(ipv6 if names_file == "ip6_tables_names" else names)


# what `nft -j list ruleset` shows of chains iptables-nft made
IPTABLES_NFT_CHAINS = json.dumps({"nftables": [{"chain": {"family": "ip", "table": "nat", "name": "ISTIO_OUTPUT"}}]})


def test_read_netns_uses_whichever_kind_of_rules_is_there():
    ipt = ii.restore_payload(ii.flags_from_annotations({}))
    ruleset = (DATA / "istio-nftables-ruleset.json").read_text()
    assert inst.read_netns("/p", fake_runner({"iptables-legacy-save": ipt, "nft": "{}"}), legacy("nat")) \
        .source == "iptables rules"
    assert inst.read_netns("/p", fake_runner({"iptables-nft-save": ipt, "nft": IPTABLES_NFT_CHAINS}), legacy()) \
        .source == "iptables rules"
    assert inst.read_netns("/p", fake_runner({"iptables-nft-save": ipt, "nft": ruleset}), legacy()) \
        .source == "nftables rules"     # no ISTIO_ chains in an ip table: iptables-nft-save is not asked
    both = inst.read_netns("/p", fake_runner({"iptables-legacy-save": ipt, "nft": ruleset}), legacy("nat"))
    assert isinstance(both, inst.InstalledError) and "more than one kind" in str(both)
    none = inst.read_netns("/p", fake_runner({"iptables-nft-save": "", "nft": '{"nftables": []}'}), legacy("filter"))
    assert isinstance(none, inst.NoIstioRules) and "no Istio rules" in str(none)
    # without nft, iptables-nft-save looks for itself
    assert inst.read_netns("/p", fake_runner({"iptables-nft-save": ipt}), legacy()).source == "iptables rules"
    bad = inst.read_netns("/p", fake_runner({"nft": "not json"}), legacy())
    assert isinstance(bad, inst.InstalledError) and not isinstance(bad, inst.NoIstioRules)


@pytest.mark.bpf
def test_read_netns_reads_real_rules_of_both_kinds():
    """Both rule kinds installed in a throwaway namespace with the real
    binaries and read back through nsenter, the way the agent would."""
    needs_root("nft")
    needs_root("iptables-save")
    ns = f"mbp-rt-{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(ns)
    try:
        path = f"/run/netns/{ns}"
        assert "no Istio rules" in str(inst.read_netns(path))
        flags = ii.flags_from_annotations({}, mesh=ii.MeshDefaults(exclude_ip_ranges="10.0.0.0/8", proxy_uid=1001))
        sandbox.sh("iptables-restore", "--noflush", netns=ns, input=ii.restore_payload(flags))
        got = inst.read_netns(path)
        assert got.source == "iptables rules" and parsed(got) == expected(flags)
        sandbox.sh("iptables-restore", netns=ns, input=ii.flush_payload(flags))
        sandbox.sh("nft", "-f", "-", netns=ns, input=nft.script(flags))
        got = inst.read_netns(path)
        assert got.source == "nftables rules" and parsed(got) == expected(flags)
        sandbox.sh("iptables-restore", "--noflush", netns=ns, input=ii.restore_payload(flags))
        assert "more than one kind" in str(inst.read_netns(path))
    finally:
        sandbox.netns_delete(ns)


@pytest.mark.bpf
def test_reading_creates_nothing_and_finds_legacy_rules():
    """Reading a namespace leaves it as it was (`iptables-legacy-save -t nat`
    would create an empty legacy nat table: measured), and rules installed
    with iptables-legacy are found through /proc/net/ip_tables_names."""
    needs_root("iptables-legacy-restore")
    ns = f"mbp-rt-{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(ns)
    try:
        path = f"/run/netns/{ns}"
        assert isinstance(inst.read_netns(path), inst.NoIstioRules)
        assert "nat" not in sandbox.sh("sh", "-c", "cat /proc/net/ip_tables_names 2>/dev/null || true", netns=ns)
        assert "table" not in sandbox.sh("nft", "list", "ruleset", netns=ns)
        flags = ii.flags_from_annotations({}, mesh=ii.MeshDefaults(exclude_outbound_ports="5432"))
        sandbox.sh("iptables-legacy-restore", "--noflush", netns=ns, input=ii.restore_payload(flags))
        got = inst.read_netns(path)
        assert got.source == "iptables rules" and parsed(got) == expected(flags)
    finally:
        sandbox.netns_delete(ns)


def test_rules_are_read_once_per_namespace_and_spec():
    reads = []
    cache = inst.InstalledRulesCache(reader=lambda path: reads.append(path) or inst.InstalledError(path))
    pod = {"metadata": {"uid": "u1", "annotations": {"a": "1"}}, "spec": {"initContainers": [{"name": "istio-init"}]}}
    for _ in range(3):
        cache.get("u1", 11, "/proc/1/ns/net", inst.spec_key(pod))
    assert reads == ["/proc/1/ns/net"]
    pod["metadata"]["annotations"]["a"] = "2"                                  # spec changed
    cache.get("u1", 11, "/proc/1/ns/net", inst.spec_key(pod))
    cache.get("u1", 12, "/proc/2/ns/net", inst.spec_key(pod))                  # new namespace (pod restarted)
    assert reads == ["/proc/1/ns/net", "/proc/1/ns/net", "/proc/2/ns/net"] and cache.reads == 3
    cache.retain([])
    cache.get("u1", 12, "/proc/2/ns/net", inst.spec_key(pod))
    assert cache.reads == 4


def test_istio_init_pod_whose_annotation_was_patched_keeps_its_rules_or_is_refused():
    """istio-init's arguments are immutable: an annotation patched later that
    would leave alone what they capture is refused, naming both values; one
    that would capture more changes nothing; a malformed one is named."""
    from merbridge_py.testbed import kube
    from merbridge_py.testbed.topology import Node, Pod
    node = Node("n0", 0, "mbp-n0", "10.244.0.0/24", "10.244.0.1", "192.168.0.2", "/x", "/y")
    pod = Pod("web", "n0", "10.244.0.5", "mbp-x", True, "/x", {ii.ANN_EXCLUDE_INBOUND_PORTS: "22"}, [8080],
              "veth0", "10.96.0.5")
    obj = kube.pod_object("tb", pod, node, mesh=ii.MeshDefaults(exclude_ip_ranges="10.0.0.0/8", status_port="15999"))
    ann = obj["metadata"]["annotations"]
    assert decide(obj).accelerate                        # -d 15090,15021,22,15999 agrees with the annotation
    ann[ii.ANN_EXCLUDE_INBOUND_PORTS] = "22,23"          # patched: 23 is captured by the rules
    assert "inbound to port 23" in decide(obj).reason
    ann[ii.ANN_EXCLUDE_INBOUND_PORTS] = "22"
    ann[ii.ANN_EXCLUDE_OUTBOUND_PORTS] = "8080"
    refused = decide(obj)
    assert not refused.accelerate and refused.code == "installed_mismatch"
    assert "outbound to 0.0.0.0:8080" in refused.reason and "-o '8080'" in refused.reason
    ann[ii.ANN_EXCLUDE_OUTBOUND_PORTS] = "70000"
    assert decide(obj).code == "malformed_annotation"
    del ann[ii.ANN_EXCLUDE_OUTBOUND_PORTS]
    ann[ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES] = ""           # would capture 10/8 too
    kept = decide(obj)
    assert kept.accelerate and [str(n) for n in kept.policy.exclude_outbound_ip_ranges] == ["10.0.0.0/8"]
    assert "annotations would capture more" in kept.reason

"""The pod's IPv6 policy from the ip6tables rules Istio installed (issue 14 on
top of issue 11's ground truth): the IPv6 parser against the IPv6 halves of
Istio's goldens and the bed's generator, the merge with the IPv4 rules
(live_rules.with_ipv6), the per-family verdicts, and a read-back of real
rules in a throwaway namespace that must create no table.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import replace
from ipaddress import ip_network

import pytest

from merbridge_py import sandbox
from merbridge_py.mesh import ISTIO
from merbridge_py.policy import live_rules as lr
from merbridge_py.policy.model import Verdict
from merbridge_py.policy.rules import compile_rules6, family_verdicts, first_match_outbound
from merbridge_py.testbed import istio_ip6tables as i6, istio_iptables as ii
from test_testbed_ipv6 import GOLDENS, golden_halves

ADDR6 = "fd00:10:244::5"


def nets(*texts):
    return tuple(ip_network(t) for t in texts)


def read_both(flags, servers6=()):
    """The merged capture of the bed generator's two halves for these flags."""
    return lr.with_ipv6(lr.from_iptables_save(ii.restore_payload(flags)),
                        lr.from_ip6tables_save(i6.restore_payload(flags, servers6)))


def ipv6_verdict(capture):
    verdict = Verdict("ns/p", True, "accelerated: x", ISTIO.name, ("10.244.0.5",), capture.policy)
    return family_verdicts(verdict, (ADDR6,))[1]


# --- Istio's goldens ---------------------------------------------------------------------

@pytest.mark.parametrize("golden", sorted(GOLDENS))
def test_ipv6_golden_reads_as_its_flags(golden):
    """The IPv6 half of each Istio golden reads back as the flags Istio's test
    ran with; goldens with kube virt interfaces (PREROUTING -i) are refused,
    as the IPv4 reader refuses their IPv4 half."""
    flags, servers6 = GOLDENS[golden]
    ipv4, ipv6 = golden_halves(golden)
    # goldens hold iptables-restore input; iptables-save prints "-I X 1" as "-A X"
    ipv6_text = "\n".join(line.replace("-I PREROUTING 1 ", "-A PREROUTING ") for line in ipv6)
    if flags.kube_virt_interfaces:
        with pytest.raises(lr.InstalledError, match='"-i" is not something'):
            lr.from_ip6tables_save(ipv6_text)
        return
    got = lr.from_ip6tables_save(ipv6_text)
    assert got.source == "ip6tables rules"
    assert got.proxy_uids == tuple(int(u) for u in flags.proxy_uid.split(","))
    assert got.proxy_gids == tuple(int(g) for g in flags.proxy_gid.split(","))
    assert (got.proxy_port, got.inbound_port) == (flags.proxy_port, flags.inbound_capture_port)
    p = got.policy
    assert all(n.version == 6 for n in p.include_outbound_ip_ranges + p.exclude_outbound_ip_ranges)
    include = [x for x in flags.include_inbound_ports.split(",") if x]
    assert p.include_inbound_ports == (("*",) if include == ["*"] else tuple(int(x) for x in include))
    assert p.include_outbound_ports == tuple(int(x) for x in flags.include_outbound_ports.split(",") if x)
    merged = lr.with_ipv6(lr.from_iptables_save("\n".join(ipv4)), got)
    assert merged.policy.ipv6_exact and merged.policy.ipv6_refused is None, merged.policy.ipv6_refused


def test_ipv6_ranges_of_a_golden_without_its_virt_interfaces():
    """ipv6-ipnets' -i/-x 2001:db8::/32 (its eth0/eth1 dropped, which the
    reader refuses): the exclusion wins, as in ip6tables' order."""
    flags = replace(GOLDENS["ipv6-ipnets"][0], kube_virt_interfaces="")
    got = read_both(flags)
    assert got.policy.include_outbound_ip_ranges == nets("2001:db8::/32")
    assert got.policy.exclude_outbound_ip_ranges == nets("2001:db8::/32")
    assert not first_match_outbound(compile_rules6(got.policy), "2001:db8::1", 80)


# --- the bed's generator: ranges, wildcard, loopback ------------------------------------

def test_each_family_keeps_its_own_ranges():
    flags = ii.flags_from_annotations({ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8,2001:db8::/32",
                                       ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES: "10.1.0.0/16,2001:db8:1::/48"})
    got = read_both(flags)
    p = got.policy
    assert p.ipv6_exact and p.ipv6_refused is None
    assert p.include_outbound_ip_ranges == nets("10.0.0.0/8", "2001:db8::/32")
    assert p.exclude_outbound_ip_ranges == nets("10.1.0.0/16", "2001:db8:1::/48")
    rules6 = compile_rules6(p)
    assert first_match_outbound(rules6, "2001:db8:2::1", 80)
    assert not first_match_outbound(rules6, "2001:db8:1::1", 80)
    assert not first_match_outbound(rules6, "2001:db9::1", 80)
    assert ipv6_verdict(got).accelerated


def test_wildcard_is_read_per_family_not_spread():
    """-i '*' gives ip6tables its own catch-all (read as ::/0); an IPv4-only
    -i 0.0.0.0/0 gives ip6tables none, and the IPv6 list then captures
    nothing (the spec readers cannot tell those two apart: rules.py)."""
    star = read_both(ii.flags_from_annotations({ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "*"})).policy
    assert star.include_outbound_ip_ranges == nets("0.0.0.0/0", "::/0")
    assert first_match_outbound(compile_rules6(star), "2001:db8::1", 80)
    v4_only = read_both(ii.flags_from_annotations({ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "0.0.0.0/0"})).policy
    assert v4_only.include_outbound_ip_ranges == nets("0.0.0.0/0") and v4_only.ipv6_exact
    assert not any(r.capture for r in compile_rules6(v4_only))


def test_ipv6_dns_capture_without_ipv6_resolvers_and_with_them():
    """DNS capture on: ip6tables' proxy uid rules skip port 53 either way;
    ISTIO_OUTPUT_DNS exists only for IPv6 resolvers. Both read exactly."""
    flags = replace(ii.flags_from_annotations({}), redirect_dns=True, dns_servers=("127.0.0.53",))
    for servers6 in ((), ("fd00::53",)):
        got = read_both(flags, servers6)
        assert got.policy.dns_capture and got.policy.ipv6_exact, got.policy.ipv6_refused
        assert not first_match_outbound(compile_rules6(got.policy), "fd00::53", 53)


def test_ipv6_loopback_and_passthrough_must_be_istios():
    text = i6.restore_payload(ii.flags_from_annotations({}))
    with pytest.raises(lr.InstalledError, match="::6 passthrough"):
        lr.from_ip6tables_save(text.replace("-s ::6/128", "-s ::7/128"))
    with pytest.raises(lr.InstalledError, match="always ::1/128"):
        lr.from_ip6tables_save(text.replace("::1/128", "::2/128"))
    with pytest.raises(lr.InstalledError, match="not an IPv6 network"):
        lr.from_ip6tables_save(text.replace("-s ::6/128", "-s 127.0.0.6/32"))
    with pytest.raises(lr.InstalledError, match="not an IPv4 network"):
        lr.from_iptables_save(ii.restore_payload(ii.flags_from_annotations({})).replace("127.0.0.6/32", "::6/128"))


# --- merging with IPv4, per-family verdicts ----------------------------------------------

def test_no_ip6tables_rules_keeps_ipv6_uncaptured():
    ipv4 = lr.from_iptables_save(ii.restore_payload(ii.flags_from_annotations({})))
    got = lr.with_ipv6(ipv4, lr.NoIstioRules("no Istio ip6tables rules in the pod's network namespace"))
    fam = ipv6_verdict(got)
    assert not fam.accelerated and fam.address == ADDR6
    assert "no Istio ip6tables rules" in fam.reason and "must not either" in fam.reason
    assert got.policy.include_outbound_ip_ranges == ipv4.policy.include_outbound_ip_ranges  # IPv4 untouched


def test_ipv6_rules_that_disagree_with_ipv4_keep_ipv6_on_iptables():
    """The datapath applies one port list to both families: ip6tables rules
    with other ports than iptables' would make eBPF capture more (or less)."""
    ipv4 = lr.from_iptables_save(ii.restore_payload(ii.flags_from_annotations({})))
    other = ii.flags_from_annotations({ii.ANN_EXCLUDE_OUTBOUND_PORTS: "5432"})
    got = lr.with_ipv6(ipv4, lr.from_ip6tables_save(i6.restore_payload(other)))
    fam = ipv6_verdict(got)
    assert not fam.accelerated
    assert "disagree on exclude_outbound_ports: [] vs [5432]" in fam.reason
    assert "-o ''" in fam.reason and "-o '5432'" in fam.reason          # both values named
    uid = replace(ii.flags_from_annotations({}), proxy_uid="1001")
    got = lr.with_ipv6(ipv4, lr.from_ip6tables_save(i6.restore_payload(uid)))
    assert "disagree on proxy_uids: [1337] vs [1001]" in ipv6_verdict(got).reason


def test_unparseable_ipv6_rules_keep_ipv6_on_iptables():
    ipv4 = lr.from_iptables_save(ii.restore_payload(ii.flags_from_annotations({})))
    bad = i6.restore_payload(ii.flags_from_annotations({})).replace("-j ISTIO_OUTPUT", "-j ISTIO_OUTPUT -m mark")
    result = lr._read_ip6tables("/p", lambda path, argv: bad if argv[0] == "ip6tables-nft-save" else None,
                                lambda path, names_file="ip_tables_names": set(), None)
    fam = ipv6_verdict(lr.with_ipv6(ipv4, result))
    assert not fam.accelerated and fam.reason.startswith("its ip6tables rules cannot be read exactly")


def test_nftables_policy_keeps_ipv6_off_with_the_reason():
    from pathlib import Path
    got = lr.from_nft_json((Path(__file__).parent / "data" / "istio-nftables-ruleset.json").read_text())
    fam = ipv6_verdict(got)
    assert not fam.accelerated and "nftables rules (inet tables)" in fam.reason


# --- reading a namespace -------------------------------------------------------------------

def recording_runner(outputs: dict, calls: list):
    def run(path, argv):
        calls.append(argv[0])
        return outputs.get(argv[0])
    return run


def legacy(v4=(), v6=()):
    return lambda path, names_file="ip_tables_names": set(v6 if names_file == "ip6_tables_names" else v4)


def nft_chains(*families):
    return json.dumps({"nftables": [{"chain": {"family": f, "table": "nat", "name": "ISTIO_OUTPUT"}}
                                    for f in families]})


def test_read_netns_reads_ip6tables_only_where_rules_are():
    flags = ii.flags_from_annotations({ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "*"})
    ipt, ip6t = ii.restore_payload(flags), i6.restore_payload(flags)
    calls = []
    got = lr.read_netns("/p", recording_runner({"nft": nft_chains("ip", "ip6"), "iptables-nft-save": ipt,
                                                "ip6tables-nft-save": ip6t}, calls), legacy())
    assert got.policy.ipv6_exact and ip_network("::/0") in got.policy.include_outbound_ip_ranges
    assert "ip6tables-legacy-save" not in calls
    calls.clear()        # ip6tables-nft made nothing: not asked; legacy nat for IPv6 absent: not asked
    got = lr.read_netns("/p", recording_runner({"nft": nft_chains("ip"), "iptables-nft-save": ipt}, calls), legacy())
    assert calls == ["nft", "iptables-nft-save"]
    assert "no Istio ip6tables rules" in got.policy.ipv6_refused
    calls.clear()        # legacy: ip6tables-legacy-save only because ip6_tables_names lists nat
    got = lr.read_netns("/p", recording_runner({"nft": "{}", "iptables-legacy-save": ipt,
                                                "ip6tables-legacy-save": ip6t}, calls), legacy({"nat"}, {"nat"}))
    assert got.policy.ipv6_exact and calls == ["nft", "iptables-legacy-save", "ip6tables-legacy-save"]
    both = lr.read_netns("/p", recording_runner({"nft": nft_chains("ip", "ip6"), "iptables-nft-save": ipt,
                                                 "ip6tables-nft-save": ip6t, "ip6tables-legacy-save": ip6t}, []),
                         legacy((), {"nat"}))
    assert "ip6tables rules of more than one kind" in both.policy.ipv6_refused


def needs_root(binary: str):
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} missing")


def _ip6_tables_names(ns: str) -> str:
    return sandbox.sh("sh", "-c", "cat /proc/net/ip6_tables_names 2>/dev/null || true", netns=ns)


@pytest.mark.bpf
@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_real_ip6tables_rules_read_back_and_reading_creates_nothing(backend):
    """The bed generator's rules of both families installed in a throwaway
    namespace with the real binaries, read back through nsenter as the
    agent reads them; reading IPv4-only rules creates no IPv6 table."""
    restore, restore6 = ("iptables-restore", "ip6tables-restore") if backend == "nft" else \
        ("iptables-legacy-restore", "ip6tables-legacy-restore")
    needs_root(restore6)
    needs_root("nft")
    ns = f"mbp-l6-{uuid.uuid4().hex[:8]}"
    sandbox.netns_add(ns)
    try:
        path = f"/run/netns/{ns}"
        flags = ii.flags_from_annotations({ii.ANN_INCLUDE_OUTBOUND_IP_RANGES: "10.0.0.0/8,fd00::/8",
                                           ii.ANN_EXCLUDE_OUTBOUND_IP_RANGES: "fd00:1::/32"})
        sandbox.sh(restore, "--noflush", netns=ns, input=ii.restore_payload(flags))
        got = lr.read_netns(path)
        assert "no Istio ip6tables rules" in got.policy.ipv6_refused
        assert "nat" not in _ip6_tables_names(ns)                  # reading created no legacy IPv6 table
        assert "ip6 nat" not in sandbox.sh("nft", "list", "tables", netns=ns)
        sandbox.sh(restore6, "--noflush", netns=ns, input=i6.restore_payload(flags))
        got = lr.read_netns(path)
        assert got.source == "iptables rules" and got.policy.ipv6_exact, got.policy.ipv6_refused
        assert got.policy.include_outbound_ip_ranges == nets("10.0.0.0/8", "fd00::/8")
        assert got.policy.exclude_outbound_ip_ranges == nets("fd00:1::/32")
        assert ipv6_verdict(got).accelerated
    finally:
        sandbox.netns_delete(ns)

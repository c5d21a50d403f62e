"""The equivalence matrix (issues 11 and 20): for randomly drawn meshed pods
and probes, the hop sequence of every request in ebpf mode equals the one in
iptables mode, observed end to end on the test bed (probes.py), not
compared as data. A second iptables pass shows the probes are
deterministic, so a difference is the datapath's, not noise.

What a probe records is what Istio's rules decide and what an application
can observe: which sidecar listeners and clusters carried it, the peer the
server app saw, the outcome, and the client app's own getpeername() and
getsockname() address. Probes are made from AF_INET, v4-mapped AF_INET6 and
(on the dual-stack bed) native IPv6 sockets, as the app and as the pod's
proxy uid (which must go out directly in both modes), and as DNS lookups
(captured by Istio's DNS proxy in the pods that ask for it). The IPv4 bed
holds a user-namespaced pod (hostUsers: false) per node.

Before the ebpf pass is compared, every meshed pod that `merbridge-py
inspect-pod` (the agent's own decision, read with the rules installed in the
pod) says can be accelerated must be accelerated by the agent (its /status);
a pod that is not fails the test by name. A pass with one pod accelerated
and the rest on iptables would compare iptables with itself.

test_a_wrong_policy_fails_the_matrix runs agents with deliberately wrong
policies (testbed/mutant_agent.py) through the same passes and comparison
and requires each to produce mismatches: the matrix can fail.

The seed is printed; MERBRIDGE_MATRIX_SEED=<n> repeats a run (the bed's
slot may differ, which shifts the pod addresses and the drawn ranges alike).
MERBRIDGE_MATRIX_PODS_PER_NODE sets the meshed pods per node of the IPv4 bed
(default 21: 42 meshed pods and 2 user-namespaced ones on 2 nodes, plus one
plain pod per node); MERBRIDGE_MATRIX6_PODS_PER_NODE those of the
dual-stack bed (default 4: it only adds the IPv6 probes, the drawn
dimensions are the IPv4 bed's).
MERBRIDGE_MATRIX_VERBOSE=1 prints every probe's hop sequence (iptables mode)
and whether Istio's nat rules took part in the ebpf pass.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import ipaddress
import json
import os
import socket
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from merbridge_py import sandbox
from merbridge_py.agent.status import agent_request
from merbridge_py.inspect import inspect_pod
from merbridge_py.testbed import Testbed, dns, istio_iptables, pod_draws, probes, topology
from merbridge_py.testbed.probes import HopObserver, Probe, difference_table, differences
from merbridge_py.testbed.topology import PodSpec


SEED = int(os.environ.get("MERBRIDGE_MATRIX_SEED") or random.SystemRandom().randrange(2 ** 32))
MESHED_PER_NODE = int(os.environ.get("MERBRIDGE_MATRIX_PODS_PER_NODE", "21"))
MESHED_PER_NODE6 = int(os.environ.get("MERBRIDGE_MATRIX6_PODS_PER_NODE", "4"))
USERNS_PER_NODE = 1
NODES = 2
MIN_PODS = 40       # the issue's bar
CONVERGE = 60.0     # seconds for the agents to settle every pod (rules read in each pod's namespace)


def _bed_with_drawn_pods(name: str, draw, **up):
    """Up in iptables mode with pods drawn (draw(slot) -> specs) for the slot
    the bed gets (another bed coming up at the same time can take the
    predicted slot: draw again)."""
    for _ in range(3):
        slot = pod_draws.next_slot()
        specs = draw(slot)
        tb = Testbed.up(name, nodes=NODES, pods=specs, mode="iptables", envoy_workers=1, **up)
        if tb.slot == slot:
            try:
                _unlimited_icmp(tb)
            except BaseException:
                tb.down()      # the caller never gets this bed: take it down here
                raise
            return tb, specs
        tb.down()
    raise RuntimeError("could not get the predicted test bed slot three times in a row")


def _unlimited_icmp(tb) -> None:
    """A request to an address no node routes (a Service IP a pod's rules
    send direct) gets ICMP unreachable from the pod's node; the kernel's
    per-destination ICMP rate limit would turn some of those into timeouts
    at random. Off in the bed's node namespaces, so the outcome is one."""
    for node in tb.nodes:
        sandbox.sh("sysctl", "-q", "-w", "net.ipv4.icmp_ratelimit=0", netns=node.netns)
        if tb.dual_stack:
            sandbox.sh("sysctl", "-q", "-w", "net.ipv6.icmp.ratelimit=0", netns=node.netns)


def _agent_verdicts(tb) -> dict[str, dict]:
    return {entry["pod"].split("/", 1)[1]: entry
            for node in tb.nodes for entry in agent_request(tb.admin_socket(node), "/status")["pods"]}


def _inspect_verdicts(tb, names) -> dict[str, dict]:
    """What `merbridge-py inspect-pod POD --netns NS` says of each pod: the
    agent's decision, from the pod object the agent reads and the rules
    installed in the pod's namespace (and its user namespace's id maps)."""
    objects = {}
    for node in tb.nodes:
        for obj in json.loads(tb.pods_file(node).read_text())["items"]:
            objects[obj["metadata"]["name"]] = obj
    out = {}
    for name in names:
        result = CliRunner().invoke(inspect_pod, ["-", "--netns", f"/run/netns/{tb.pod(name).netns}"],
                                    input=json.dumps(objects[name]))
        assert result.exit_code == 0, (name, result.output)
        out[name] = json.loads(result.output)
    return out


def _require_all_accelerated(tb, expected: dict[str, dict]) -> dict[str, dict]:
    """Wait until the agents accelerate every pod inspect-pod accelerates
    (and, on a dual-stack bed, its IPv6 side where inspect-pod does); fail
    naming each pod that is left on iptables."""
    want = {name for name, v in expected.items() if v["accelerate"]}
    want6 = {name for name, v in expected.items()
             if v["accelerate"] and v.get("families", {}).get("ipv6", {}).get("accelerated")}
    deadline = time.monotonic() + CONVERGE
    while True:
        verdicts = _agent_verdicts(tb)
        missing = {name: verdicts.get(name, {}).get("reason", "not seen by the agent") for name in sorted(want)
                   if not verdicts.get(name, {}).get("accelerated")}
        missing.update({name: f"IPv6 left on iptables: {verdicts[name]['reason']}" for name in sorted(want6)
                        if name not in missing and "IPv4 and IPv6" not in verdicts[name]["reason"]})
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, ("pods inspect-pod accelerates that the agent left on iptables:\n" +
                         "\n".join(f"   {name}: {why}" for name, why in missing.items()))
    wrongly = [name for name, v in verdicts.items() if name in expected and v["accelerated"] and name not in want]
    assert not wrongly, f"the agent accelerated pods inspect-pod refuses: {wrongly}"
    return verdicts


def _path_kind(tb, probe) -> str:
    client = tb.pod(probe.client)
    if probe.dns_name:
        return f"DNS{' as proxy' if probe.proxy else ''}"
    if not client.meshed:
        return "from a plain pod"
    if probe.server is None:
        return "outside the bed"
    server = tb.pod(probe.server)
    if server.name == client.name:
        return "to itself"
    how = "" if probe.family == "inet" else f" {probe.family}"
    how += " as proxy" if probe.proxy else ""
    return f"{'same' if server.node == client.node else 'other'} node, {'meshed' if server.meshed else 'plain'}{how}"


def _probe_kind(probe) -> str:
    if probe.dns_name:
        return "dns as proxy" if probe.proxy else "dns"
    return f"{probe.family}{' as proxy' if probe.proxy else ''}"


def _via_client_sidecar(probe, hops) -> str:
    if not any(role == "client" for role, _, _ in hops.sidecars):
        return ""
    return ", via DNS proxy" if probe.dns_name else ", via client sidecar"


def _nat_words(by_role: dict[str, int]) -> str:
    took = [role for role, n in sorted(by_role.items()) if n]
    return f"nat rules in {'+'.join(took)}" if took else "eBPF only"


def _nat_redirects(tb, pods) -> int:
    """Connections Istio's REDIRECT rules took so far, over `pods`."""
    return sum(sum(tb.nat_counters(p).values()) for p in pods)


def _nameservers(tb) -> dict[str, str]:
    return {node.name: dns.nameservers(node)[0] for node in tb.nodes}


@dataclass
class Passes:
    """The hop sequences of one probe set in iptables mode, ebpf mode and
    iptables mode again, and the witnesses of which datapath carried them."""

    iptables: dict
    ebpf: dict
    iptables_again: dict | None
    verdicts: dict[str, dict]
    nat_iptables: int
    nat_ebpf: int
    ebpf_nat: dict
    redirects: float


def _run_passes(tb, observer: HopObserver, drawn: list[Probe], meshed: list[str], expected: dict[str, dict],
                again: bool = True) -> Passes:
    """The probes in iptables mode, then ebpf mode (once every pod that can be
    is accelerated), then (with `again`) iptables mode again; the bed is
    left in iptables mode."""
    meshed_pods = [tb.pod(name) for name in meshed]
    nat = [_nat_redirects(tb, meshed_pods)]
    iptables = observer.run(drawn)
    nat.append(_nat_redirects(tb, meshed_pods))
    tb.set_mode("ebpf")
    verdicts = _require_all_accelerated(tb, expected)
    observer.count_nat = True
    ebpf = observer.run(drawn)
    observer.count_nat = False
    ebpf_nat = dict(observer.nat_redirects)
    nat.append(_nat_redirects(tb, meshed_pods))
    redirects = sum(v for node in tb.nodes for k, v in tb.agent_metrics(node).items()
                    if k.startswith("merbridge_redirects_total"))
    tb.set_mode("iptables")
    iptables_again = observer.run(drawn) if again else None
    return Passes(iptables, ebpf, iptables_again, verdicts, nat[1] - nat[0], nat[2] - nat[1], ebpf_nat, redirects)


def _matrix(tb, specs: list[PodSpec], drawn: list[Probe], started: float) -> None:
    """Run the passes and require 0 mismatches (see the module's docstring)."""
    meshed = [s for s in specs if s.meshed]
    for spec in meshed:
        print("  ", pod_draws.describe_pod(spec))
    expected = _inspect_verdicts(tb, [s.name for s in meshed])
    with HopObserver(tb) as observer:
        run = _run_passes(tb, observer, drawn, [s.name for s in meshed], expected)
    iptables, ebpf = run.iptables, run.ebpf

    accelerated = [s.name for s in meshed if run.verdicts.get(s.name, {}).get("accelerated")]
    pods = [tb.pod(s.name) for s in meshed]
    dimensions = Counter(f"{p.rules}/{'istio-cni' if p.cni else 'istio-init'}/uid {p.proxy_uid}"
                         f"{'' if p.host_users else '/hostUsers=false'}"
                         f"{'/DNS capture' if dns.captures_dns(p) else ''}"
                         f"{' (accelerated)' if p.name in accelerated else ''}" for p in pods)
    with_mesh_defaults = sum(1 for p in pods if p.mesh_defaults)
    refused = {name: v["reason"] for name, v in expected.items() if not v["accelerate"]}
    peers = Counter(h.peer for p, h in iptables.items() if not p.dns_name)
    outcomes = Counter(h.outcome for h in iptables.values())
    kinds = Counter(_probe_kind(p) for p in drawn)
    mismatches = differences(iptables, ebpf)
    unstable = differences(iptables, run.iptables_again)
    print(f"matrix: {len(meshed)} meshed pods x {len(drawn) / len(meshed):.1f} probes = {len(drawn)} probes "
          f"(seed {SEED}); {len(accelerated)} pods accelerated; connections redirected by Istio's nat rules: "
          f"{run.nat_iptables} in the iptables pass, {run.nat_ebpf} in the ebpf pass; agent redirects "
          f"{run.redirects:.0f}; probes by kind {dict(kinds)}; peers {dict(peers)}; outcomes {dict(outcomes)}")
    carried = Counter(f"{_path_kind(tb, p)}{_via_client_sidecar(p, hops)}: {_nat_words(run.ebpf_nat.get(p, {}))}"
                      for p, hops in ebpf.items() if hops.sidecars)
    print("ebpf pass, probes through a sidecar or DNS proxy, by path:")
    for path, n in sorted(carried.items()):
        print(f"   {n:4d}  {path}")
    print(f"pods by rules/init/uid: {dict(sorted(dimensions.items()))}; with mesh defaults: {with_mesh_defaults}")
    for name, reason in refused.items():
        print(f"   inspect-pod does not accelerate: {name}: {reason}")
    if os.environ.get("MERBRIDGE_MATRIX_VERBOSE"):
        for probe, hops in iptables.items():
            print(f"   {probe.key()}: {hops.describe()}; ebpf pass: {_nat_words(run.ebpf_nat.get(probe, {}))}")
    print(f"mismatches iptables vs ebpf: {len(mismatches)} (by kind "
          f"{dict(Counter(_probe_kind(p) for p, _, _ in mismatches))}); iptables vs iptables again: "
          f"{len(unstable)}; {time.monotonic() - started:.0f} s")

    # The matrix must exercise both datapaths and both kinds of path.
    assert accelerated, f"no pod was accelerated: the ebpf pass compared iptables with itself; {refused}"
    # Equal hops alone cannot tell eBPF from Istio's nat rules, which stay installed in ebpf mode:
    # every probe whose client sidecar took it under iptables, from a pod the agent accelerates,
    # must reach that sidecar without the client's nat rules in the ebpf pass. (IPv4 counters:
    # AF_INET and v4-mapped sockets; native IPv6 and DNS go by ip6tables' and the DNS rule's.)
    fell_back = [p for p, hops in iptables.items()
                 if not p.dns_name and not p.proxy and p.family in ("inet", "v4-mapped")
                 and p.client in accelerated and _via_client_sidecar(p, hops)
                 and run.ebpf_nat.get(p, {}).get("client", 0)]
    assert not fell_back, ("probes Istio's nat rules carried in the ebpf pass from accelerated pods:\n" +
                           "\n".join(f"   {p.key()}: {_nat_words(run.ebpf_nat[p])}" for p in fell_back))
    assert run.redirects > 0 and run.nat_ebpf < run.nat_iptables, (run.redirects, run.nat_iptables, run.nat_ebpf)
    assert peers["inbound-sidecar"] and peers["client"], peers
    assert not unstable, ("the iptables passes differ, the probes are not deterministic:\n"
                          + difference_table(unstable, "iptables", "again"))
    assert not mismatches, (f"{len(mismatches)} of {len(drawn)} probes took another path in ebpf mode "
                            f"(seed {SEED}):\n" + difference_table(mismatches, "iptables", "ebpf"))


@pytest.mark.bpf
@pytest.mark.slow
def test_hop_sequences_are_equal_in_iptables_and_ebpf_modes():
    print(f"\nequivalence matrix seed {SEED} (MERBRIDGE_MATRIX_SEED={SEED} repeats it)")
    started = time.monotonic()
    tb, specs = _bed_with_drawn_pods(
        f"mx{os.getpid()}{uuid.uuid4().hex[:4]}",
        lambda slot: pod_draws.draw_pods(random.Random(SEED), slot, MESHED_PER_NODE, NODES,
                                         userns_per_node=USERNS_PER_NODE))
    with tb:
        assert sum(s.meshed for s in specs) >= MIN_PODS or "MERBRIDGE_MATRIX_PODS_PER_NODE" in os.environ
        drawn = pod_draws.draw_probes(random.Random(SEED + 1), tb.pods, nameservers=_nameservers(tb))
        _matrix(tb, specs, drawn, started)


@pytest.mark.bpf
@pytest.mark.slow
def test_hop_sequences_are_equal_on_a_dual_stack_bed():
    """Fewer pods (the IPv4 bed draws the dimensions), every probe kind plus
    native IPv6 out of and into each pod. Istio's rules are iptables here:
    the bed writes IPv6 rules for istio-iptables only."""
    print(f"\ndual-stack equivalence matrix seed {SEED} (MERBRIDGE_MATRIX_SEED={SEED} repeats it)")
    started = time.monotonic()
    tb, specs = _bed_with_drawn_pods(
        f"mx6{os.getpid()}{uuid.uuid4().hex[:4]}",
        lambda slot: pod_draws.draw_pods(random.Random(SEED + 2), slot, MESHED_PER_NODE6, NODES, rules="iptables"),
        ip_families=topology.DUAL_STACK)
    with tb:
        drawn = pod_draws.draw_probes(random.Random(SEED + 3), tb.pods, nameservers=_nameservers(tb))
        assert any(p.family == "inet6" for p in drawn)
        _matrix(tb, specs, drawn, started)


# The bed of the mutant test: default capture (everything) in two pods on two
# nodes and in a user-namespaced one, so every mutant has probes that see it.
MUTANT_SPECS = [PodSpec("a", node=0, ports=pod_draws.SERVED_PORTS), PodSpec("b", node=1, ports=pod_draws.SERVED_PORTS),
                PodSpec("u", node=0, host_users=False, ports=pod_draws.SERVED_PORTS),
                PodSpec("plain", node=1, meshed=False, ports=pod_draws.SERVED_PORTS)]


@pytest.mark.bpf
@pytest.mark.slow
def test_a_wrong_policy_fails_the_matrix():
    """Each mutant agent (testbed/mutant_agent.py) through the matrix's own
    passes and comparison: iptables pass, ebpf pass with the mutant, and
    mismatches required. `peer-is-sidecar` must differ only in what the
    client app sees as its peer (the pre-issue-20 matrix passed it);
    `proxy-uid-unmapped` must differ in the user-namespaced pod's probes."""
    print(f"\nmutant matrix seed {SEED}")
    with Testbed.up(f"mxm{os.getpid()}{uuid.uuid4().hex[:4]}", nodes=2, pods=MUTANT_SPECS, mode="iptables",
                    envoy_workers=1) as tb:
        _unlimited_icmp(tb)
        drawn = pod_draws.draw_probes(random.Random(SEED + 4), tb.pods, nameservers=_nameservers(tb))
        # and for certain, whatever the draw: an app's captured request, and the user-namespaced proxy's own
        pod_b = tb.pod("b")
        drawn += [p for p in (Probe("a", pod_b.ip, 8080, "pod of meshed b", "b"),
                              Probe("u", pod_b.ip, 8080, "pod of meshed b", "b", proxy=True)) if p not in drawn]
        meshed = [s.name for s in MUTANT_SPECS if s.meshed]
        expected = _inspect_verdicts(tb, meshed)
        found = {}
        with HopObserver(tb) as observer:
            for mutant in ("peer-is-sidecar", "proxy-uid-unmapped"):
                tb.agent_mutant = mutant
                run = _run_passes(tb, observer, drawn, meshed, expected, again=False)
                found[mutant] = differences(run.iptables, run.ebpf)
                print(f"mutant {mutant}: {len(found[mutant])} of {len(drawn)} probes differ")
                print(difference_table(found[mutant][:6], "iptables", "ebpf"))
        tb.agent_mutant = None

    sidecar_peer = found["peer-is-sidecar"]
    assert sidecar_peer, "the matrix did not see a client getpeername() that shows the sidecar"
    for probe, a, b in sidecar_peer:
        # (a DNS-over-TCP probe's reply comes from the peer its socket shows)
        seen = {"client_peer": ""} | ({"peer": ""} if probe.dns_name and probe.dns_how.startswith("tcp") else {})
        assert dataclasses.replace(a, **seen) == dataclasses.replace(b, **seen), \
            (probe.key(), a.describe(), b.describe())
    assert any(":15001" in b.client_peer for _, _, b in sidecar_peer), sidecar_peer[:3]
    unmapped = found["proxy-uid-unmapped"]
    assert unmapped, "the matrix did not see a user-namespaced proxy's connections being redirected"
    # u's Envoy (101337 on the host) is no longer exempt: its own connections, and so
    # every request into or out of u, loop back into it; the other pods are untouched
    assert all("u" in (p.client, p.server) for p, _, _ in unmapped), [p.key() for p, _, _ in unmapped]
    assert any(p.client == "u" and p.proxy for p, _, _ in unmapped), [p.key() for p, _, _ in unmapped]


# --- the pieces, without a bed ------------------------------------------------------

def test_draws_repeat_from_the_seed_and_give_installable_pods():
    first = pod_draws.draw_pods(random.Random(7), 3, 21, userns_per_node=1)
    assert first == pod_draws.draw_pods(random.Random(7), 3, 21, userns_per_node=1)
    assert first != pod_draws.draw_pods(random.Random(8), 3, 21, userns_per_node=1)
    meshed = [s for s in first if s.meshed]
    assert len(meshed) == 44 and len(first) == 46
    userns = [s for s in meshed if not s.host_users]
    assert [s.node for s in userns] == [0, 1]
    # a user-namespaced pod's proxy uid must exist inside its 65536 ids; the bed's DNS proxy is not laid out for it
    assert all(s.proxy_uid is None and "proxyUID" not in s.mesh_defaults and not dns.captures_dns(s)
               and not s.cni for s in userns)
    captures = [s for s in meshed if dns.captures_dns(s)]
    assert captures and not any(s.rules == "nftables" and s.cni for s in captures)
    for spec in meshed:
        mesh = istio_iptables.MeshDefaults.from_dict(spec.mesh_defaults)
        if spec.proxy_uid is not None:
            mesh = dataclasses.replace(mesh, proxy_uid=spec.proxy_uid, proxy_gid=spec.proxy_uid)
        flags = istio_iptables.installed_flags(spec.annotations, mesh, cni=spec.cni)
        assert istio_iptables.rule_lines(flags)       # istio-iptables would accept these flags
    # every dimension of the issue occurs in one draw of this size
    assert {s.rules for s in meshed} == {"iptables", "nftables"}
    assert {bool(s.cni) for s in meshed} == {True, False}
    assert any(s.proxy_uid == pod_draws.OTHER_PROXY_UID or s.mesh_defaults.get("proxyUID") for s in meshed)
    assert any(s.mesh_defaults for s in meshed) and any(not s.mesh_defaults for s in meshed)


def test_probes_reach_into_every_drawn_range():
    specs = pod_draws.draw_pods(random.Random(11), 0, 6)
    _, pods, _ = topology.plan("u", specs, 2)
    drawn = pod_draws.draw_probes(random.Random(12), pods)
    assert drawn == pod_draws.draw_probes(random.Random(12), pods)
    drawn = [p for p in drawn if p.family == "inet" and not p.proxy]
    by_client: dict[str, list] = {}
    for probe in drawn:
        by_client.setdefault(probe.client, []).append(ipaddress.ip_address(probe.address))
    for pod in pods:
        if not pod.meshed:
            continue
        for name in (istio_iptables.ANN_INCLUDE_OUTBOUND_IP_RANGES, istio_iptables.ANN_EXCLUDE_OUTBOUND_IP_RANGES):
            for item in filter(None, pod.annotations.get(name, "").split(",")):
                if item != "*":
                    net = ipaddress.ip_network(item)
                    assert any(a in net for a in by_client[pod.name]), (pod.name, item)
    assert any(p.kind.startswith("inbound") for p in drawn) and any("plain" in p.kind for p in drawn)


def test_issue_20_probe_kinds_are_drawn_for_every_meshed_pod():
    specs = pod_draws.draw_pods(random.Random(21), 0, 4, userns_per_node=1, dns_capture=0.5)
    nodes, pods, _ = topology.plan("u", specs, 2, ip_families=topology.DUAL_STACK)
    nameservers = {n.name: n.gateway for n in nodes}
    drawn = pod_draws.draw_probes(random.Random(22), pods, nameservers=nameservers)
    for pod in (p for p in pods if p.meshed):
        mine = [p for p in drawn if p.client == pod.name]
        outbound = [p for p in mine if not p.dns_name and p.family == "inet" and not p.proxy]
        mapped = [p for p in mine if p.family == "v4-mapped"]
        assert len(mapped) == 1 and dataclasses.replace(mapped[0], family="inet") in outbound
        as_proxy = [p for p in mine if p.proxy and not p.dns_name]
        assert len(as_proxy) == 1 and dataclasses.replace(as_proxy[0], proxy=False) in outbound
        assert len([p for p in mine if p.family == "inet6"]) == 2
        assert all(ipaddress.ip_address(p.address).version == 6 for p in mine if p.family == "inet6")
        lookups = [p for p in mine if p.dns_name]
        assert [p.proxy for p in lookups] == [False] + ([True] if dns.captures_dns(pod) else [])
        assert all(p.address == nameservers[pod.node] and p.port == 53 and p.dns_how in pod_draws.DNS_TRANSPORTS
                   for p in lookups)
        assert [p for p in drawn if p.server == pod.name and p.family == "inet6" and p.client != pod.name]
    # an IPv4-only bed and no nameservers: no IPv6 and no DNS probes
    _, pods4, _ = topology.plan("u", specs, 2)
    assert not [p for p in pod_draws.draw_probes(random.Random(22), pods4) if p.family == "inet6" or p.dns_name]


def test_probe_requests_and_keys():
    plain = Probe("a", "10.0.0.1", 8080, "pod of meshed b", "b")
    assert plain.request() == {"host": "10.0.0.1", "port": 8080, "family": "inet"}
    assert plain.key() == "a -> 10.0.0.1:8080 (pod of meshed b)"
    mapped = dataclasses.replace(plain, family="v4-mapped", proxy=True)
    assert mapped.key() == "a -> 10.0.0.1:8080 (pod of meshed b, v4-mapped as proxy)"
    lookup = Probe("a", "10.0.0.1", 53, "nameserver", dns_name="mesh.dns.test", dns_how="tcp6")
    assert lookup.request() == {"dns": "mesh.dns.test", "server": "10.0.0.1", "how": "tcp6"}
    assert "DNS mesh.dns.test over tcp6" in lookup.key()
    with pytest.raises(ValueError, match="family 'inet4'"):
        Probe("a", "10.0.0.1", 80, "x", family="inet4")


def test_request_once_reports_what_the_client_socket_sees():
    """On loopback: the peer and local address of an AF_INET and a v4-mapped
    AF_INET6 socket, as the probe process reports them."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Whoami(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"pod": "x", "peer": "%s:%d" % self.client_address[:2], "port": 1}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Whoami)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        inet = probes.request_once("127.0.0.1", port)
        assert inet["outcome"] == "http 200" and inet["peer"] == f"127.0.0.1:{port}", inet
        assert inet["local"].startswith("127.0.0.1:")
        mapped = probes.request_once("127.0.0.1", port, family="v4-mapped")
        assert mapped["outcome"] == "http 200" and mapped["peer"] == f"[::ffff:127.0.0.1]:{port}", mapped
        assert mapped["local"].startswith("[::ffff:127.0.0.1]:")
        assert probes._address_part(mapped["local"]) == "::ffff:127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    refused = probes.request_once("127.0.0.1", port)
    assert refused["outcome"] == "refused" and refused["peer"] is None


def test_counter_labels_and_error_words():
    assert probes._counter_label("listener.0.0.0.0_15006.downstream_cx_total") == "virtualInbound"
    assert probes._counter_label("listener.0.0.0.0_15006.ssl.handshake") == "virtualInbound.tls"
    assert probes._counter_label("listener.10.1.2.3_8080.downstream_cx_total") == "listener 10.1.2.3_8080"
    assert probes._counter_label("cluster.outbound|8080||a.default.svc.cluster.local.upstream_cx_total") \
        == "outbound|8080||a.default.svc.cluster.local"
    assert probes.classify_error(ConnectionRefusedError()) == "refused"
    assert probes.classify_error(http.client.RemoteDisconnected()) == "closed"
    assert probes.classify_error(OSError(errno.EHOSTUNREACH, "no route")) == "unreachable"
    assert probes.classify_error(socket.timeout()) == "timeout"


def test_a_difference_is_reported_with_both_sides():
    p = probes.Probe("a", "10.0.0.1", 8080, "pod of meshed b", "b")
    direct = probes.Hops((), "client", "http 200", "b:8080", "10.0.0.1:8080", "10.0.0.2")
    proxied = probes.Hops((("server", "virtualInbound", 1),), "inbound-sidecar", "http 200", "b:8080",
                          "10.0.0.1:8080", "10.0.0.2")
    assert probes.differences({p: direct}, {p: direct}) == []
    diffs = probes.differences({p: direct}, {p: proxied})
    assert diffs == [(p, direct, proxied)]
    table = probes.difference_table(diffs, "iptables", "ebpf")
    assert "a -> 10.0.0.1:8080" in table and "peer client" in table and "server:virtualInbound+1" in table
    # what the client app sees is part of the hop sequence
    sidecar_peer = dataclasses.replace(direct, client_peer="127.0.0.2:15001")
    table = probes.difference_table(probes.differences({p: direct}, {p: sidecar_peer}), "iptables", "ebpf")
    assert "client sees peer 10.0.0.1:8080 from 10.0.0.2" in table and "client sees peer 127.0.0.2:15001" in table


def test_mutant_agents_patch_through_the_agents_seams(monkeypatch):
    """The mutant module's two changes land where the agent looks them up
    (what the bed runs is the agent itself, see test_a_wrong_policy_fails_the_matrix)."""
    from merbridge_py import datapath
    from merbridge_py.agent import core
    from merbridge_py.testbed import mutant_agent
    monkeypatch.setattr(datapath, "program_text", datapath.program_text)
    monkeypatch.setattr(core, "in_user_namespace", core.in_user_namespace)
    mutant_agent.MUTANTS["peer-is-sidecar"]()
    text = datapath.program_text()
    assert text.count("return 1;   /* mutant") == 2
    mutant_agent.MUTANTS["proxy-uid-unmapped"]()
    assert core.in_user_namespace("verdict", object()) == "verdict"
    with pytest.raises(SystemExit, match="usage"):
        mutant_agent.main(["no-such-mutant", "run"])
    # the agent compiles in a loader child: that child is started as the mutant's loader
    import subprocess
    monkeypatch.setattr(datapath, "subprocess", subprocess)
    started = []
    monkeypatch.setattr(subprocess, "run", lambda argv, *a, **k: started.append(argv))
    mutant_agent._loader_children_too("peer-is-sidecar")
    datapath.subprocess.run(["py", "-m", "merbridge_py.loader", "--maps-dir", "m"], timeout=1)
    datapath.subprocess.run(["nft", "list", "ruleset"])
    assert started == [["py", "-m", "merbridge_py.testbed.mutant_agent", "peer-is-sidecar", "loader",
                        "--maps-dir", "m"], ["nft", "list", "ruleset"]]
    assert datapath.subprocess.TimeoutExpired is subprocess.TimeoutExpired
